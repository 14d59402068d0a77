//! Klaus's TLS settings for Petra: trust anchors and client identity, re-read while Klaus runs
//! so that a rotated certificate, key or CA is used for every new connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use rustls::{ClientConfig, RootCertStore};
use serving::ConfigError;
use serving::tls::{FileSet, ReloadMetrics, WatchedFiles};
use tokio_util::sync::CancellationToken;

use super::config::PetraArgs;

/// The two ways Klaus connects to Petra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// Every first attempt: HTTP/2 when Petra offers it (ALPN), else HTTP/1.1, with the
    /// connection kept for the next calls.
    Pooled,
    /// Retries: a new connection each time, never a pooled one that may have died with the
    /// first, and HTTP/1.1 only, where a certificate alert after the handshake always arrives
    /// as the answer to the request (over HTTP/2 the connection can end first, and the call
    /// then only says "closed"). Retries are rare, so this costs nothing on the hot path.
    Fresh,
}

/// The client configurations in use, one per [`Profile`], swapped whole when the files change:
/// connections already open keep what they started with and are replaced through their age
/// (Petra's MAX_CONNECTION_AGE_SECONDS).
#[derive(Debug)]
pub(crate) struct ClientTls {
    pooled: ArcSwap<ClientConfig>,
    fresh: ArcSwap<ClientConfig>,
    files: Files,
    /// The fingerprint of the files the configurations were built from.
    loaded: u64,
    /// The system's roots, read once (about 10 ms).
    system: Arc<RootCertStore>,
}

/// Where Klaus's TLS files are, and their positions in the [`FileSet`] read together.
#[derive(Debug, Clone)]
struct Files {
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    watched: WatchedFiles,
}

impl Files {
    fn of(args: &PetraArgs) -> Result<Self, ConfigError> {
        let identity = match (&args.petra_client_cert_file, &args.petra_client_key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "PETRA_CLIENT_KEY_FILE",
                    "is not set, but PETRA_CLIENT_CERT_FILE is; set both or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "PETRA_CLIENT_CERT_FILE",
                    "is not set, but PETRA_CLIENT_KEY_FILE is; set both or neither",
                ));
            }
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        };
        let mut watched = WatchedFiles::default();
        if let Some((cert, key)) = &identity {
            watched = watched
                .with("PETRA_CLIENT_CERT_FILE", cert)
                .with("PETRA_CLIENT_KEY_FILE", key);
        }
        if let Some(ca) = &args.petra_ca_file {
            watched = watched.with("PETRA_CA_FILE", ca);
        }
        Ok(Self {
            ca: args.petra_ca_file.clone(),
            identity,
            watched,
        })
    }

    /// Builds the configuration for calls to Petra from `set`: the system's roots plus
    /// PETRA_CA_FILE, Klaus's client identity, TLS 1.3 and 1.2. ALPN is left to the profile.
    fn config(&self, set: &FileSet, system: &RootCertStore) -> Result<ClientConfig, ConfigError> {
        let mut roots = system.clone();
        let ca_index = if self.identity.is_some() { 2 } else { 0 };
        if let Some(path) = &self.ca {
            let var = "PETRA_CA_FILE";
            let certs = serving::tls::parse_certs(var, path, set.get(ca_index))?;
            roots
                .roots
                .extend(serving::tls::roots_from(var, path, certs)?.roots);
        }
        let builder = ClientConfig::builder_with_provider(serving::tls::provider())
            .with_protocol_versions(serving::tls::PROTOCOL_VERSIONS)
            .map_err(|err| ConfigError::new("PETRA_CA_FILE", format!("TLS settings: {err}")))?
            .with_root_certificates(roots);
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let identity = serving::tls::Identity::parse(
                    "PETRA_CLIENT_CERT_FILE",
                    cert,
                    set.get(0),
                    "PETRA_CLIENT_KEY_FILE",
                    key,
                    set.get(1),
                )?;
                builder
                    .with_client_auth_cert(identity.chain, identity.key)
                    .map_err(|err| {
                        ConfigError::new(
                            "PETRA_CLIENT_CERT_FILE",
                            format!("{} cannot be used: {err}", cert.display()),
                        )
                    })
            }
        }
    }
}

impl ClientTls {
    /// Reads and checks the files once; every error names the variable to fix.
    pub(crate) fn load(args: &PetraArgs) -> Result<Self, ConfigError> {
        let files = Files::of(args)?;
        let mut system = RootCertStore::empty();
        // Unreadable system roots leave PETRA_CA_FILE as the only trust anchor, which is what
        // a private CA needs anyway; a missing bundle is no reason to refuse to start.
        system.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let set = files.watched.read()?;
        let config = files.config(&set, &system)?;
        let (pooled, fresh) = profiles(config);
        Ok(Self {
            pooled: ArcSwap::from_pointee(pooled),
            fresh: ArcSwap::from_pointee(fresh),
            files,
            loaded: set.fingerprint(),
            system: Arc::new(system),
        })
    }

    /// The configuration for the next connection of `profile`.
    pub(crate) fn config(&self, profile: Profile) -> Arc<ClientConfig> {
        match profile {
            Profile::Pooled => self.pooled.load_full(),
            Profile::Fresh => self.fresh.load_full(),
        }
    }

    /// Re-reads the files every `interval` until `stop`: a changed set that is valid is used
    /// for every new connection; one that is not (a half-written rotation) is logged, counted
    /// as `petra_tls_reloads_total{result="error"}`, and the loaded one kept.
    pub(crate) fn spawn_reloader(
        self: &Arc<Self>,
        interval: Duration,
        metrics: ReloadMetrics,
        stop: CancellationToken,
    ) {
        let this = Arc::clone(self);
        serving::tls::spawn_reloader(
            "Klaus's client certificate and Petra's CA",
            self.files.watched.clone(),
            interval,
            self.loaded,
            metrics,
            stop,
            move |set| {
                let (pooled, fresh) = profiles(this.files.config(set, &this.system)?);
                this.pooled.store(Arc::new(pooled));
                this.fresh.store(Arc::new(fresh));
                Ok(())
            },
        );
    }
}

/// `petra_tls_reloads_total{result}`: changed client-side TLS files seen.
pub(crate) fn register_reloads(registry: &mut Registry) -> ReloadMetrics {
    ReloadMetrics::register(
        registry,
        "petra_tls_reloads",
        "Changed client-side TLS files (PETRA_CA_FILE, PETRA_CLIENT_CERT_FILE, PETRA_CLIENT_KEY_FILE) seen, by whether they were loaded (ok) or kept out (error)",
    )
}

/// The configuration of each profile: the same trust and identity, each with its ALPN.
fn profiles(config: ClientConfig) -> (ClientConfig, ClientConfig) {
    let mut pooled = config.clone();
    pooled.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut fresh = config;
    fresh.alpn_protocols = vec![b"http/1.1".to_vec()];
    (pooled, fresh)
}
