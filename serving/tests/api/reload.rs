//! Rotated certificate files are served without a restart, and a broken rotation keeps the
//! old certificate.

use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::version::TLS13;
use serving::testing::{
    TestPki, handshake, loopback, server_cert, spawn, tls_serve_args, wait_until,
};

#[tokio::test]
async fn serves_a_rotated_certificate_without_a_restart() {
    let pki = TestPki::new();
    let service = reloading_service(&pki);
    let server = spawn(service).await;
    let leaf = || served_leaf(server.main_addr, &pki);
    let first = leaf().await;

    // A half-written rotation (a key that does not match) keeps the old certificate.
    let next = server_cert(&pki.ca);
    std::fs::write(&pki.petra.cert, &next.cert).expect("write cert");
    wait_until(
        "the mismatched pair is seen and refused",
        Duration::from_secs(5),
        || async {
            server
                .metrics()
                .await
                .contains(r#"tls_reloads_total{result="error"}"#)
        },
    )
    .await;
    assert_eq!(leaf().await, first, "a mismatched pair must not be loaded");

    std::fs::write(&pki.petra.key, &next.key).expect("write key");
    wait_until(
        "the new certificate is served",
        Duration::from_secs(5),
        || async { leaf().await != first },
    )
    .await;
    let response = serving::testing::client(&pki.ca_file, Some(&pki.klaus))
        .get(server.https_url())
        .send()
        .await
        .expect("request after rotation");
    assert_eq!(response.text().await.expect("body"), "hello");
    server.stop().await;
}

#[tokio::test]
async fn a_rotation_between_loading_and_serving_is_not_missed() {
    let pki = TestPki::new();
    let service = reloading_service(&pki);
    // The files are read when the service binds; the reloader starts when it serves. A
    // rotation in between must still be picked up.
    let bound = service.bind().await.expect("binds");
    let addr = bound.main_addr();
    let loaded = rustls::pki_types::CertificateDer::from_pem_file(&pki.petra.cert)
        .expect("the certificate loaded");
    let next = server_cert(&pki.ca);
    std::fs::write(&pki.petra.cert, &next.cert).expect("write cert");
    std::fs::write(&pki.petra.key, &next.key).expect("write key");
    let serving = tokio::spawn(bound.serve(std::future::pending()));
    let leaf = || served_leaf(addr, &pki);
    wait_until(
        "the certificate rotated before serving is served",
        Duration::from_secs(5),
        || async { leaf().await != loaded },
    )
    .await;
    serving.abort();
}

/// The leaf certificate the server at `addr` serves now (mutual TLS 1.3).
async fn served_leaf(
    addr: std::net::SocketAddr,
    pki: &TestPki,
) -> rustls::pki_types::CertificateDer<'static> {
    handshake(
        addr,
        &pki.ca_file,
        Some(&pki.klaus),
        &[&TLS13],
        &[b"http/1.1"],
    )
    .await
    .expect("handshake")
    .leaf
}

/// The stand-in service with mutual TLS from `pki`, re-reading its files every 50 ms.
fn reloading_service(pki: &TestPki) -> serving::server::Service {
    let args = tls_serve_args(pki, Some(&pki.ca_file));
    let mut service =
        crate::helpers::hello_service(loopback(), &args).expect("valid configuration");
    if let Some(tls) = service.tls.as_mut() {
        tls.reload_interval = Some(Duration::from_millis(50));
    }
    service
}
