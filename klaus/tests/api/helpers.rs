//! Starting Klaus and Petra (real or fake) in the test process.

use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use klaus::PetraArgs;
use serving::server::{Limits, Service};
use serving::shutdown::Timing;
use serving::testing::{Files, Running, TestPki, loopback, spawn, tls_serve_args};

/// Serve settings on free loopback ports, plain HTTP: the one fixture Petra's and serving's
/// tests use too.
pub(crate) use serving::testing::serve_args;

/// Klaus's settings for a Petra at `url`, trusting `pki`'s CA and presenting `identity`.
pub(crate) fn petra_args(url: &str, ca: Option<PathBuf>, identity: Option<&Files>) -> PetraArgs {
    PetraArgs {
        petra_ca_file: ca,
        petra_client_cert_file: identity.map(|files| files.cert.clone()),
        petra_client_key_file: identity.map(|files| files.key.clone()),
        ..PetraArgs::for_url(url)
    }
}

/// The real Petra with mutual TLS against `pki`'s CA.
pub(crate) async fn spawn_petra(pki: &TestPki) -> Running {
    spawn_petra_at(pki, loopback()).await
}

/// [`spawn_petra`] listening on `addr`: a Petra that comes back where it was.
pub(crate) async fn spawn_petra_at(pki: &TestPki, addr: std::net::SocketAddr) -> Running {
    let args = tls_serve_args(pki, Some(&pki.ca_file));
    spawn(petra::service(addr, &args).expect("valid Petra configuration")).await
}

/// A fake Petra serving `router` over HTTPS with `cert`, requiring client certificates from
/// `pki`'s CA.
/// A Petra stand-in that answers `hello` and keeps the headers of every request it gets.
pub(crate) async fn recording_petra(
    pki: &TestPki,
) -> (
    Running,
    std::sync::Arc<std::sync::Mutex<Vec<axum::http::HeaderMap>>>,
) {
    let seen: std::sync::Arc<std::sync::Mutex<Vec<axum::http::HeaderMap>>> =
        std::sync::Arc::default();
    let record = std::sync::Arc::clone(&seen);
    let fake = Router::new().route(
        "/",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let record = std::sync::Arc::clone(&record);
            async move {
                record.lock().expect("lock").push(headers);
                "hello"
            }
        }),
    );
    (spawn_fake_petra(pki, &pki.petra, fake).await, seen)
}

pub(crate) async fn spawn_fake_petra(pki: &TestPki, cert: &Files, router: Router) -> Running {
    spawn_fake_petra_at(pki, cert, router, loopback()).await
}

/// [`spawn_fake_petra`] listening on `addr`.
pub(crate) async fn spawn_fake_petra_at(
    pki: &TestPki,
    cert: &Files,
    router: Router,
    addr: std::net::SocketAddr,
) -> Running {
    spawn_fake_petra_with(pki, cert, router, addr, Limits::default()).await
}

/// [`spawn_fake_petra_at`] with the server limits `limits`.
pub(crate) async fn spawn_fake_petra_with(
    pki: &TestPki,
    cert: &Files,
    router: Router,
    addr: std::net::SocketAddr,
    limits: Limits,
) -> Running {
    spawn(Service {
        name: "fake-petra",
        router,
        listen_addr: addr,
        admin_addr: loopback(),
        tls: Some(serving::tls::ServerFiles {
            cert: cert.cert.clone(),
            key: cert.key.clone(),
            client_ca: Some(pki.ca_file.clone()),
            allowed_clients: None,
            min_version: serving::tls::MinVersion::Tls13,
            reload_interval: None,
        }),
        registry: Default::default(),
        timing: Timing {
            delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(1),
        },
        limits,
        admission: None,
        tasks: Default::default(),
    })
    .await
}

/// Klaus on plain HTTP, calling Petra as `petra` says.
pub(crate) async fn spawn_klaus(petra: &PetraArgs) -> Running {
    spawn(klaus::service(loopback(), &serve_args(), petra).expect("valid Klaus configuration"))
        .await
}

/// Klaus configured for a Petra that is down (nothing listens at [`refused_url`]), with `pki`'s
/// CA and Klaus's client certificate: the URL it calls, and Klaus.
pub(crate) async fn spawn_klaus_without_petra(pki: &TestPki) -> (String, Running) {
    let url = refused_url();
    let klaus = spawn_klaus_calling(pki, &url).await;
    (url, klaus)
}

/// Klaus wired to `petra` with `pki`'s CA and Klaus's client certificate.
pub(crate) async fn spawn_klaus_for(pki: &TestPki, petra: &Running) -> Running {
    spawn_klaus_calling(pki, &petra.https_url()).await
}

/// Klaus calling the Petra at `url` with `pki`'s CA and Klaus's client certificate.
pub(crate) async fn spawn_klaus_calling(pki: &TestPki, url: &str) -> Running {
    spawn_klaus(&petra_args(
        url,
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    ))
    .await
}

/// `GET url` on a plain client: status, content type and body.
pub(crate) async fn get(url: &str) -> (u16, String, String) {
    let response = serving::testing::plain_client()
        .get(url)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, content_type, response.text().await.expect("body"))
}

/// [`get`] with an owned URL, for spawned tasks.
pub(crate) async fn get_owned(url: String) -> (u16, String, String) {
    get(&url).await
}

/// An https URL where nothing listens (a dead Petra): [`serving::testing::refused_addr`].
pub(crate) fn refused_url() -> String {
    format!("https://{}", serving::testing::refused_addr())
}

/// A listener at `addr` that accepts TCP connections and never says a word (a peer that hangs
/// in the TLS handshake, or an address whose packets go nowhere): its address, and the task
/// holding the connections open until it is aborted.
pub(crate) async fn silent_listener(
    addr: impl tokio::net::ToSocketAddrs,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let bound = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    (bound, held)
}

/// A TLS acceptor with Petra's certificate from `pki`, requiring client certificates from its
/// CA and offering `h2` and `http/1.1`: for stand-ins that misbehave below HTTP.
pub(crate) fn petra_acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
    let files = serving::tls::ServerFiles {
        cert: pki.petra.cert.clone(),
        key: pki.petra.key.clone(),
        client_ca: Some(pki.ca_file.clone()),
        allowed_clients: None,
        min_version: serving::tls::MinVersion::Tls13,
        reload_interval: None,
    };
    let config = serving::tls::server_config(&files).expect("TLS config");
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// `calls` GETs of `url` at once; their bodies.
pub(crate) async fn concurrent_gets(url: &str, calls: usize) -> Vec<String> {
    let calls: Vec<_> = (0..calls)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { get(&url).await.2 })
        })
        .collect();
    let mut bodies = Vec::with_capacity(calls.len());
    for call in calls {
        bodies.push(call.await.expect("call"));
    }
    bodies
}
