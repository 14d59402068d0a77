//! Hostile clients are refused or timed out quickly, while normal traffic carries on. Each
//! attack runs next to a stream of normal requests whose p99 is compared with the p99 of the
//! same stream without an attack (printed; RELIABILITY.md has the figures).

use std::time::{Duration, Instant};

use rustls::version::TLS13;
use serving::testing::{Running, TestPki, client, loopback, spawn, tls_connect, tls_serve_args};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The server-side limits the attacks run into, short so that the tests are fast.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// How much later than a limit the connection may close on a loaded CI machine.
const SLACK: Duration = Duration::from_millis(1500);
/// Normal requests sent during each attack.
const NORMAL_REQUESTS: usize = 200;

async fn start(pki: &TestPki) -> Running {
    let args = tls_serve_args(pki, Some(&pki.ca_file));
    let mut service =
        crate::helpers::hello_service(loopback(), &args).expect("valid configuration");
    service.limits.tls_handshake_timeout = HANDSHAKE_TIMEOUT;
    service.limits.header_read_timeout = HEADER_TIMEOUT;
    spawn(service).await
}

/// Sends `NORMAL_REQUESTS` requests one after the other; each must be `200 hello`. Returns
/// the p99 latency.
async fn normal_traffic(pki: &TestPki, server: &Running) -> Duration {
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let mut latencies = Vec::with_capacity(NORMAL_REQUESTS);
    for _ in 0..NORMAL_REQUESTS {
        let started = Instant::now();
        let response = client
            .get(server.https_url())
            .send()
            .await
            .expect("normal request");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.text().await.expect("body"), "hello");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies[(latencies.len() * 99).div_ceil(100) - 1]
}

/// Reads until the server closes the connection and returns what it sent; fails the test if
/// that takes longer than `within`.
async fn until_closed<S: AsyncReadExt + Unpin>(stream: &mut S, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all)
        .await
        .unwrap_or_else(|_| panic!("the server kept the connection open for more than {within:?}"));
    seen
}

/// Runs `attack` next to normal traffic and checks that both behave; prints the figures.
async fn under_attack(name: &str, attack: impl AsyncFnOnce(std::net::SocketAddr, &TestPki)) {
    let pki = TestPki::new();
    let server = start(&pki).await;
    let baseline = normal_traffic(&pki, &server).await;
    let timed_attack = async {
        let started = Instant::now();
        attack(server.main_addr, &pki).await;
        started.elapsed()
    };
    let (took, during) = tokio::join!(timed_attack, normal_traffic(&pki, &server));
    println!(
        "hostile {name}: dealt with in {took:?}; normal p99 {during:?} during the attack, {baseline:?} without"
    );
    // Normal requests all succeeded (normal_traffic asserts each); their tail stays sane.
    assert!(
        during < Duration::from_secs(1),
        "{name}: normal p99 {during:?} during the attack"
    );
    server.stop().await;
}

async fn mtls(addr: std::net::SocketAddr, pki: &TestPki) -> serving::testing::TlsStream {
    tls_connect(
        addr,
        &pki.ca_file,
        Some(&pki.klaus),
        &[&TLS13],
        &[b"http/1.1"],
    )
    .await
    .expect("TLS connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off_at_the_header_timeout() {
    under_attack("slowloris", async |addr, pki: &TestPki| {
        let mut tls = mtls(addr, pki).await;
        let started = Instant::now();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .expect("write");
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        let closed = loop {
            ticks.tick().await;
            if tls.write_all(b"X-Slow: 1\r\n").await.is_err() {
                break started.elapsed();
            }
            let mut probe = [0u8; 1];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), tls.read(&mut probe)).await
            {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < HEADER_TIMEOUT + SLACK,
                "slowloris still connected after {:?}",
                started.elapsed()
            );
        };
        assert!(
            closed >= HEADER_TIMEOUT - Duration::from_millis(100),
            "closed too early: {closed:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_does_not_hold_the_connection() {
    under_attack("slow body", async |addr, pki: &TestPki| {
        let mut tls = mtls(addr, pki).await;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n")
            .await
            .expect("write");
        let trickle = async {
            for _ in 0..100 {
                if tls.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        // The answer does not wait for the body, and the connection does not stay open for
        // the whole trickle (10 s).
        let _ = tokio::time::timeout(HEADER_TIMEOUT + SLACK, trickle).await;
        let seen = until_closed(&mut tls, SLACK).await;
        assert!(
            seen.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    under_attack("oversized headers", async |addr, pki: &TestPki| {
        let mut tls = mtls(addr, pki).await;
        let request = format!(
            "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
            "a".repeat(200 * 1024)
        );
        let _ = tls.write_all(request.as_bytes()).await;
        let seen = until_closed(&mut tls, SLACK).await;
        assert!(
            seen.starts_with(b"HTTP/1.1 431"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_on_get_is_not_read() {
    under_attack("large body on GET", async |addr, pki: &TestPki| {
        let mut tls = mtls(addr, pki).await;
        let size = 64 * 1024 * 1024;
        tls.write_all(
            format!("GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {size}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let chunk = vec![b'x'; 64 * 1024];
        let started = Instant::now();
        let mut sent = 0;
        while sent < size && started.elapsed() < Duration::from_secs(5) {
            if tls.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        assert!(
            sent < size,
            "the server read all {size} bytes of a body it has no use for"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_http_gets_400_and_a_closed_connection() {
    under_attack("invalid HTTP", async |addr, pki: &TestPki| {
        let mut tls = mtls(addr, pki).await;
        tls.write_all(b"HELLO THERE\r\n\r\n").await.expect("write");
        let seen = until_closed(&mut tls, SLACK).await;
        assert!(
            seen.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_is_refused() {
    under_attack("TLS garbage", async |addr, _pki: &TestPki| {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let garbage: Vec<u8> = (0..2048u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let _ = tcp.write_all(&garbage).await;
        let seen = until_closed(&mut tcp, SLACK).await;
        assert!(
            !seen.starts_with(b"HTTP"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_is_refused() {
    under_attack("plain HTTP to TLS", async |addr, _pki: &TestPki| {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let seen = until_closed(&mut tcp, SLACK).await;
        assert!(
            !seen.windows(5).any(|w| w == b"hello"),
            "answered in plain text"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_cut_off() {
    under_attack("stalled handshake", async |addr, _pki: &TestPki| {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let started = Instant::now();
        // Half a ClientHello record header, then silence.
        tcp.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        until_closed(&mut tcp, HANDSHAKE_TIMEOUT + SLACK).await;
        assert!(
            started.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
            "closed too early"
        );
    })
    .await;
}

#[tokio::test]
async fn hostile_request_ids_are_replaced_and_every_answer_says_nosniff() {
    let pki = TestPki::new();
    let server = crate::helpers::spawn_hello(&pki).await;
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let long = "a".repeat(129);
    for id in [
        "<script>alert(1)</script>",
        "\"quoted\"",
        long.as_str(),
        "ünïcode",
    ] {
        let value = reqwest::header::HeaderValue::from_bytes(id.as_bytes()).expect("header value");
        let response = client
            .get(server.https_url())
            .header("x-request-id", value)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 200);
        let answered = response.headers()["x-request-id"].as_bytes();
        assert!(
            answered != id.as_bytes() && serving::propagate::is_valid_request_id(answered),
            "{id:?} answered with {answered:?}"
        );
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    }
    let not_found = client
        .get(format!("{}/nope", server.https_url()))
        .send()
        .await
        .expect("request");
    assert_eq!(not_found.headers()["x-content-type-options"], "nosniff");
    let livez = serving::testing::plain_client()
        .get(format!("{}/livez", server.admin_url()))
        .send()
        .await
        .expect("request");
    assert_eq!(livez.headers()["x-content-type-options"], "nosniff");
    server.stop().await;
}
