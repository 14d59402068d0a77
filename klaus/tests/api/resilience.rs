//! Retries on a fresh connection within a budget, and load shedding above the concurrency
//! limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use serving::testing::{TestPki, loopback, spawn, wait_until};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use crate::helpers::{get as http_get, petra_args, serve_args, spawn_fake_petra};

/// How a flaky Petra treats its first connection.
#[derive(Clone, Copy)]
enum FirstConnection {
    /// Reads the request and closes without answering, as a replica does when it dies under a
    /// pooled connection.
    ClosedUnderTheCall,
    /// Closed before the TLS handshake, as a balancer does when its backend is gone.
    ClosedInTheHandshake,
}

/// A Petra whose first connection fails as `first` says; later connections answer `hello`.
async fn spawn_flaky_petra(pki: &TestPki, first: FirstConnection) -> std::net::SocketAddr {
    let acceptor = crate::helpers::petra_acceptor(pki);
    let listener = tokio::net::TcpListener::bind(loopback())
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut first_one = true;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            if first_one && matches!(first, FirstConnection::ClosedInTheHandshake) {
                first_one = false;
                drop(tcp);
                continue;
            }
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            if std::mem::take(&mut first_one) {
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                drop(tls);
                continue;
            }
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new("hello".to_owned()))
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_connection_closed_under_a_call_is_retried_once_on_a_fresh_one() {
    for first in [
        FirstConnection::ClosedUnderTheCall,
        FirstConnection::ClosedInTheHandshake,
    ] {
        retried_once(first).await;
    }
}

async fn retried_once(first: FirstConnection) {
    let pki = TestPki::new();
    let addr = spawn_flaky_petra(&pki, first).await;
    let url = format!("https://localhost:{}", addr.port());
    let klaus = crate::helpers::spawn_klaus_calling(&pki, &url).await;
    let (status, _, body) = http_get(&klaus.http_url()).await;
    assert_eq!((status, body.as_str()), (200, "hello world"));
    let text = klaus.metrics().await;
    assert!(
        text.contains(r#"petra_retries_total{result="attempted"} 1"#),
        "{text}"
    );
    klaus.stop().await;
}

#[tokio::test]
async fn retries_stop_when_the_budget_is_spent() {
    let pki = TestPki::new();
    let (_, klaus) = crate::helpers::spawn_klaus_without_petra(&pki).await;
    for _ in 0..30 {
        assert_eq!(http_get(&klaus.http_url()).await.0, 502);
    }
    // With Petra down, the first 20 failures are retried and the next 10 are not: retries
    // never multiply the load on a Petra that is really gone.
    let text = klaus.metrics().await;
    assert!(
        text.contains(r#"petra_retries_total{result="attempted"} 20"#),
        "{text}"
    );
    assert!(
        text.contains(r#"petra_retries_total{result="skipped"} 10"#),
        "{text}"
    );
    assert!(
        text.contains(r#"petra_calls_total{outcome="unreachable"} 30"#),
        "{text}"
    );
    klaus.stop().await;
}

/// A Petra that holds every call until `release` is notified, counting the calls it holds.
struct HeldPetra {
    petra: serving::testing::Running,
    release: Arc<Notify>,
    held: Arc<std::sync::atomic::AtomicUsize>,
}

impl HeldPetra {
    async fn spawn(pki: &TestPki) -> Self {
        let release = Arc::new(Notify::new());
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (on_release, counter) = (release.clone(), held.clone());
        let fake = Router::new().route(
            "/",
            get(move || {
                let (on_release, counter) = (on_release.clone(), counter.clone());
                async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    on_release.notified().await;
                    "hello"
                }
            }),
        );
        let petra = spawn_fake_petra(pki, &pki.petra, fake).await;
        Self {
            petra,
            release,
            held,
        }
    }

    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn wait_held(&self, n: usize) {
        wait_until(
            &format!("{n} requests are held at Petra"),
            Duration::from_secs(5),
            || async { self.held() == n },
        )
        .await;
    }

    /// [`Self::klaus`] with its two places taken by calls held here: the calls and Klaus's URL.
    async fn full_klaus(
        &self,
        pki: &TestPki,
        queue_ms: u64,
    ) -> (
        serving::testing::Running,
        String,
        Vec<tokio::task::JoinHandle<(u16, String, String)>>,
    ) {
        let klaus = self.klaus(pki, queue_ms).await;
        let url = klaus.http_url();
        let in_flight: Vec<_> = (0..2)
            .map(|_| tokio::spawn(crate::helpers::get_owned(url.clone())))
            .collect();
        self.wait_held(2).await;
        (klaus, url, in_flight)
    }

    /// Lets the held calls go, and checks that each was answered `hello world`.
    async fn release_all(&self, in_flight: Vec<tokio::task::JoinHandle<(u16, String, String)>>) {
        self.release.notify_waiters();
        for request in in_flight {
            let (status, _, body) = request.await.expect("task");
            assert_eq!((status, body.as_str()), (200, "hello world"));
        }
    }

    /// Klaus with a fixed limit of two requests in flight, waiting up to `queue_ms` for room.
    async fn klaus(&self, pki: &TestPki, queue_ms: u64) -> serving::testing::Running {
        let mut args = serve_args();
        args.max_concurrent_requests = 2;
        args.concurrency_limit = serving::config::ConcurrencyLimit::Fixed;
        args.request_queue_timeout_ms = queue_ms;
        let mut petra_settings = petra_args(
            &self.petra.https_url(),
            Some(pki.ca_file.clone()),
            Some(&pki.klaus),
        );
        petra_settings.petra_timeout_ms = 20_000;
        spawn(klaus::service(loopback(), &args, &petra_settings).expect("config")).await
    }
}

/// One request to a Klaus whose limit is full: its status and headers, and how long it took.
async fn over_the_limit(url: &str) -> (u16, axum::http::HeaderMap, Duration) {
    let started = Instant::now();
    let answer = serving::testing::plain_client()
        .get(url)
        .send()
        .await
        .expect("request");
    let took = started.elapsed();
    (answer.status().as_u16(), answer.headers().clone(), took)
}

#[tokio::test]
async fn requests_over_the_concurrency_limit_get_a_fast_503_when_waiting_is_off() {
    let pki = TestPki::new();
    let petra = HeldPetra::spawn(&pki).await;
    let (klaus, url, in_flight) = petra.full_klaus(&pki, 0).await;

    let (status, headers, took) = over_the_limit(&url).await;
    assert!(took < Duration::from_millis(200), "shedding took {took:?}");
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    // HTTP/1.1: the connection is closed, so that a client ignoring Retry-After reconnects.
    assert_eq!(headers["connection"], "close");

    // Releasing Petra lets the held requests finish, and the limit frees up again.
    petra.release_all(in_flight).await;
    let again = tokio::spawn(crate::helpers::get_owned(url.clone()));
    petra.wait_held(3).await;
    petra.release.notify_waiters();
    assert_eq!(again.await.expect("task").0, 200);
    let text = klaus.metrics().await;
    assert!(
        text.contains(r#"http_requests_total{route="/",method="GET",status="503"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"requests_shed_total{reason="over_limit"} 1"#),
        "{text}"
    );
    klaus.stop().await;
    petra.petra.stop().await;
}

#[tokio::test]
async fn a_request_over_the_limit_waits_for_room_and_is_served() {
    let pki = TestPki::new();
    let petra = HeldPetra::spawn(&pki).await;
    let (klaus, url, first) = petra.full_klaus(&pki, 10_000).await;
    let third = tokio::spawn(crate::helpers::get_owned(url.clone()));
    // Klaus's front is plain HTTP/1.1: the third request waits unread, behind the read gate.
    wait_until(
        "the third request waits unread",
        Duration::from_secs(5),
        || async { klaus.metrics().await.contains("connections_read_paused 1") },
    )
    .await;
    assert_eq!(petra.held(), 2, "the third request passed the limit");

    // Room frees up: the waiting request goes on to Petra and is answered.
    petra.release.notify_waiters();
    petra.wait_held(3).await;
    petra.release.notify_waiters();
    for request in first {
        assert_eq!(request.await.expect("task").0, 200);
    }
    assert_eq!(third.await.expect("task").2, "hello world");
    let text = klaus.metrics().await;
    assert!(!text.contains("status=\"503\""), "{text}");
    klaus.stop().await;
    petra.petra.stop().await;
}

#[tokio::test]
async fn a_request_whose_wait_runs_out_gets_a_503() {
    let pki = TestPki::new();
    let petra = HeldPetra::spawn(&pki).await;
    let (klaus, url, in_flight) = petra.full_klaus(&pki, 150).await;

    let (status, headers, waited) = over_the_limit(&url).await;
    assert_eq!(status, 503);
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "refused after {waited:?}, for a 150 ms wait"
    );
    assert_eq!(headers["retry-after"], "1");
    petra.release_all(in_flight).await;
    let text = klaus.metrics().await;
    assert!(
        text.contains(r#"requests_shed_total{reason="queue_timeout"} 1"#),
        "{text}"
    );
    klaus.stop().await;
    petra.petra.stop().await;
}

#[tokio::test]
async fn calls_beyond_one_connections_streams_open_more_connections_and_the_limit_grows() {
    let pki = TestPki::new();
    let petra = HeldPetra::spawn(&pki).await;
    let mut petra_settings = petra_args(
        &petra.petra.https_url(),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    petra_settings.petra_timeout_ms = 20_000;
    // Klaus's adaptive limit starts at 256: 300 calls held at a distant-looking Petra make
    // requests wait while the runtime idles, so the limit must grow for all of them to pass.
    // (Opening 300 connections at once in a debug build saturates the test's one thread for a
    // moment, which shrinks the limit first: the requests may wait long for it to grow back.)
    let mut args = serve_args();
    args.request_queue_timeout_ms = 30_000;
    let klaus = spawn(klaus::service(loopback(), &args, &petra_settings).expect("config")).await;
    let url = klaus.http_url();
    // The client waits as long as the test does (its usual 10 s is shorter than the waits
    // below; a run of the suite beside CI's other work once timed a call out).
    let client = serving::testing::plain_client();
    let calls: Vec<_> = (0..300)
        .map(|_| {
            let request = client.get(&url).timeout(Duration::from_secs(60)).send();
            tokio::spawn(async move {
                let response = request.await.expect("request");
                (response.status().as_u16(),)
            })
        })
        .collect();
    wait_until(
        "all 300 calls are held at Petra",
        Duration::from_secs(20),
        || async { petra.held() == 300 },
    )
    .await;
    let text = klaus.metrics().await;
    let limit: usize = metric(&text, "concurrency_limit");
    assert!(
        limit >= 300,
        "concurrency_limit {limit} with 300 calls held"
    );
    // 300 calls over connections of 128 calls each: three connections, not one.
    let accepted: usize = metric(&petra.petra.metrics().await, "connections_accepted_total");
    assert_eq!(
        accepted, 3,
        "Petra accepted {accepted} connections for 300 calls"
    );
    petra.release.notify_waiters();
    for call in calls {
        assert_eq!(call.await.expect("task").0, 200);
    }
    klaus.stop().await;
    petra.petra.stop().await;
}

/// The value of the unlabelled metric `name` in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> usize {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test]
async fn a_burst_after_the_connection_reached_its_age_opens_one_connection_not_one_per_call() {
    let pki = TestPki::new();
    let router = Router::new().route("/", get(|| async { "hello" }));
    let limits = serving::server::Limits {
        max_connection_age: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let petra =
        crate::helpers::spawn_fake_petra_with(&pki, &pki.petra, router, loopback(), limits).await;
    let klaus = crate::helpers::spawn_klaus_for(&pki, &petra).await;
    let url = klaus.http_url();
    assert_eq!(http_get(&url).await.2, "hello world");
    // Petra closes the connection at its age (give or take 10 %), while no call uses it.
    wait_until(
        "Petra closed the connection at its age",
        Duration::from_secs(10),
        || async { petra.metrics().await.contains("connections_open 0\n") },
    )
    .await;
    for body in crate::helpers::concurrent_gets(&url, 19).await {
        assert_eq!(body, "hello world");
    }
    // The burst waits for one new connection; before, each of its calls opened its own.
    let text = petra.metrics().await;
    let accepted: usize = metric(&text, "connections_accepted_total");
    assert!(
        accepted <= 3,
        "{accepted} connections for one call and a burst of 19 after the first one's age"
    );
    klaus.stop().await;
    petra.stop().await;
}
