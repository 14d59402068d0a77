//! Services started in the test process: bound on free loopback ports, served in the
//! background, stopped gracefully.

use std::net::SocketAddr;
use std::path::Path;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::Health;
use crate::config::{ConcurrencyLimit, LogFormat, ServeArgs};
use crate::server::Service;
use crate::tls::MinVersion;

use super::client::metrics_at;
use super::pki::TestPki;

/// Serve settings for a test: the admin listener on a free loopback port, plain HTTP, no
/// shutdown delay, a 5 s drain, text logs, no reloading and no connection age; a test changes
/// what it needs.
pub fn serve_args() -> ServeArgs {
    ServeArgs {
        admin_addr: loopback(),
        tls_cert_file: None,
        tls_key_file: None,
        tls_client_ca_file: None,
        tls_client_allowed_names: None,
        tls_min_version: MinVersion::Tls13,
        tls_reload_interval_seconds: 0,
        shutdown_delay_seconds: 0,
        shutdown_timeout_seconds: 5,
        max_concurrent_requests: 1024,
        concurrency_limit: ConcurrencyLimit::Adaptive,
        request_queue_timeout_ms: 500,
        max_connection_age_seconds: 0,
        max_connections: 3072,
        worker_threads: 1,
        log_format: LogFormat::Text,
        trace: Default::default(),
    }
}

/// [`serve_args`] serving `pki`'s Petra certificate over TLS, and requiring client
/// certificates from `client_ca` when given.
pub fn tls_serve_args(pki: &TestPki, client_ca: Option<&Path>) -> ServeArgs {
    ServeArgs {
        tls_cert_file: Some(pki.petra.cert.clone()),
        tls_key_file: Some(pki.petra.key.clone()),
        tls_client_ca_file: client_ca.map(Path::to_path_buf),
        ..serve_args()
    }
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
        metrics_at(self.admin_addr).await
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

/// An address where nothing listens, so that connections to it are refused: a port that was
/// free on 127.0.0.3, an address no test binds a listener to, so that no test running in
/// parallel can take the port in the meantime.
pub fn refused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.3:0")
        .expect("bind 127.0.0.3")
        .local_addr()
        .expect("addr")
}
