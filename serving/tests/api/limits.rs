//! Resource limits: the connection cap of each listener, and request heads refused by the
//! protocol layer once they are larger than what the application takes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rustls::version::TLS13;
use serving::testing::{
    Files, Running, TestPki, TlsStream, client_builder, loopback, plain_client, spawn, tls_connect,
    tls_serve_args,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connection over the cap is watched to show that it is not served. A negative
/// can only be shown over a while; on a loaded machine a served connection takes a few ms.
const NOT_SERVED_FOR: Duration = Duration::from_millis(500);

/// The hello service with mutual TLS and the given main listener cap.
async fn start(pki: &TestPki, max_connections: usize, admin_max_connections: usize) -> Running {
    let args = tls_serve_args(pki, Some(&pki.ca_file));
    let mut service =
        crate::helpers::hello_service(loopback(), &args).expect("valid configuration");
    service.limits.max_connections = max_connections;
    service.limits.admin_max_connections = admin_max_connections;
    spawn(service).await
}

/// An HTTP/1.1 connection with one `GET /` answered `hello` on it, kept open.
async fn served(addr: SocketAddr, pki: &TestPki) -> TlsStream {
    served_with(addr, &pki.ca_file, &pki.klaus).await
}

/// [`served`] with the CA file and client identity given apart, for a spawned task.
async fn served_with(addr: SocketAddr, ca: &Path, identity: &Files) -> TlsStream {
    let mut tls = tls_connect(addr, ca, Some(identity), &[&TLS13], &[b"http/1.1"])
        .await
        .expect("TLS connection");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"hello") {
        let n = tls.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    tls
}

/// The value of the metric line that starts with `series` (name and labels).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_waits_until_one_closes() {
    let pki = TestPki::new();
    let server = start(&pki, 2, 64).await;
    let addr = server.main_addr;
    let first = served(addr, &pki).await;
    let _second = served(addr, &pki).await;

    let (ca, klaus) = (pki.ca_file.clone(), pki.klaus.clone());
    let mut third = tokio::spawn(async move { served_with(addr, &ca, &klaus).await });
    assert!(
        tokio::time::timeout(NOT_SERVED_FOR, &mut third)
            .await
            .is_err(),
        "a third connection was served while the cap of 2 was held"
    );
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, r#"listener_connections_open{listener="main"}"#),
        2.0
    );
    assert_eq!(
        metric(&text, r#"listener_connections_max{listener="main"}"#),
        2.0
    );
    assert!(metric(&text, r#"listener_cap_pauses_total{listener="main"}"#) >= 1.0);

    // Once a connection closes, the waiting one is accepted and served.
    drop(first);
    let third = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the waiting connection was served once one closed")
        .expect("served");
    drop(third);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_while_the_main_one_is_at_its_cap() {
    let pki = TestPki::new();
    let server = start(&pki, 1, 64).await;
    let _held = served(server.main_addr, &pki).await;
    let livez = format!("{}/livez", server.admin_url());
    let answer = tokio::time::timeout(Duration::from_secs(2), plain_client().get(&livez).send())
        .await
        .expect("/livez answered within 2 s")
        .expect("/livez");
    assert_eq!(answer.status().as_u16(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_has_a_cap_of_its_own() {
    let pki = TestPki::new();
    let server = start(&pki, 16, 2).await;
    // Two idle connections hold the admin listener's cap (connections are accepted in the
    // order they came, so these two are).
    let first = TcpStream::connect(server.admin_addr)
        .await
        .expect("connect");
    let _second = TcpStream::connect(server.admin_addr)
        .await
        .expect("connect");
    let livez = format!("{}/livez", server.admin_url());
    let waiting = tokio::spawn(async move { plain_client().get(&livez).send().await });
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(NOT_SERVED_FOR, &mut waiting)
            .await
            .is_err(),
        "a third admin connection was served while the cap of 2 was held"
    );
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered once a connection closed")
        .expect("task")
        .expect("/livez");
    assert_eq!(answer.status().as_u16(), 200);
    server.stop().await;
}

/// `count` header fields named `x-hNN` whose values are `len` bytes long.
fn fields(count: usize, len: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| (format!("x-h{i:02}"), "v".repeat(len)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_just_under_the_application_limit_is_served_on_both_versions() {
    let pki = TestPki::new();
    let server = start(&pki, 16, 64).await;
    // 90 fields of 5 + 85 bytes, with `host`: 8,113 bytes of names and values, under the
    // application's 8,192; as HTTP/2 counts them (32 more a field) about 11 KiB.
    let fields = fields(90, 85);
    for http1 in [true, false] {
        let mut builder = client_builder(&pki.ca_file, Some(&pki.klaus));
        if http1 {
            builder = builder.http1_only();
        }
        let mut request = builder.build().expect("client").get(server.https_url());
        for (name, value) in &fields {
            request = request.header(name, value);
        }
        let answer = request.send().await.expect("request");
        assert_eq!(answer.status().as_u16(), 200, "HTTP/1.1 only: {http1}");
        assert_eq!(
            answer.version(),
            if http1 {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            }
        );
        assert_eq!(answer.text().await.expect("body"), "hello");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_head_over_the_limit_is_refused_by_the_protocol_layer() {
    let pki = TestPki::new();
    let server = start(&pki, 16, 64).await;
    let mut tls = tls_connect(
        server.main_addr,
        &pki.ca_file,
        Some(&pki.klaus),
        &[&TLS13],
        &[b"http/1.1"],
    )
    .await
    .expect("TLS connection");
    // 20 KiB of fields: over the 16 KiB hyper now buffers, under the 64 KiB it used to.
    let mut head = String::from("GET / HTTP/1.1\r\nHost: localhost\r\n");
    for (name, value) in fields(10, 2048) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = tls.write_all(head.as_bytes()).await;
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut seen)).await;
    let seen = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    // hyper's own answer, before any header map is built: the application's 431 carries a
    // request id.
    assert!(
        seen.is_empty() || (seen.starts_with("http/1.1 431") && !seen.contains("x-request-id")),
        "{seen}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_hpack_block_that_expands_past_the_limit_is_refused() {
    let pki = TestPki::new();
    let server = start(&pki, 16, 64).await;
    let tls = tls_connect(
        server.main_addr,
        &pki.ca_file,
        Some(&pki.klaus),
        &[&TLS13],
        &[b"h2"],
    )
    .await
    .expect("TLS connection");
    let (mut h2, connection) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    // One 3,000-byte field sent 12 times: HPACK sends it once and then as a one-byte index
    // into its table, so that a block of about 3 KB decodes to 12 × 3,037 = 36 KB as HTTP/2
    // counts it: over the 16 KiB limit, under the 64 KiB of before.
    let mut request = http::Request::get("https://localhost/");
    let value = "a".repeat(3000);
    for _ in 0..12 {
        request = request.header("x-big", value.as_str());
    }
    let request = request.body(()).expect("request");
    let (answer, _) = h2.send_request(request, true).expect("send");
    match answer.await {
        Ok(answer) => {
            assert_eq!(answer.status().as_u16(), 431);
            assert!(
                !answer.headers().contains_key("x-request-id"),
                "the application answered, so the header map was built: {answer:?}"
            );
        }
        Err(err) => assert_eq!(err.reason(), Some(h2::Reason::REFUSED_STREAM), "{err}"),
    }
    // The connection stays usable.
    let (answer, _) = h2
        .send_request(
            http::Request::get("https://localhost/")
                .body(())
                .expect("request"),
            true,
        )
        .expect("send");
    assert_eq!(answer.await.expect("answer").status().as_u16(), 200);
    server.stop().await;
}
