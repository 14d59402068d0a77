//! Klaus's settings for Petra: the URLs in priority order, trust and identity, the deadline,
//! and the knobs of discovery and outlier detection; checked once at startup.

use std::path::PathBuf;
use std::time::Duration;

use axum::http::Uri;
use rustls::pki_types::ServerName;
use serving::ConfigError;
use url::{Host, Url};

/// The most URLs PETRA_URL may list.
pub const MAX_URLS: usize = 16;

/// How Klaus reaches Petra.
#[derive(Debug, Clone, clap::Args)]
pub struct PetraArgs {
    /// Petra's base URL, https only: https://HOST[:PORT][/PREFIX]; Klaus calls
    /// `GET {PETRA_URL}/`. Several URLs, comma-separated, are tried in that order of priority:
    /// the first is Petra in Klaus's own cluster or cloud, later ones take over when no
    /// address of the earlier ones answers. Every address a URL's host resolves to is an
    /// endpoint of its own; certificates are checked against the host name.
    #[arg(long, env = "PETRA_URL", required = true)]
    pub petra_url: Option<String>,

    /// PEM file with the CA certificates Petra's certificate must chain to; when set, they are
    /// the only ones trusted (not the system's public roots, unless
    /// PETRA_TRUST_SYSTEM_ROOTS=true); unset, the system's roots are. Re-read every
    /// TLS_RELOAD_INTERVAL_SECONDS. Verification cannot be turned off.
    #[arg(long, env = "PETRA_CA_FILE")]
    pub petra_ca_file: Option<PathBuf>,

    /// Also trust the system's public roots for Petra's certificate when PETRA_CA_FILE is set,
    /// for a Petra that moves from a private CA to a public one. Off by default: with it, any
    /// public CA that misissues a certificate for Petra's name lets someone pose as Petra.
    #[arg(long, env = "PETRA_TRUST_SYSTEM_ROOTS", default_value_t = false,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub petra_trust_system_roots: bool,

    /// The oldest TLS version Klaus speaks to Petra: `1.3` (the default) or `1.2`, for an old
    /// Petra. Under TLS 1.2 Klaus's client certificate crosses the network in clear.
    #[arg(long, env = "PETRA_TLS_MIN_VERSION", value_enum,
          default_value_t = serving::tls::MinVersion::Tls13)]
    pub petra_tls_min_version: serving::tls::MinVersion,

    /// PEM certificate chain Klaus presents to Petra (mutual TLS); re-read every
    /// TLS_RELOAD_INTERVAL_SECONDS.
    #[arg(long, env = "PETRA_CLIENT_CERT_FILE")]
    pub petra_client_cert_file: Option<PathBuf>,

    /// PEM private key for PETRA_CLIENT_CERT_FILE (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "PETRA_CLIENT_KEY_FILE")]
    pub petra_client_key_file: Option<PathBuf>,

    /// Deadline in milliseconds for the whole call to Petra, retries on other endpoints
    /// included; each connection attempt gets half of it.
    #[arg(long, env = "PETRA_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub petra_timeout_ms: u64,

    /// How often, in seconds, each URL's host is resolved again (a headless Service answers
    /// with one address per ready pod). A failed attempt also triggers one, at most every 100 ms.
    #[arg(long, env = "PETRA_RESOLVE_INTERVAL_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub petra_resolve_interval_seconds: u64,

    /// Consecutive failures (connect, TLS, timeout, 5xx) after which an endpoint is ejected;
    /// a 503 (Petra shedding load) is no failure of the endpoint.
    #[arg(long, env = "PETRA_EJECT_AFTER", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub petra_eject_after: u32,

    /// How long, in milliseconds, an endpoint stays ejected the first time; the time doubles
    /// each time it is ejected again without a success in between, up to 32 times this.
    #[arg(long, env = "PETRA_EJECTION_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub petra_ejection_ms: u64,

    /// How much Klaus's error answers (502, 503, 504) say about why the call to Petra failed:
    /// `public` names nothing internal (no host, address, port, setting or TLS state);
    /// `verbose` names them and the setting to fix, for local use only. The log always has the
    /// whole cause.
    #[arg(long, env = "ERROR_DETAIL", value_enum, default_value_t = ErrorDetail::Public)]
    pub error_detail: ErrorDetail,
}

/// How much a problem answer's `detail` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ErrorDetail {
    /// What failed, in words that reveal nothing of the deployment.
    #[default]
    Public,
    /// What failed, where, and which setting to fix: hosts, ports and variable names.
    Verbose,
}

impl PetraArgs {
    /// The settings for `url` with every other option at its default.
    pub fn for_url(url: &str) -> Self {
        Self {
            petra_url: Some(url.to_owned()),
            petra_ca_file: None,
            petra_trust_system_roots: false,
            petra_tls_min_version: serving::tls::MinVersion::Tls13,
            petra_client_cert_file: None,
            petra_client_key_file: None,
            petra_timeout_ms: 2000,
            petra_resolve_interval_seconds: 5,
            petra_eject_after: 3,
            petra_ejection_ms: 1000,
            error_detail: ErrorDetail::Public,
        }
    }

    /// The deadline of a call.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.petra_timeout_ms)
    }

    /// The share of the deadline one connection attempt (TCP and the TLS handshake) gets: half,
    /// so that a retry on another endpoint still has time. At the default 2 s that is 1 s, over
    /// two round trips of a slow link (RELIABILITY.md, "Distance").
    pub fn connect_timeout(&self) -> Duration {
        self.timeout() / 2
    }
}

/// One of PETRA_URL's URLs, with what calling it needs, parsed once.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its position in PETRA_URL: 0 is the first, preferred one.
    pub priority: usize,
    /// The URL Klaus calls, ending in `/`.
    pub url: Url,
    /// `url` as the request target.
    pub uri: Uri,
    /// The host to resolve: a name, or an address written out.
    pub host: String,
    /// The port, 443 when the URL names none.
    pub port: u16,
    /// The name Petra's certificate must carry: the URL's host, never a resolved address.
    pub server_name: ServerName<'static>,
}

impl Target {
    /// `HOST:PORT`, as errors and logs name it.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.url.host_str().unwrap_or_default(), self.port)
    }
}

/// Checks PETRA_URL: one https URL or several, comma-separated, each as [`parse_url`]
/// requires, none twice.
pub fn parse_urls(raw: &str) -> Result<Vec<Target>, ConfigError> {
    const VAR: &str = "PETRA_URL";
    let entries: Vec<&str> = raw.split(',').map(str::trim).collect();
    if entries.len() > MAX_URLS {
        return Err(ConfigError::new(
            VAR,
            format!(
                "lists {} URLs; at most {MAX_URLS} are allowed",
                entries.len()
            ),
        ));
    }
    let mut targets: Vec<Target> = Vec::with_capacity(entries.len());
    for (priority, entry) in entries.into_iter().enumerate() {
        if entry.is_empty() {
            let problem = if priority == 0 && !raw.contains(',') {
                "is empty; set it to Petra's https:// URL".to_owned()
            } else {
                format!(
                    "has an empty entry at position {} of '{raw}'; separate URLs with single commas",
                    priority + 1
                )
            };
            return Err(ConfigError::new(VAR, problem));
        }
        let target = target(priority, entry)?;
        if targets.iter().any(|seen| seen.url == target.url) {
            return Err(ConfigError::new(VAR, format!("lists {} twice", target.url)));
        }
        targets.push(target);
    }
    Ok(targets)
}

fn target(priority: usize, raw: &str) -> Result<Target, ConfigError> {
    const VAR: &str = "PETRA_URL";
    let url = parse_url(raw)?;
    let uri = url.as_str().parse::<Uri>().map_err(|err| {
        ConfigError::new(VAR, format!("'{raw}' is not a valid request URI ({err})"))
    })?;
    let (host, server_name) = match url.host() {
        Some(Host::Domain(name)) => {
            let server_name = ServerName::try_from(name.to_owned()).map_err(|err| {
                ConfigError::new(VAR, format!("'{raw}' has no valid host name ({err})"))
            })?;
            (name.to_owned(), server_name)
        }
        Some(Host::Ipv4(ip)) => (ip.to_string(), ServerName::IpAddress(ip.into())),
        Some(Host::Ipv6(ip)) => (ip.to_string(), ServerName::IpAddress(ip.into())),
        None => return Err(ConfigError::new(VAR, format!("'{raw}' has no host"))),
    };
    Ok(Target {
        priority,
        port: url.port_or_known_default().unwrap_or(443),
        url,
        uri,
        host,
        server_name,
    })
}

/// Checks one of PETRA_URL's URLs: absolute, https, a host, no credentials, query or
/// fragment. The result ends in `/`, so that it is the URL Klaus calls.
pub fn parse_url(raw: &str) -> Result<Url, ConfigError> {
    const VAR: &str = "PETRA_URL";
    let mut url = Url::parse(raw.trim()).map_err(|err| {
        ConfigError::new(
            VAR,
            format!("'{raw}' is not an absolute URL ({err}); expected https://HOST[:PORT]"),
        )
    })?;
    match url.scheme() {
        "https" => {}
        "http" => {
            return Err(ConfigError::new(
                VAR,
                format!("'{raw}' uses http; Klaus calls Petra over https only (use https://)"),
            ));
        }
        other => {
            return Err(ConfigError::new(
                VAR,
                format!("'{raw}' has scheme '{other}'; use https://"),
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(VAR, format!("'{raw}' has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            VAR,
            "must not carry credentials; Klaus authenticates with its client certificate",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            VAR,
            format!("'{raw}' must not have a query or fragment"),
        ));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn petra_url_must_be_https_with_a_host() {
        assert_eq!(
            parse_url("https://petra:8443").expect("valid").as_str(),
            "https://petra:8443/"
        );
        assert_eq!(
            parse_url("https://petra/api").expect("valid").as_str(),
            "https://petra/api/"
        );
        for (bad, says) in [
            ("http://petra:8443", "uses http"),
            ("petra:8443", "scheme 'petra'"),
            ("not a url", "not an absolute URL"),
            ("ftp://petra", "scheme 'ftp'"),
            ("https://user:pw@petra", "credentials"),
            ("https://petra/?q=1", "query"),
            ("", "not an absolute URL"),
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert_eq!(err.var, "PETRA_URL");
            assert!(err.problem.contains(says), "{bad}: {}", err.problem);
        }
    }

    #[test]
    fn a_list_keeps_its_order_as_priority() {
        let targets = parse_urls(
            " https://petra:8443 , https://petra.other-cloud.example/api,https://[::1]:9443",
        )
        .expect("valid");
        let seen: Vec<(usize, &str, u16, String)> = targets
            .iter()
            .map(|t| (t.priority, t.host.as_str(), t.port, t.url.to_string()))
            .collect();
        assert_eq!(
            seen,
            [
                (0, "petra", 8443, "https://petra:8443/".to_owned()),
                (
                    1,
                    "petra.other-cloud.example",
                    443,
                    "https://petra.other-cloud.example/api/".to_owned()
                ),
                (2, "::1", 9443, "https://[::1]:9443/".to_owned()),
            ]
        );
        assert!(matches!(targets[2].server_name, ServerName::IpAddress(_)));
        assert_eq!(targets[1].authority(), "petra.other-cloud.example:443");
    }

    #[test]
    fn a_bad_list_names_what_to_fix() {
        for (bad, says) in [
            ("", "is empty"),
            ("https://a,,https://b", "empty entry at position 2"),
            ("https://a,", "empty entry at position 2"),
            ("https://a,http://b", "'http://b' uses http"),
            ("https://a:8443,https://a:8443/", "twice"),
        ] {
            let err = parse_urls(bad).expect_err(bad);
            assert_eq!(err.var, "PETRA_URL");
            assert!(err.problem.contains(says), "{bad}: {}", err.problem);
        }
        let many = vec!["https://petra"; MAX_URLS + 1].join(",");
        assert!(
            parse_urls(&many)
                .expect_err("too many")
                .problem
                .contains("at most")
        );
    }
}
