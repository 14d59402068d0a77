//! The main listener's TLS configuration, assembled from its files: the certificate, its key,
//! and client-certificate checks; built once before binding and rebuilt when the files change.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;

use super::client::{AllowedNames, ClientRefusals, ClientVerifier};
use super::pem::{Identity, parse_certs, roots_from};
use super::provider::{MinVersion, provider};
use super::reload::{FileSet, ReloadMetrics, WatchedFiles, spawn_reloader};
use crate::error::ConfigError;

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
