//! Starting Petra in the test process.

use serving::testing::{Running, TestPki, loopback, spawn, tls_serve_args};

/// Petra with mutual TLS against `pki`'s CA.
pub(crate) async fn spawn_petra(pki: &TestPki) -> Running {
    let args = tls_serve_args(pki, Some(&pki.ca_file));
    spawn(petra::service(loopback(), &args).expect("valid configuration")).await
}
