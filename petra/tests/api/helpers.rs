//! Starting Petra in the test process.

use std::path::Path;

use serving::ServeArgs;
use serving::config::{ConcurrencyLimit, LogFormat};
use serving::testing::{Running, TestPki, loopback, spawn};

/// Settings for a Petra on free loopback ports serving `pki`'s certificate, requiring client
/// certificates from `client_ca` when given.
pub(crate) fn args(pki: &TestPki, client_ca: Option<&Path>) -> ServeArgs {
    ServeArgs {
        admin_addr: loopback(),
        tls_cert_file: Some(pki.petra.cert.clone()),
        tls_key_file: Some(pki.petra.key.clone()),
        tls_client_ca_file: client_ca.map(Path::to_path_buf),
        tls_client_allowed_names: None,
        tls_min_version: serving::tls::MinVersion::Tls13,
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

/// Petra with mutual TLS against `pki`'s CA.
pub(crate) async fn spawn_petra(pki: &TestPki) -> Running {
    spawn_with(args(pki, Some(&pki.ca_file))).await
}

/// Petra with the given settings.
pub(crate) async fn spawn_with(args: ServeArgs) -> Running {
    spawn(petra::service(loopback(), &args).expect("valid configuration")).await
}
