//! The solo connection: calls that come one at a time go over one HTTP/1.1 connection, calls
//! that overlap over HTTP/2, and a call whose solo connection fails is answered over HTTP/2.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::Version;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use klaus::PetraArgs;
use serving::testing::{Running, TestPki, loopback, wait_until};
use tokio::io::AsyncReadExt;

use crate::helpers::{
    concurrent_gets, get as http_get, petra_acceptor, spawn_fake_petra, spawn_klaus_calling,
    spawn_klaus_for,
};

/// A Petra stand-in that answers `hello` and keeps the protocol version of every request. A
/// request whose id is `slow` is answered after 1.5 s.
async fn version_recording_petra(pki: &TestPki) -> (Running, Arc<Mutex<Vec<Version>>>) {
    let seen: Arc<Mutex<Vec<Version>>> = Arc::default();
    let record = Arc::clone(&seen);
    let router = Router::new().route(
        "/",
        get(move |request: Request| {
            record.lock().expect("lock").push(request.version());
            let slow = request
                .headers()
                .get("x-request-id")
                .is_some_and(|id| id == "slow");
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                "hello"
            }
        }),
    );
    (spawn_fake_petra(pki, &pki.petra, router).await, seen)
}

/// Lone calls through Klaus at `url` until one reaches Petra over HTTP/1.1: the solo
/// connection opens in the background after a few, and until it is up they go over HTTP/2.
async fn until_a_call_goes_over_http11(url: &str, seen: &Mutex<Vec<Version>>) {
    wait_until(
        "a call reaches Petra over HTTP/1.1",
        Duration::from_secs(10),
        || async {
            assert_eq!(http_get(url).await.2, "hello world");
            seen.lock().expect("lock").contains(&Version::HTTP_11)
        },
    )
    .await;
}

fn taken(seen: &Mutex<Vec<Version>>) -> Vec<Version> {
    std::mem::take(&mut *seen.lock().expect("lock"))
}

#[tokio::test]
async fn calls_one_at_a_time_go_over_one_http11_connection_and_overlapping_calls_over_http2() {
    let pki = TestPki::new();
    let (petra, seen) = version_recording_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    let url = klaus.http_url();
    until_a_call_goes_over_http11(&url, &seen).await;
    let before = taken(&seen);
    assert_eq!(
        before[0],
        Version::HTTP_2,
        "the first call goes over HTTP/2: {before:?}"
    );

    for _ in 0..20 {
        assert_eq!(http_get(&url).await.2, "hello world");
    }
    assert_eq!(
        taken(&seen),
        vec![Version::HTTP_11; 20],
        "calls one at a time, each over the solo connection"
    );

    for body in concurrent_gets(&url, 19).await {
        assert_eq!(body, "hello world");
    }
    let overlapping = taken(&seen);
    let http2 = overlapping
        .iter()
        .filter(|&&version| version == Version::HTTP_2)
        .count();
    assert!(
        overlapping.len() == 19 && http2 >= 18,
        "only one call at a time holds the solo connection: {overlapping:?}"
    );
    let text = petra.metrics().await;
    assert!(
        text.contains("connections_accepted_total 2\n"),
        "one HTTP/2 and one HTTP/1.1 connection: {text}"
    );

    // Unused for longer than it counts as warm, it is closed and the next call goes over
    // HTTP/2: the time passing is what is tested.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(http_get(&url).await.2, "hello world");
    assert_eq!(
        taken(&seen),
        vec![Version::HTTP_2],
        "a cold solo connection is not used"
    );
    klaus.stop().await;
    petra.stop().await;
}

/// A slow call through Klaus at `url` that its client gives up on after `patience`; it went
/// over the solo connection.
async fn give_up_on_a_slow_call(url: &str, patience: Duration, seen: &Mutex<Vec<Version>>) {
    taken(seen);
    let gave_up = serving::testing::plain_client()
        .get(url)
        .header("x-request-id", "slow")
        .timeout(patience)
        .send()
        .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    assert_eq!(
        taken(seen),
        [Version::HTTP_11],
        "the slow call went over HTTP/1.1"
    );
}

#[tokio::test]
async fn a_call_its_client_gave_up_on_pauses_the_solo_connection_only_after_a_long_wait() {
    let pki = TestPki::new();
    let (petra, seen) = version_recording_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    let url = klaus.http_url();
    until_a_call_goes_over_http11(&url, &seen).await;
    // A client gives up on a call 50 ms in, as a timed load generator does at the end of its
    // run: Klaus drops the call and the solo connection, and the next lone calls open another
    // at once. With a pause for every call dropped, the calls of the next second went over
    // HTTP/2 (dozens of them).
    give_up_on_a_slow_call(&url, Duration::from_millis(50), &seen).await;
    let mut calls = 0;
    while !seen.lock().expect("lock").contains(&Version::HTTP_11) {
        assert_eq!(http_get(&url).await.2, "hello world");
        calls += 1;
        assert!(
            calls <= 20,
            "{calls} lone calls went over HTTP/2 after a call was cut short"
        );
    }
    // A client that gave up after waiting 600 ms for an answer that never came may be telling
    // of a Petra that does not answer HTTP/1.1: no solo connection for a second.
    until_a_call_goes_over_http11(&url, &seen).await;
    give_up_on_a_slow_call(&url, Duration::from_millis(600), &seen).await;
    let since = Instant::now();
    until_a_call_goes_over_http11(&url, &seen).await;
    assert!(
        since.elapsed() >= Duration::from_millis(900),
        "a solo connection again {:?} after a call that waited 600 ms was cut short",
        since.elapsed()
    );
    klaus.stop().await;
}

#[tokio::test]
async fn lone_calls_keep_the_http2_connection_in_use() {
    let pki = TestPki::new();
    let (petra, seen) = version_recording_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    let url = klaus.http_url();
    until_a_call_goes_over_http11(&url, &seen).await;
    taken(&seen);
    // Without a call now and then, the HTTP/2 connection would idle out of its pool (50 s)
    // while every lone call went over HTTP/1.1, and the next burst would open connections on
    // its calls' path.
    let started = Instant::now();
    wait_until(
        "a lone call goes over HTTP/2 again",
        Duration::from_secs(15),
        || async {
            assert_eq!(http_get(&url).await.2, "hello world");
            seen.lock().expect("lock").contains(&Version::HTTP_2)
        },
    )
    .await;
    let elapsed = started.elapsed();
    let versions = taken(&seen);
    let http11 = versions.iter().filter(|&&v| v == Version::HTTP_11).count();
    assert!(
        elapsed >= Duration::from_secs(3) && http11 + 1 == versions.len(),
        "one lone call over HTTP/2 after {elapsed:?}, the {} before it over HTTP/1.1: {http11}",
        versions.len() - 1
    );
    let text = petra.metrics().await;
    assert!(
        text.contains("connections_accepted_total 2\n"),
        "the same two connections: {text}"
    );
    klaus.stop().await;
    petra.stop().await;
}

/// What a stand-in Petra does with an HTTP/1.1 connection.
#[derive(Debug, Clone, Copy)]
enum Http11 {
    /// Reads the first request and closes the connection, unanswered; counts the request.
    DropsTheRequest,
    /// Reads the first request and never answers it, the connection left open; counts the
    /// request.
    HangsOnTheRequest,
    /// Closes the connection right after the TLS handshake; counts the connection.
    ClosesAtOnce,
}

/// A Petra that breaks HTTP/1.1 as `http11` says and whose HTTP/2 connections answer `hello`:
/// where it listens, and how many HTTP/1.1 requests or connections it broke.
async fn petra_breaking_http11(pki: &TestPki, http11: Http11) -> (String, Arc<AtomicUsize>) {
    let acceptor = petra_acceptor(pki);
    let listener = tokio::net::TcpListener::bind(loopback())
        .await
        .expect("bind");
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().expect("addr").port()
    );
    let broken = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&broken);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count) = (acceptor.clone(), Arc::clone(&count));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let router = Router::new().route("/", get(|| async { "hello" }));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                        .await;
                    return;
                }
                let counts = match http11 {
                    Http11::ClosesAtOnce => true,
                    Http11::DropsTheRequest | Http11::HangsOnTheRequest => {
                        let mut head = [0; 1024];
                        tls.read(&mut head).await.is_ok_and(|read| read > 0)
                    }
                };
                if counts {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                if let Http11::HangsOnTheRequest = http11 {
                    // Until Klaus closes it.
                    let mut rest = [0; 1024];
                    while tls.read(&mut rest).await.is_ok_and(|read| read > 0) {}
                }
            });
        }
    });
    (url, broken)
}

#[tokio::test]
async fn a_call_whose_solo_connection_fails_is_answered_over_http2_and_the_connection_waits() {
    let pki = TestPki::new();
    let (petra_url, dropped) = petra_breaking_http11(&pki, Http11::DropsTheRequest).await;
    let klaus = spawn_klaus_calling(&pki, &petra_url).await;
    let url = klaus.http_url();
    let started = Instant::now();
    let calls = AtomicUsize::new(0);
    // Every call is answered, whatever happens to the solo connection under it.
    wait_until(
        "two calls went over the solo connection",
        Duration::from_secs(15),
        || async {
            let (status, _, body) = http_get(&url).await;
            assert_eq!((status, body.as_str()), (200, "hello world"));
            calls.fetch_add(1, Ordering::SeqCst);
            dropped.load(Ordering::SeqCst) >= 2
        },
    )
    .await;
    let elapsed = started.elapsed();
    // After a failed call the connection is not opened again for a second: without that, every
    // eighth call would try it.
    let (tries, calls) = (dropped.load(Ordering::SeqCst), calls.load(Ordering::SeqCst));
    assert!(
        elapsed >= Duration::from_secs(1) && tries as u64 <= elapsed.as_secs() + 2,
        "{tries} calls over a failing solo connection in {elapsed:?} ({calls} calls)"
    );
    let text = klaus.metrics().await;
    assert!(
        text.contains(&format!(r#"petra_calls_total{{outcome="ok"}} {calls}"#)),
        "every call succeeded: {text}"
    );
    klaus.stop().await;
}

#[tokio::test]
async fn a_solo_call_that_reaches_its_deadline_keeps_the_connection_shut_for_a_second() {
    let pki = TestPki::new();
    let (petra_url, hung) = petra_breaking_http11(&pki, Http11::HangsOnTheRequest).await;
    let klaus = crate::helpers::spawn_klaus(&PetraArgs {
        petra_timeout_ms: 300,
        ..crate::helpers::petra_args(&petra_url, Some(pki.ca_file.clone()), Some(&pki.klaus))
    })
    .await;
    let url = klaus.http_url();
    // Lone calls for 2.5 s: a call over the hanging connection ends at its 300 ms deadline
    // (504); the others go over HTTP/2.
    let started = Instant::now();
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_millis(2500) {
        statuses.push(http_get(&url).await.0);
    }
    let hung = hung.load(Ordering::SeqCst);
    let timeouts = statuses.iter().filter(|&&status| status == 504).count();
    assert!(
        statuses
            .iter()
            .all(|&status| status == 200 || status == 504),
        "{statuses:?}"
    );
    // Each hang is followed by a second without the connection: without it, a new one was
    // opened after the next eight calls, and every ninth call hung (7 in 2.5 s).
    assert!(
        (1..=3).contains(&hung) && timeouts <= hung,
        "{hung} calls hung on the solo connection, {timeouts} timed out, in {} calls",
        statuses.len()
    );
    klaus.stop().await;
}

#[tokio::test]
async fn a_solo_connection_closed_before_its_first_call_waits_before_the_next() {
    let pki = TestPki::new();
    let (petra_url, opened) = petra_breaking_http11(&pki, Http11::ClosesAtOnce).await;
    let klaus = spawn_klaus_calling(&pki, &petra_url).await;
    let url = klaus.http_url();
    // Lone calls for 2 s: without the wait, every call after the eighth opened one (124 in
    // 2 s, seen in review).
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let (status, _, body) = http_get(&url).await;
        assert_eq!((status, body.as_str()), (200, "hello world"));
        calls += 1;
    }
    let opened = opened.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&opened),
        "{opened} solo connections opened in 2 s of lone calls ({calls} calls)"
    );
    klaus.stop().await;
}
