//! TLS for the main listener: PEM files loaded and checked before binding, TLS 1.3 only unless
//! TLS_MIN_VERSION allows 1.2, HTTP/2 and HTTP/1.1 by ALPN, optional client-certificate
//! verification with an allow-list of client identities, and reloading of rotated files (as
//! cert-manager or a Secret update writes them) without a restart.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::error::ConfigError;

/// The crypto provider both services use: ring, so that the build needs no C toolchain beyond
/// what ring itself compiles, and never OpenSSL.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The oldest TLS version a listener (TLS_MIN_VERSION) or Klaus's client
/// (PETRA_TLS_MIN_VERSION) accepts. TLS 1.3 by default: under TLS 1.2 the client certificate,
/// and with it the client's identity, crosses the network in clear.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3, for an old peer that cannot speak 1.3.
    #[value(name = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[default]
    #[value(name = "1.3")]
    Tls13,
}

impl MinVersion {
    /// The protocol versions offered, newest first; never older than TLS 1.2.
    pub fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        const TLS12_AND_13: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        const TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            Self::Tls12 => TLS12_AND_13,
            Self::Tls13 => TLS13_ONLY,
        }
    }
}

/// The files a TLS listener is made from.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// Certificate chain, PEM, leaf first (TLS_CERT_FILE).
    pub cert: PathBuf,
    /// Private key, PEM (TLS_KEY_FILE).
    pub key: PathBuf,
    /// CA certificates for client certificates, PEM (TLS_CLIENT_CA_FILE); `None` for no
    /// client authentication.
    pub client_ca: Option<PathBuf>,
    /// The client identities accepted (TLS_CLIENT_ALLOWED_NAMES); `None` accepts any
    /// certificate that chains to `client_ca`.
    pub allowed_clients: Option<AllowedNames>,
    /// The oldest TLS version accepted (TLS_MIN_VERSION).
    pub min_version: MinVersion,
    /// How often to look for changed files; `None` never reloads.
    pub reload_interval: Option<Duration>,
}

/// Reads a file, naming the variable it came from when it cannot be read.
fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|err| ConfigError::new(var, format!("cannot read {}: {err}", path.display())))
}

/// Parses every certificate in a PEM file; an empty or malformed file is an error.
pub fn load_certs(
    var: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    parse_certs(var, path, &read(var, path)?)
}

/// Parses every certificate in PEM text read from `path`; an empty or malformed text is an
/// error naming `var`.
pub fn parse_certs(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            ConfigError::new(var, format!("{} is not valid PEM: {err}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            var,
            format!(
                "{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// Parses the first private key in PEM text read from `path`: PKCS#8, PKCS#1 or SEC1.
pub fn parse_key(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| {
        let what = match err {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1)".to_owned()
            }
            other => format!("is not a valid PEM private key: {other}"),
        };
        ConfigError::new(var, format!("{} {what}", path.display()))
    })
}

/// Loads CA certificates into a root store.
pub fn load_roots(var: &'static str, path: &Path) -> Result<RootCertStore, ConfigError> {
    roots_from(var, path, load_certs(var, path)?)
}

/// Puts `certs`, read from `path`, into a root store; one that is not a usable CA is an error
/// naming `var`.
pub fn roots_from(
    var: &'static str,
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|err| {
            ConfigError::new(
                var,
                format!(
                    "{} holds a certificate that is not a usable CA: {err}",
                    path.display()
                ),
            )
        })?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to belong together.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key of the leaf.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads a chain and key, naming `cert_var` or `key_var` in any error, and checks that the
    /// key is the one the leaf certificate was issued for.
    pub fn load(
        cert_var: &'static str,
        cert: &Path,
        key_var: &'static str,
        key: &Path,
    ) -> Result<Self, ConfigError> {
        let cert_pem = read(cert_var, cert)?;
        let key_pem = read(key_var, key)?;
        Self::parse(cert_var, cert, &cert_pem, key_var, key, &key_pem)
    }

    /// [`Identity::load`] for PEM text already read.
    pub fn parse(
        cert_var: &'static str,
        cert: &Path,
        cert_pem: &[u8],
        key_var: &'static str,
        key: &Path,
        key_pem: &[u8],
    ) -> Result<Self, ConfigError> {
        let chain = parse_certs(cert_var, cert, cert_pem)?;
        let private = parse_key(key_var, key, key_pem)?;
        let signing = provider()
            .key_provider
            .load_private_key(private.clone_key())
            .map_err(|err| {
                ConfigError::new(
                    key_var,
                    format!("{} is not a usable private key: {err}", key.display()),
                )
            })?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|_| {
                ConfigError::new(
                    key_var,
                    format!(
                        "the key in {} does not match the certificate in {} ({cert_var})",
                        key.display(),
                        cert.display()
                    ),
                )
            })?;
        Ok(Self {
            chain,
            key: private,
        })
    }
}

/// Builds the server configuration from the files, checking everything an operator could get
/// wrong before the listener binds. Refused client certificates are counted nowhere; a listener
/// uses [`ReloadingConfig`], which counts them.
pub fn server_config(files: &ServerFiles) -> Result<ServerConfig, ConfigError> {
    server_config_from(files, &watched(files).read()?, &ClientRefusals::default())
}

/// The files of a listener, in the order [`server_config_from`] reads them.
fn watched(files: &ServerFiles) -> WatchedFiles {
    let mut watched = WatchedFiles::default()
        .with("TLS_CERT_FILE", &files.cert)
        .with("TLS_KEY_FILE", &files.key);
    if let Some(path) = &files.client_ca {
        watched = watched.with("TLS_CLIENT_CA_FILE", path);
    }
    watched
}

/// Shows when the listener's certificate (`server`) and the CAs of its client certificates
/// (`client_ca`) in `set` expire; called once `set` has loaded.
fn show_expiry(expiry: &crate::expiry::CertificateExpiry, files: &ServerFiles, set: &FileSet) {
    let leaf = parse_certs("TLS_CERT_FILE", &files.cert, set.get(0))
        .ok()
        .and_then(|chain| chain.into_iter().next());
    let cas = match &files.client_ca {
        Some(path) => parse_certs("TLS_CLIENT_CA_FILE", path, set.get(2)).unwrap_or_default(),
        None => Vec::new(),
    };
    expiry.show(
        leaf.iter()
            .map(|cert| ("server", cert))
            .chain(cas.iter().map(|cert| ("client_ca", cert))),
    );
}

fn server_config_from(
    files: &ServerFiles,
    set: &FileSet,
    refusals: &ClientRefusals,
) -> Result<ServerConfig, ConfigError> {
    let identity = Identity::parse(
        "TLS_CERT_FILE",
        &files.cert,
        set.get(0),
        "TLS_KEY_FILE",
        &files.key,
        set.get(1),
    )?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(files.min_version.versions())
        .map_err(|err| ConfigError::new("TLS_CERT_FILE", format!("TLS setup failed: {err}")))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let var = "TLS_CLIENT_CA_FILE";
            let roots = roots_from(var, path, parse_certs(var, path, set.get(2))?)?;
            let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|err| ConfigError::new(var, format!("{}: {err}", path.display())))?;
            builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                chain,
                allowed: files.allowed_clients.clone(),
                refusals: refusals.clone(),
            }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|err| {
            ConfigError::new(
                "TLS_CERT_FILE",
                format!("{} cannot be served: {err}", files.cert.display()),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The client identities a listener accepts (TLS_CLIENT_ALLOWED_NAMES): URIs, such as the
/// SPIFFE ID `spiffe://petra-klaus/ns/petra-klaus/sa/klaus`, are compared exactly with the
/// certificate's URI SANs; other names with its DNS SANs, ignoring ASCII case. The common name
/// is never looked at, as in every client of the Web PKI since RFC 6125.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedNames {
    uris: Vec<String>,
    dns: Vec<String>,
}

impl AllowedNames {
    /// The variable the list comes from.
    pub const VAR: &'static str = "TLS_CLIENT_ALLOWED_NAMES";

    /// Parses a comma-separated list; an empty list or a name that is neither a URI nor a DNS
    /// name is an error.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let mut names = Self {
            uris: Vec::new(),
            dns: Vec::new(),
        };
        for name in raw
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            if name.contains("://") {
                if !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        Self::VAR,
                        format!("{name:?} is not a URI (visible ASCII, no spaces)"),
                    ));
                }
                names.uris.push(name.to_owned());
            } else if rustls::pki_types::DnsName::try_from(name).is_ok() && !name.contains('*') {
                names.dns.push(name.to_ascii_lowercase());
            } else {
                return Err(ConfigError::new(
                    Self::VAR,
                    format!(
                        "{name:?} is neither a URI (such as spiffe://petra-klaus/ns/petra-klaus/sa/klaus) nor a DNS name (wildcards are not accepted)"
                    ),
                ));
            }
        }
        if names.uris.is_empty() && names.dns.is_empty() {
            return Err(ConfigError::new(
                Self::VAR,
                "is set but lists no name; list the client identities to accept (comma-separated), or unset it to accept every certificate from TLS_CLIENT_CA_FILE",
            ));
        }
        Ok(names)
    }

    /// Whether one of `presented` is allowed.
    fn allows(&self, presented: &[SubjectName]) -> bool {
        presented.iter().any(|name| match name {
            SubjectName::Uri(uri) => self.uris.iter().any(|allowed| allowed == uri),
            SubjectName::Dns(dns) => self
                .dns
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(dns)),
        })
    }
}

/// A name a certificate carries in its subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SubjectName {
    Uri(String),
    Dns(String),
}

impl std::fmt::Display for SubjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uri(uri) => write!(f, "URI:{uri}"),
            Self::Dns(dns) => write!(f, "DNS:{dns}"),
        }
    }
}

/// The URI and DNS names of a certificate's subject alternative names.
fn subject_names(cert: &CertificateDer<'_>) -> Result<Vec<SubjectName>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|err| err.to_string())?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|err| err.to_string())?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(SubjectName::Uri((*uri).to_owned())),
            GeneralName::DNSName(dns) => Some(SubjectName::Dns((*dns).to_owned())),
            _ => None,
        })
        .collect())
}

/// `tls_client_certificates_refused_total{reason}`: client certificates the main listener
/// refused, by reason.
#[derive(Debug, Clone, Default)]
struct ClientRefusals {
    refused: Family<ReasonLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl ClientRefusals {
    fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        registry.register(
            "tls_client_certificates_refused",
            "Client certificates refused in the TLS handshake, by reason: name_not_allowed (valid, but not in TLS_CLIENT_ALLOWED_NAMES), unknown_ca, expired, not_valid_yet, bad_signature, wrong_purpose, invalid",
            this.refused.clone(),
        );
        this
    }

    fn count(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// The reason label for a refusal by the chain checks.
fn chain_reason(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_valid_yet"
            }
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            _ => "invalid",
        },
        _ => "invalid",
    }
}

/// Checks client certificates: the chain and dates by webpki against TLS_CLIENT_CA_FILE, then
/// the identity against TLS_CLIENT_ALLOWED_NAMES. An identity not on the list is refused with the
/// `access_denied` alert (rustls's alert for [`CertificateError::ApplicationVerificationFailure`]),
/// counted as `name_not_allowed` and logged with the names the certificate carries; those need a
/// certificate from the CA, so they cannot be used to flood the log. Chain failures, which any
/// peer can cause, are counted and logged at debug level only.
#[derive(Debug)]
struct ClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    allowed: Option<AllowedNames>,
    refusals: ClientRefusals,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|err| {
                let reason = chain_reason(err);
                self.refusals.count(reason);
                tracing::debug!(reason, error = %err, "client certificate refused");
            })?;
        let Some(allowed) = &self.allowed else {
            return Ok(verified);
        };
        let presented = match subject_names(end_entity) {
            Ok(names) => names,
            Err(err) => {
                self.refusals.count("invalid");
                tracing::warn!(reason = "invalid", error = %err, "client certificate refused: its names cannot be read");
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding,
                ));
            }
        };
        if allowed.allows(&presented) {
            return Ok(verified);
        }
        self.refusals.count("name_not_allowed");
        let presented = presented
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            reason = "name_not_allowed",
            presented = %presented,
            "client certificate refused: none of its names is in TLS_CLIENT_ALLOWED_NAMES"
        );
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.chain.requires_raw_public_keys()
    }
}

/// PEM files that are read together, so that a reload sees one consistent set, each named by
/// the variable it came from.
#[derive(Debug, Clone, Default)]
pub struct WatchedFiles {
    files: Vec<(&'static str, PathBuf)>,
}

impl WatchedFiles {
    /// Adds `path`, set by `var`.
    #[must_use]
    pub fn with(mut self, var: &'static str, path: &Path) -> Self {
        self.files.push((var, path.to_owned()));
        self
    }

    /// Reads every file; the first that cannot be read is an error naming its variable.
    pub fn read(&self) -> Result<FileSet, ConfigError> {
        let contents = self
            .files
            .iter()
            .map(|(var, path)| read(var, path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FileSet { contents })
    }

    /// [`WatchedFiles::read`] on the blocking pool: a slow volume must not stall the serving
    /// thread (one by default).
    async fn read_off_thread(&self) -> Result<FileSet, ConfigError> {
        let files = self.clone();
        tokio::task::spawn_blocking(move || files.read())
            .await
            .map_err(|err| {
                ConfigError::new(
                    "TLS_RELOAD_INTERVAL_SECONDS",
                    format!("reading the TLS files failed: {err}"),
                )
            })?
    }
}

/// The bytes of [`WatchedFiles`], in the order they were added.
#[derive(Debug, Clone)]
pub struct FileSet {
    contents: Vec<Vec<u8>>,
}

impl FileSet {
    /// The bytes of the `index`-th file; empty when there is none.
    pub fn get(&self, index: usize) -> &[u8] {
        self.contents.get(index).map_or(&[], Vec::as_slice)
    }

    /// A hash of every file's bytes, to notice a change.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.contents.hash(&mut hasher);
        hasher.finish()
    }
}

/// `tls_reloads_total{result="ok|error"}` (or another name), which counts changed file sets.
#[derive(Debug, Clone, Default)]
pub struct ReloadMetrics {
    reloads: Family<ResultLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl ReloadMetrics {
    /// Registers the counter as `name` (`_total` is added).
    pub fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let this = Self::default();
        // Both results from the start, at 0: "no reload failed" reads as 0, not as no data.
        for result in ["ok", "error"] {
            let _ = this.reloads.get_or_create(&ResultLabel { result });
        }
        registry.register(name, help, this.reloads.clone());
        this
    }

    fn count(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }
}

/// Watches `files` every `interval` until `stop` is cancelled. `loaded` is the fingerprint of
/// the set in use, taken from the very bytes it was built from, so that a change made between
/// that first read and the watcher's start is seen too. A changed set is handed to `apply`: when
/// it succeeds the set is counted as `ok`; when it fails (a half-written rotation, a key that
/// does not match) the error is logged, counted once as `error`, and what is in use stays.
pub fn spawn_reloader(
    what: &'static str,
    files: WatchedFiles,
    interval: Duration,
    loaded: u64,
    metrics: ReloadMetrics,
    stop: CancellationToken,
    mut apply: impl FnMut(&FileSet) -> Result<(), ConfigError> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut last = loaded;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let set = match files.read_off_thread().await {
                Ok(set) => set,
                Err(err) => {
                    tracing::warn!(what, error = %err, "TLS files unreadable; keeping the loaded ones");
                    continue;
                }
            };
            let fingerprint = set.fingerprint();
            if fingerprint == last {
                continue;
            }
            // Counted once per changed set, not on every tick.
            last = fingerprint;
            match apply(&set) {
                Ok(()) => {
                    metrics.count("ok");
                    tracing::info!(what, "reloaded changed TLS files");
                }
                Err(err) => {
                    metrics.count("error");
                    tracing::warn!(what, error = %err, "changed TLS files are not valid; keeping the loaded ones");
                }
            }
        }
    });
}

/// The TLS configuration a listener uses for each new connection. It is swapped whole when the
/// files change, so connections already open keep the configuration they started with.
#[derive(Debug)]
pub struct ReloadingConfig {
    current: ArcSwap<ServerConfig>,
    files: ServerFiles,
    /// The fingerprint of the files `current` was built from.
    loaded: u64,
    reloads: ReloadMetrics,
    refusals: ClientRefusals,
    expiry: crate::expiry::CertificateExpiry,
}

impl ReloadingConfig {
    /// Loads the files once (an error here is a configuration error) and registers
    /// `tls_reloads_total{result="ok|error"}`, which counts changed file sets.
    pub fn load(files: ServerFiles, registry: &mut Registry) -> Result<Arc<Self>, ConfigError> {
        let set = watched(&files).read()?;
        let refusals = ClientRefusals::register(registry);
        let config = server_config_from(&files, &set, &refusals)?;
        let expiry = crate::expiry::CertificateExpiry::register(
            registry,
            "tls_certificate_not_after_timestamp_seconds",
        );
        show_expiry(&expiry, &files, &set);
        let reloads = ReloadMetrics::register(
            registry,
            "tls_reloads",
            "Changed TLS files seen, by whether they were loaded (ok) or kept out (error)",
        );
        if files.client_ca.is_some() && files.allowed_clients.is_none() {
            tracing::warn!(
                "TLS_CLIENT_ALLOWED_NAMES is not set: any client certificate from TLS_CLIENT_CA_FILE is accepted; list the client identities (e.g. spiffe://petra-klaus/ns/NAMESPACE/sa/klaus) to accept only those"
            );
        }
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(config),
            files,
            loaded: set.fingerprint(),
            reloads,
            refusals,
            expiry,
        }))
    }

    /// The configuration for the next connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Checks the files every `reload_interval` until `stop` is cancelled. A changed set that
    /// is valid replaces the configuration; an invalid one is logged and the old one kept, so a
    /// half-written rotation never takes the listener down.
    pub fn spawn_reloader(self: &Arc<Self>, stop: CancellationToken) {
        let Some(interval) = self.files.reload_interval else {
            return;
        };
        let this = Arc::clone(self);
        spawn_reloader(
            "server certificate",
            watched(&self.files),
            interval,
            self.loaded,
            self.reloads.clone(),
            stop,
            move |set| {
                let config = server_config_from(&this.files, set, &this.refusals)?;
                this.current.store(Arc::new(config));
                show_expiry(&this.expiry, &this.files, set);
                Ok(())
            },
        );
    }
}
