//! Clients for tests: reqwest over TLS with a test CA and identity, plain HTTP for admin ports,
//! and bare TLS connections that show what a handshake negotiated.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::pki::Files;

/// A reqwest client that trusts `ca` and presents `identity` when given.
pub fn client(ca: &Path, identity: Option<&Files>) -> reqwest::Client {
    client_builder(ca, identity).build().expect("client")
}

/// The builder behind [`client`], for tests that change a setting.
pub fn client_builder(ca: &Path, identity: Option<&Files>) -> reqwest::ClientBuilder {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).expect("read CA")).expect("CA");
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10));
    if let Some(files) = identity {
        let mut pem = std::fs::read(&files.cert).expect("read cert");
        pem.extend(std::fs::read(&files.key).expect("read key"));
        builder = builder.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
    }
    builder
}

/// A plain-HTTP client, for admin ports and plain listeners. Built once per test binary:
/// building a client reads the system's CA bundle, which is slow in debug builds.
pub fn plain_client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // No idle connections: a test's runtime ends with the test, and a pooled
            // connection must not outlive it into the next test in the same process.
            reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client")
        })
        .clone()
}

/// What a TLS handshake with a server showed.
#[derive(Debug)]
pub struct Handshake {
    /// The leaf certificate the server presented.
    pub leaf: rustls::pki_types::CertificateDer<'static>,
    /// The negotiated protocol version.
    pub version: Option<rustls::ProtocolVersion>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
}

/// A TLS client stream.
pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The text of `/metrics` on the admin listener at `admin`.
pub(super) async fn metrics_at(admin: SocketAddr) -> String {
    plain_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// Opens a TLS connection to `addr` as `localhost` with only the given protocol versions and
/// ALPN protocols, trusting `ca` and presenting `identity`.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<&Files>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Result<TlsStream, String> {
    let roots = crate::tls::load_roots("CA", ca).map_err(|err| err.to_string())?;
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(versions)
        .map_err(|err| err.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(files) => {
            let id = crate::tls::Identity::load("CERT", &files.cert, "KEY", &files.key)
                .map_err(|err| err.to_string())?;
            builder
                .with_client_auth_cert(id.chain, id.key)
                .map_err(|err| err.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|err| err.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(|err| err.to_string())?;
    connector
        .connect(name, tcp)
        .await
        .map_err(|err| err.to_string())
}

/// Connects like [`tls_connect`], sends an HTTP/1.1 request for `/` (unless HTTP/2 was
/// negotiated) and reads the first bytes of the answer, so that a client certificate refused
/// after a TLS 1.3 handshake shows up as an error too.
pub async fn handshake(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<&Files>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Result<Handshake, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(addr, ca, identity, versions, alpn).await?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first().cloned())
        .ok_or("no server certificate")?;
    let version = conn.protocol_version();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() != Some(b"h2") {
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|err| err.to_string())?;
        let mut first = [0u8; 12];
        tls.read_exact(&mut first)
            .await
            .map_err(|err| err.to_string())?;
    }
    Ok(Handshake {
        leaf,
        version,
        alpn,
    })
}
