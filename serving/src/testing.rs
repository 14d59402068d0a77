//! Helpers for the services' integration tests: certificates made on the spot, services started
//! on free loopback ports, and waiting on conditions under a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::Health;
use crate::certs::{Ca, Pem, Usage};
use crate::server::Service;

/// A certificate and key written to files.
#[derive(Debug, Clone)]
pub struct Files {
    /// The certificate file.
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
}

/// A private CA in a temporary folder, with Petra's server certificate (for `localhost` and
/// `127.0.0.1`) and Klaus's client certificate ([`klaus_names`]) already issued.
#[derive(Debug)]
pub struct TestPki {
    /// The folder; removed on drop.
    pub dir: tempfile::TempDir,
    /// The CA, to issue more certificates.
    pub ca: Ca,
    /// The CA certificate file.
    pub ca_file: PathBuf,
    /// Petra's server certificate.
    pub petra: Files,
    /// Klaus's client certificate.
    pub klaus: Files,
}

impl TestPki {
    /// Makes a fresh CA and both identities.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let ca = Ca::new("test CA").expect("CA");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.pem().cert).expect("write CA");
        let petra = write_pem(dir.path(), "petra", &server_cert(&ca));
        let klaus = write_pem(
            dir.path(),
            "klaus",
            &ca.issue_for_days(&klaus_names(), Usage::Client, 1)
                .expect("client cert"),
        );
        Self {
            dir,
            ca,
            ca_file,
            petra,
            klaus,
        }
    }

    /// Issues and writes another leaf certificate under `name`.
    pub fn issue(
        &self,
        name: &str,
        names: &[&str],
        usage: Usage,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Files {
        let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
        let pem = self
            .ca
            .issue(&names, usage, not_before, not_after)
            .expect("issue certificate");
        write_pem(self.dir.path(), name, &pem)
    }

    /// A path inside the folder, for files a test writes itself.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// The names of Klaus's client certificate, as `petra certs` issues it: `klaus` and its SPIFFE
/// ID in the `petra-klaus` namespace.
pub fn klaus_names() -> Vec<String> {
    vec!["klaus".to_owned(), crate::certs::klaus_id("petra-klaus")]
}

/// A server certificate for `localhost` and `127.0.0.1`, valid for a day.
pub fn server_cert(ca: &Ca) -> Pem {
    ca.issue_for_days(
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        Usage::Server,
        1,
    )
    .expect("server cert")
}

/// Writes a certificate and key as `NAME.crt` and `NAME.key` in `dir`.
pub fn write_pem(dir: &Path, name: &str, pem: &Pem) -> Files {
    let files = Files {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, &pem.cert).expect("write certificate");
    std::fs::write(&files.key, &pem.key).expect("write key");
    files
}

/// A service running in this test process.
#[derive(Debug)]
pub struct Running {
    /// The main listener's address.
    pub main_addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// The service's readiness flag.
    pub health: Health,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts the graceful shutdown and waits until the service has stopped.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until the service has stopped.
    pub async fn stopped(mut self) {
        let _ = (&mut self.task).await;
    }

    /// `https://localhost:PORT` of the main listener.
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.main_addr.port())
    }

    /// `http://127.0.0.1:PORT` of the main listener.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.main_addr)
    }

    /// `http://127.0.0.1:PORT` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        plain_client()
            .get(format!("{}/metrics", self.admin_url()))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `service` and serves it in the background until [`Running::stop`].
pub async fn spawn(service: Service) -> Running {
    let bound = service.bind().await.expect("service binds");
    let (main_addr, admin_addr, health) = (bound.main_addr(), bound.admin_addr(), bound.health());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    Running {
        main_addr,
        admin_addr,
        health,
        stop: Some(stop),
        task,
    }
}

/// A free loopback address for a listener (port 0).
pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Polls `condition` every few milliseconds until it holds, panicking with `what` when
/// `timeout` passes first.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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

/// A service binary started by a test, with the addresses it logged when it began serving.
#[derive(Debug)]
pub struct Binary {
    /// The process.
    pub child: std::process::Child,
    /// The main listener's address, from the `serving` log line.
    pub main_addr: SocketAddr,
    /// The admin listener's address, from the `serving` log line.
    pub admin_addr: SocketAddr,
    /// Every stdout line after the `serving` one, as it arrives.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    /// The command [`Binary::start`] runs: `exe` with only `env`, JSON logs on a piped stdout and
    /// both listeners on free loopback ports. For a test that must read stdout itself.
    pub fn command(exe: &str, env: &[(&str, &str)]) -> std::process::Command {
        let mut command = std::process::Command::new(exe);
        command
            .env_clear()
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        command
    }

    /// Starts `exe` with JSON logs, both listeners on free loopback ports and `env`, and waits
    /// for its `serving` log line.
    pub fn start(exe: &str, env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut child = Self::command(exe, env).spawn().expect("start the binary");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match serving_addrs(&lines, Duration::from_secs(20)) {
            Some((main_addr, admin_addr)) => Self {
                child,
                main_addr,
                admin_addr,
                lines,
            },
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{exe} did not log `serving` within 20 s");
            }
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `http://ADMIN_ADDR{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Waits up to 5 s until `/readyz` answers 503, as it does from the moment shutdown begins.
    pub async fn wait_unready(&self) {
        let readyz = self.admin_url("/readyz");
        wait_until("/readyz answers 503", Duration::from_secs(5), || async {
            plain_client()
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 503)
        })
        .await;
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads log lines until the `serving` one and returns the main and admin addresses it names.
fn serving_addrs(
    lines: &std::sync::mpsc::Receiver<String>,
    timeout: Duration,
) -> Option<(SocketAddr, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()?;
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "serving" {
            let addr = |key: &str| event[key].as_str().and_then(|s| s.parse().ok());
            return Some((addr("main_addr")?, addr("admin_addr")?));
        }
    }
}

/// Runs `exe` once per case with the case's environment and checks that it exits 2 with one
/// line on stderr that contains the case's expected text and no panic.
pub fn assert_config_errors(exe: &str, cases: &[(&[(&str, &str)], &str)]) {
    for (env, expected) in cases {
        let (code, stderr) = run_to_exit(exe, env);
        assert_eq!(code, Some(2), "{env:?} should exit 2; stderr: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{env:?}: one line expected, got: {stderr}"
        );
        assert!(stderr.starts_with("error: "), "{env:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{env:?}: expected {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{env:?}: {stderr}");
    }
}

/// A client certificate for `klaus` from a CA of its own, which no test server trusts, written
/// to `dir`.
pub fn foreign_client(dir: &Path) -> Files {
    let stranger = Ca::new("another CA").expect("CA");
    let pem = stranger
        .issue_for_days(&["klaus".to_owned()], Usage::Client, 1)
        .expect("cert");
    write_pem(dir, "foreign", &pem)
}

/// Runs `exe` with `env` (and nothing else from the environment) and returns its exit code
/// and stderr, for configuration errors.
pub fn run_to_exit(exe: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = std::process::Command::new(exe)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
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
