//! Services started in the test process: bound on free loopback ports, served in the
//! background, stopped gracefully.

use std::net::SocketAddr;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin::Health;
use crate::server::Service;

use super::plain_client;

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
