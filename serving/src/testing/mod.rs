//! Helpers for the services' integration tests: certificates made on the spot ([`TestPki`]),
//! services started on free loopback ports ([`spawn`]), service binaries run as processes
//! ([`Binary`]), clients, and waiting on conditions under a deadline.

mod binary;
mod client;
mod pki;
mod spawn;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use binary::{Binary, assert_config_errors, run_to_exit};
pub use client::{
    Handshake, TlsStream, client, client_builder, handshake, plain_client, tls_connect,
};
pub use pki::{Files, TestPki, foreign_client, klaus_names, server_cert, write_pem};
pub use spawn::{Running, serve_args, spawn, tls_serve_args};

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
