//! Configuration shared by both services: one typed struct read once at startup from flags and
//! environment variables, and the one-line errors that end the process with status 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use crate::error::{ConfigError, EXIT_CONFIG};

/// The default MAX_CONNECTIONS: 2,048 for the requests in flight at the concurrency ceiling
/// and 1,024 more.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 3072;

/// The longest TLS_RELOAD_INTERVAL_SECONDS: a day. The reloader adds the interval to the
/// current instant, which overflows (a panic, and panic = abort) for values near `u64::MAX`.
pub const MAX_RELOAD_INTERVAL_SECONDS: u64 = 86_400;

/// The longest MAX_CONNECTION_AGE_SECONDS: a week (0 already means "never"). Each connection's
/// age is the setting times up to 1.1, which overflows a `Duration` near `u64::MAX` seconds.
pub const MAX_CONNECTION_AGE_LIMIT_SECONDS: u64 = 7 * 86_400;

/// Settings every service has besides its main listener address.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address of the admin listener: plain HTTP with /livez, /readyz and /metrics.
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// PEM file with the certificate chain the main listener serves (leaf first).
    #[arg(long, env = "TLS_CERT_FILE", value_name = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM file with the private key for TLS_CERT_FILE (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TLS_KEY_FILE", value_name = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM file with the CA certificates that client certificates must chain to. When set,
    /// the main listener requires a client certificate (mutual TLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE", value_name = "TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Comma-separated client identities the main listener accepts from TLS_CLIENT_CA_FILE: URIs
    /// (such as `spiffe://petra-klaus/ns/petra-klaus/sa/klaus`) matched exactly against the
    /// certificate's URI SANs, DNS names against its DNS SANs. Any other certificate is refused
    /// with the `access_denied` alert. Unset, every certificate from the CA is accepted (with a
    /// warning at startup). It stays in force when the TLS files are reloaded.
    #[arg(
        long,
        env = "TLS_CLIENT_ALLOWED_NAMES",
        value_name = "TLS_CLIENT_ALLOWED_NAMES"
    )]
    pub tls_client_allowed_names: Option<String>,

    /// The oldest TLS version the main listener accepts: `1.3` (the default) or `1.2`, for an
    /// old client. Under TLS 1.2 the client certificate crosses the network in clear.
    #[arg(long, env = "TLS_MIN_VERSION", value_enum, default_value_t = crate::tls::MinVersion::Tls13)]
    pub tls_min_version: crate::tls::MinVersion,

    /// How often the TLS files are checked for changes; a changed set is loaded without a
    /// restart (0 turns reloading off; at most a day).
    #[arg(long, env = "TLS_RELOAD_INTERVAL_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=MAX_RELOAD_INTERVAL_SECONDS))]
    pub tls_reload_interval_seconds: u64,

    /// After SIGTERM, how long the main listener keeps serving while /readyz answers 503, so
    /// that load balancers stop sending traffic first.
    #[arg(long, env = "SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    pub shutdown_delay_seconds: u64,

    /// After the delay, how long requests in flight may take to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECONDS", default_value_t = 20)]
    pub shutdown_timeout_seconds: u64,

    /// The most requests the main listener works on at once. Below it the limit adapts to the
    /// service's queueing delay (CONCURRENCY_LIMIT=adaptive): it grows while the requests in
    /// flight wait on something else, such as a distant Petra, and shrinks when the CPU is
    /// saturated. This ceiling bounds memory: the Kubernetes manifests' memory limit holds it
    /// with room.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// The most connections the main listener holds open at once. Beyond it the listener stops
    /// accepting until one closes: new connections wait in the kernel's backlog, which costs
    /// the service nothing. The default keeps a replica inside the Kubernetes manifests'
    /// memory limit with every connection busy, at the concurrency ceiling or waiting in the
    /// queue.
    // The memory each connection costs, busy and idle, is measured in BENCHMARKS.md.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_connections: u32,

    /// `adaptive` (the default) or `fixed`: a fixed limit stays at MAX_CONCURRENT_REQUESTS.
    #[arg(long, env = "CONCURRENCY_LIMIT", value_enum, default_value_t = ConcurrencyLimit::Adaptive)]
    pub concurrency_limit: ConcurrencyLimit,

    /// How long a request over the concurrency limit may wait for room before it is answered
    /// 503 with `Retry-After` (on plain HTTP/1.1 it may first wait as long unread, behind the
    /// read gate); 0 answers at once. Waiting costs no CPU, refusing does.
    #[arg(long, env = "REQUEST_QUEUE_TIMEOUT_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub request_queue_timeout_ms: u64,

    /// Seconds after which a connection is closed gracefully (HTTP/2 GOAWAY), give or take
    /// 10 %, so that callers holding long-lived HTTP/2 connections spread over new replicas;
    /// 0 keeps connections open for as long as the client likes (at most a week otherwise).
    #[arg(long, env = "MAX_CONNECTION_AGE_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(0..=MAX_CONNECTION_AGE_LIMIT_SECONDS))]
    pub max_connection_age_seconds: u64,

    /// Threads that serve requests. 1 (the default) runs everything on one thread, with no
    /// work stealing between threads, which costs less CPU per request and serves more
    /// requests than several threads on the same cores, and one core is what the Kubernetes
    /// manifests give a replica; scale out with replicas. More threads share the work of one
    /// process over several cores (tokio's multi-threaded runtime).
    // The CPU time and throughput of one thread against two are measured in BENCHMARKS.md.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,

    /// Log format on stdout: `json` (one object per line) or `text`. Filter with RUST_LOG.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Traces: the standard OpenTelemetry variables.
    #[command(flatten)]
    pub trace: crate::trace::TraceArgs,
}

impl ServeArgs {
    /// The span source for the service `name` (the default `service.name` of its traces),
    /// exporting when the OTEL_* variables ask for it; its export metrics go into `registry`.
    pub fn tracer(
        &self,
        name: &'static str,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<crate::trace::Tracer, ConfigError> {
        crate::trace::Tracer::new(&self.trace, name, registry)
    }

    /// The admission control these settings ask for.
    pub fn admission(&self) -> crate::admission::Settings {
        let ceiling = self.max_concurrent_requests as usize;
        let mut settings = crate::admission::Settings::adaptive(
            ceiling,
            Duration::from_millis(self.request_queue_timeout_ms),
        );
        if self.concurrency_limit == ConcurrencyLimit::Fixed {
            settings.adaptive = false;
            settings.initial = ceiling;
        }
        settings
    }

    /// The timing of graceful shutdown.
    pub fn shutdown_timing(&self) -> crate::shutdown::Timing {
        crate::shutdown::Timing {
            delay: Duration::from_secs(self.shutdown_delay_seconds),
            drain_timeout: Duration::from_secs(self.shutdown_timeout_seconds),
        }
    }

    /// The TLS files of the main listener: `None` when neither file is set, an error naming the
    /// missing variable when only one is.
    pub fn tls_files(&self) -> Result<Option<crate::tls::ServerFiles>, ConfigError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => {
                if self.tls_client_ca_file.is_some() {
                    return Err(ConfigError::new(
                        "TLS_CLIENT_CA_FILE",
                        "is set but TLS_CERT_FILE and TLS_KEY_FILE are not; mutual TLS needs TLS",
                    ));
                }
                Ok(None)
            }
            (Some(_), None) => Err(ConfigError::new(
                "TLS_KEY_FILE",
                "is not set, but TLS_CERT_FILE is; set both or neither",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "TLS_CERT_FILE",
                "is not set, but TLS_KEY_FILE is; set both or neither",
            )),
            (Some(cert), Some(key)) => Ok(Some(crate::tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
                allowed_clients: self.allowed_clients()?,
                min_version: self.tls_min_version,
                reload_interval: match self.tls_reload_interval_seconds {
                    0 => None,
                    secs => Some(Duration::from_secs(secs)),
                },
            })),
        }
    }
}

impl ServeArgs {
    /// TLS_CLIENT_ALLOWED_NAMES, parsed; set without TLS_CLIENT_CA_FILE it is an error, since
    /// without client certificates there is nothing to match it against.
    fn allowed_clients(&self) -> Result<Option<crate::tls::AllowedNames>, ConfigError> {
        let Some(raw) = &self.tls_client_allowed_names else {
            return Ok(None);
        };
        if self.tls_client_ca_file.is_none() {
            return Err(ConfigError::new(
                crate::tls::AllowedNames::VAR,
                "is set but TLS_CLIENT_CA_FILE is not; client identities need client certificates",
            ));
        }
        crate::tls::AllowedNames::parse(raw).map(Some)
    }
}

/// How the concurrency limit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConcurrencyLimit {
    /// Adapted to the queueing delay, up to MAX_CONCURRENT_REQUESTS.
    Adaptive,
    /// MAX_CONCURRENT_REQUESTS.
    Fixed,
}

/// The log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log collectors.
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

/// Parses the command line and environment. `--help` and `--version` print and exit 0; any
/// other problem prints one line on stderr (no usage dump) and exits with status 2.
pub fn parse<T: Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                err.exit();
            }
            eprintln!("{}", one_line(&err.render().to_string()));
            std::process::exit(i32::from(EXIT_CONFIG));
        }
    }
}

/// Folds clap's multi-line error into one line, dropping the usage and help hints.
fn one_line(rendered: &str) -> String {
    rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_fold_into_one_line() {
        let rendered = "error: invalid value 'xml' for '--log-format <LOG_FORMAT>'\n  [possible values: json, text]\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(rendered),
            "error: invalid value 'xml' for '--log-format <LOG_FORMAT>' [possible values: json, text]"
        );
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// Every numeric setting at the extremes of its type: each is refused with an error that
    /// names it, or taken and turned into durations and limits without overflowing.
    #[test]
    fn extreme_numbers_are_refused_or_harmless() {
        let max = u64::MAX.to_string();
        for (flag, value) in [
            ("--max-connection-age-seconds", max.as_str()),
            ("--max-connection-age-seconds", "604801"),
            ("--tls-reload-interval-seconds", max.as_str()),
            ("--tls-reload-interval-seconds", "86401"),
            ("--max-connections", "0"),
            ("--max-connections", max.as_str()),
            ("--max-concurrent-requests", "0"),
            ("--request-queue-timeout-ms", max.as_str()),
            ("--worker-threads", "0"),
            ("--worker-threads", "65535"),
        ] {
            let err = Cli::try_parse_from(["x", flag, value])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value} was accepted"));
            let name = flag
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase();
            assert!(err.to_string().contains(&name), "{flag} {value}: {err}");
        }
        // The largest values accepted make durations and limits without a panic.
        let cli = Cli::try_parse_from([
            "x",
            "--max-connection-age-seconds",
            "604800",
            "--tls-reload-interval-seconds",
            "86400",
            "--shutdown-delay-seconds",
            &max,
            "--shutdown-timeout-seconds",
            &max,
            "--max-concurrent-requests",
            &u32::MAX.to_string(),
        ])
        .expect("in range");
        let timing = cli.serve.shutdown_timing();
        assert_eq!(timing.delay.as_secs(), u64::MAX);
        let _ = tokio::time::Instant::now().checked_add(timing.drain_timeout);
        assert!(cli.serve.admission().max_queued >= cli.serve.admission().ceiling);
        assert!(
            tokio::time::Instant::now()
                .checked_add(Duration::from_secs(86_400))
                .is_some()
        );
    }

    #[test]
    fn half_a_tls_pair_names_the_missing_variable() {
        let cli = Cli::try_parse_from(["x", "--tls-cert-file", "/c.pem"]).expect("parses");
        let err = cli.serve.tls_files().expect_err("half a pair is an error");
        assert_eq!(err.var, "TLS_KEY_FILE");
    }
}
