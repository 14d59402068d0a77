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
/// `127.0.0.1`) and Klaus's client certificate already issued.
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
            &ca.issue_for_days(&["klaus".to_owned()], Usage::Client, 1)
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
    pub async fn stopped(self) {
        let _ = self.task.await;
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
