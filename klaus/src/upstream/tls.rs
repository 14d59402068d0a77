//! Klaus's TLS settings for Petra: trust anchors and client identity, re-read while Klaus runs
//! so that a rotated certificate, key or CA is used for every new connection.
//!
//! Trust is PETRA_CA_FILE alone when it is set: a private CA is the whole trust of a private
//! hop, and adding the system's public roots would let any public CA that misissues a
//! certificate for Petra's name pose as Petra. The public roots are used only without
//! PETRA_CA_FILE, or on top of it with PETRA_TRUST_SYSTEM_ROOTS=true.

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
    /// The solo connection ([`super::solo`]) is HTTP/1.1 too and uses the same configuration.
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
    /// The system's roots, read once (about 10 ms), when they are trusted; else empty.
    system: Arc<RootCertStore>,
    /// `petra_tls_certificate_not_after_timestamp_seconds`, once [`ClientTls::with_expiry`] set it.
    expiry: serving::expiry::CertificateExpiry,
}

/// Where Klaus's TLS files are, and their positions in the [`FileSet`] read together.
#[derive(Debug, Clone)]
struct Files {
    ca: Option<PathBuf>,
    min_version: serving::tls::MinVersion,
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
            min_version: args.petra_tls_min_version,
            identity,
            watched,
        })
    }

    /// Shows when Klaus's client certificate (`client`) and the CAs of PETRA_CA_FILE
    /// (`petra_ca`) in `set` expire; called once `set` has loaded.
    fn show_expiry(&self, expiry: &serving::expiry::CertificateExpiry, set: &FileSet) {
        let leaf = self.identity.as_ref().and_then(|(cert, _)| {
            serving::tls::parse_certs("PETRA_CLIENT_CERT_FILE", cert, set.get(0))
                .ok()?
                .into_iter()
                .next()
        });
        let ca_index = if self.identity.is_some() { 2 } else { 0 };
        let cas = match &self.ca {
            Some(path) => serving::tls::parse_certs("PETRA_CA_FILE", path, set.get(ca_index))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        expiry.show(
            leaf.iter()
                .map(|cert| ("client", cert))
                .chain(cas.iter().map(|cert| ("petra_ca", cert))),
        );
    }

    /// Builds the configuration for calls to Petra from `set`: PETRA_CA_FILE plus `system`
    /// (the public roots, empty unless they are trusted), Klaus's client identity, the TLS
    /// versions of PETRA_TLS_MIN_VERSION. ALPN is left to the profile.
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
            .with_protocol_versions(self.min_version.versions())
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
        Self::load_with(args, || {
            let mut system = RootCertStore::empty();
            // Unreadable system roots are no reason to refuse to start: calls then fail with
            // Klaus's unknown-CA problem, which names PETRA_CA_FILE.
            system.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            system
        })
    }

    /// [`ClientTls::load`] with `public_roots` standing in for the system's roots, which it
    /// calls only when they are to be trusted.
    fn load_with(
        args: &PetraArgs,
        public_roots: impl FnOnce() -> RootCertStore,
    ) -> Result<Self, ConfigError> {
        let files = Files::of(args)?;
        let system = if args.petra_ca_file.is_none() || args.petra_trust_system_roots {
            public_roots()
        } else {
            RootCertStore::empty()
        };
        if args.petra_ca_file.is_none() && system.is_empty() {
            tracing::warn!(
                "PETRA_CA_FILE is not set and the system has no CA certificates: no Petra certificate can be trusted"
            );
        }
        let set = files.watched.read()?;
        let config = files.config(&set, &system)?;
        let (pooled, fresh) = profiles(config);
        Ok(Self {
            pooled: ArcSwap::from_pointee(pooled),
            fresh: ArcSwap::from_pointee(fresh),
            files,
            loaded: set.fingerprint(),
            system: Arc::new(system),
            expiry: serving::expiry::CertificateExpiry::default(),
        })
    }

    /// Shows the expiry dates of the files in `expiry` from now on, at every reload too.
    pub(crate) fn with_expiry(
        mut self,
        expiry: serving::expiry::CertificateExpiry,
    ) -> Result<Self, ConfigError> {
        let set = self.files.watched.read()?;
        self.files.show_expiry(&expiry, &set);
        self.expiry = expiry;
        Ok(self)
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
                this.files.show_expiry(&this.expiry, set);
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rustls::ServerConfig;
    use rustls::pki_types::ServerName;
    use serving::certs::{Ca, Pem};
    use serving::testing::{TestPki, server_cert};
    use serving::tls::MinVersion;

    use super::*;

    const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

    /// A server configuration for `localhost` with `pem`, speaking only `versions`.
    fn server(
        pem: &Pem,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ServerConfig> {
        let path = Path::new("test");
        let identity = serving::tls::Identity::parse(
            "CERT",
            path,
            pem.cert.as_bytes(),
            "KEY",
            path,
            pem.key.as_bytes(),
        )
        .expect("identity");
        let config = ServerConfig::builder_with_provider(serving::tls::provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(identity.chain, identity.key)
            .expect("server config");
        Arc::new(config)
    }

    /// A TLS handshake over an in-memory pipe; the client's error when it fails.
    async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<(), String> {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move {
            // The server's side of a refusal is the client's alert; only the client's result
            // matters here.
            let _ = tokio_rustls::TlsAcceptor::from(server).accept(far).await;
        });
        let name = ServerName::try_from("localhost").expect("name");
        let result = tokio_rustls::TlsConnector::from(client)
            .connect(name, near)
            .await
            .map(drop)
            .map_err(|err| err.to_string());
        serving.await.expect("server task");
        result
    }

    fn roots_of(pem: &str) -> RootCertStore {
        let certs = serving::tls::parse_certs("CA", Path::new("ca"), pem.as_bytes()).expect("CA");
        serving::tls::roots_from("CA", Path::new("ca"), certs).expect("roots")
    }

    #[tokio::test]
    async fn with_petra_ca_file_public_roots_are_not_trusted_unless_asked() {
        let pki = TestPki::new();
        // A CA that the "system" trusts, standing in for a public CA that misissued a
        // certificate for Petra's name.
        let public = Ca::new("public CA").expect("CA");
        let public_roots = || roots_of(&public.pem().cert);
        let impostor = server(&server_cert(&public), TLS13);
        let petra = server(&server_cert(&pki.ca), TLS13);
        let mut args = PetraArgs::for_url("https://localhost:1");
        args.petra_ca_file = Some(pki.ca_file.clone());

        let tls = ClientTls::load_with(&args, public_roots).expect("client TLS");
        let config = tls.config(Profile::Fresh);
        handshake(Arc::clone(&config), Arc::clone(&petra))
            .await
            .expect("Petra's own CA is trusted");
        let err = handshake(config, Arc::clone(&impostor))
            .await
            .expect_err("a certificate from a public CA must not be trusted with PETRA_CA_FILE");
        assert!(err.contains("UnknownIssuer"), "{err}");

        args.petra_trust_system_roots = true;
        let tls = ClientTls::load_with(&args, public_roots).expect("client TLS");
        handshake(tls.config(Profile::Fresh), Arc::clone(&impostor))
            .await
            .expect("PETRA_TRUST_SYSTEM_ROOTS=true trusts the public roots too");

        // Without PETRA_CA_FILE the public roots are the trust.
        let tls = ClientTls::load_with(&PetraArgs::for_url("https://localhost:1"), public_roots)
            .expect("client TLS");
        handshake(tls.config(Profile::Pooled), impostor)
            .await
            .expect("without PETRA_CA_FILE the system's roots are trusted");
    }

    #[tokio::test]
    async fn speaks_only_tls_1_3_unless_petra_tls_min_version_allows_1_2() {
        let pki = TestPki::new();
        let old_petra = server(&server_cert(&pki.ca), TLS12);
        let mut args = PetraArgs::for_url("https://localhost:1");
        args.petra_ca_file = Some(pki.ca_file.clone());

        let tls = ClientTls::load(&args).expect("client TLS");
        let err = handshake(tls.config(Profile::Pooled), Arc::clone(&old_petra))
            .await
            .expect_err("a TLS 1.2-only Petra must be refused by default");
        assert!(err.contains("ProtocolVersion"), "{err}");

        args.petra_tls_min_version = MinVersion::Tls12;
        let tls = ClientTls::load(&args).expect("client TLS");
        handshake(tls.config(Profile::Pooled), old_petra)
            .await
            .expect("PETRA_TLS_MIN_VERSION=1.2 speaks to a TLS 1.2-only Petra");
    }
}
