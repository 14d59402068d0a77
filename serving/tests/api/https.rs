//! TLS versions and client identities on the main listener, the admin listener through a
//! shutdown, and connections closed at their maximum age.

use reqwest::StatusCode;
use rustls::version::{TLS12, TLS13};
use std::time::Duration;

use serving::ServeArgs;
use serving::certs::Usage;
use serving::testing::{TestPki, client, handshake, plain_client, tls_serve_args, wait_until};

use crate::helpers::{hello_service, spawn_hello, spawn_with};

#[tokio::test]
async fn speaks_only_tls_1_3_unless_tls_min_version_allows_1_2() {
    let pki = TestPki::new();
    let server = spawn_hello(&pki).await;
    let shake = handshake(
        server.main_addr,
        &pki.ca_file,
        Some(&pki.klaus),
        &[&TLS13],
        &[b"h2", b"http/1.1"],
    )
    .await
    .expect("handshake");
    assert_eq!(shake.version, Some(TLS13.version));
    assert_eq!(shake.alpn.as_deref(), Some(&b"h2"[..]));
    // A client that speaks only TLS 1.2, where its certificate would cross in clear.
    let err = handshake(
        server.main_addr,
        &pki.ca_file,
        Some(&pki.klaus),
        &[&TLS12],
        &[b"h2", b"http/1.1"],
    )
    .await
    .expect_err("a TLS 1.2-only client must be refused by default");
    assert!(err.contains("ProtocolVersion"), "{err}");
    server.stop().await;

    let mut old = tls_serve_args(&pki, Some(&pki.ca_file));
    old.tls_min_version = serving::tls::MinVersion::Tls12;
    let server = spawn_with(old).await;
    for version in [&TLS12, &TLS13] {
        let shake = handshake(
            server.main_addr,
            &pki.ca_file,
            Some(&pki.klaus),
            &[version],
            &[b"h2", b"http/1.1"],
        )
        .await
        .expect("handshake with TLS_MIN_VERSION=1.2");
        assert_eq!(shake.version, Some(version.version));
    }
    server.stop().await;
}

#[tokio::test]
async fn accepts_only_the_client_identities_in_tls_client_allowed_names() {
    let pki = TestPki::new();
    let mut settings = tls_serve_args(&pki, Some(&pki.ca_file));
    settings.tls_client_allowed_names = Some(format!(
        " {} , Old-Klaus.example ",
        serving::certs::klaus_id("petra-klaus")
    ));
    let server = spawn_with(settings).await;
    let day = time::Duration::days(1);
    let now = time::OffsetDateTime::now_utc();
    // From the same CA, valid in every other way, but someone else.
    let intruder = pki.issue(
        "intruder",
        &[
            "intruder",
            "spiffe://petra-klaus/ns/petra-klaus/sa/intruder",
        ],
        Usage::Client,
        now - day,
        now + day,
    );
    // A name only in the common name does not count; a DNS SAN does, in any case.
    let by_dns = pki.issue(
        "by-dns",
        &["old-klaus.example"],
        Usage::Client,
        now - day,
        now + day,
    );
    for (what, identity, allowed) in [
        ("Klaus's SPIFFE ID", &pki.klaus, true),
        ("an allowed DNS name", &by_dns, true),
        ("another identity from the same CA", &intruder, false),
    ] {
        let result = handshake(
            server.main_addr,
            &pki.ca_file,
            Some(identity),
            &[&TLS13],
            &[b"http/1.1"],
        )
        .await;
        match (allowed, result) {
            (true, Ok(_)) => {}
            (false, Err(err)) => assert!(err.contains("AccessDenied"), "{what}: {err}"),
            (_, result) => panic!("{what}: {result:?}"),
        }
    }
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("tls_client_certificates_refused_total{reason=\"name_not_allowed\"} 1\n"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn tls_client_allowed_names_needs_client_certificates_and_a_name() {
    let pki = TestPki::new();
    let mut settings = tls_serve_args(&pki, None);
    settings.tls_client_allowed_names = Some("klaus".to_owned());
    let err = hello_service(serving::testing::loopback(), &settings).expect_err("no CA");
    assert_eq!(err.var, "TLS_CLIENT_ALLOWED_NAMES");
    for bad in [" , ", "*.example", "klaus name"] {
        let mut settings = tls_serve_args(&pki, Some(&pki.ca_file));
        settings.tls_client_allowed_names = Some(bad.to_owned());
        let err = hello_service(serving::testing::loopback(), &settings).expect_err(bad);
        assert_eq!(err.var, "TLS_CLIENT_ALLOWED_NAMES", "{bad}: {err}");
    }
}

#[tokio::test]
async fn admin_port_reports_liveness_and_readiness_and_turns_unready_on_shutdown() {
    let pki = TestPki::new();
    let mut args = tls_serve_args(&pki, Some(&pki.ca_file));
    args.shutdown_delay_seconds = 30;
    let mut server = crate::helpers::spawn_with(args).await;
    let admin = plain_client();
    let admin_url = server.admin_url();
    let get = |path: &str| admin.get(format!("{admin_url}{path}")).send();
    assert_eq!(get("/livez").await.expect("livez").status(), StatusCode::OK);
    assert_eq!(
        get("/readyz").await.expect("readyz").status(),
        StatusCode::OK
    );
    assert_eq!(
        get("/nope").await.expect("404").status(),
        StatusCode::NOT_FOUND
    );

    server.begin_shutdown();
    serving::testing::wait_until(
        "readiness turns false",
        std::time::Duration::from_secs(5),
        || async { !server.health.is_ready() },
    )
    .await;
    let readyz = get("/readyz").await.expect("readyz");
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get("/livez").await.expect("livez").status(), StatusCode::OK);
    // During the shutdown delay the main listener still serves.
    let hello = client(&pki.ca_file, Some(&pki.klaus))
        .get(server.https_url())
        .send()
        .await
        .expect("hello");
    assert_eq!(hello.text().await.expect("body"), "hello");
}

#[tokio::test]
async fn closes_an_http2_connection_gracefully_at_its_maximum_age() {
    let pki = TestPki::new();
    let server = spawn_with(ServeArgs {
        max_connection_age_seconds: 1,
        ..tls_serve_args(&pki, Some(&pki.ca_file))
    })
    .await;
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let url = server.https_url();
    let hello = || async {
        let response = client.get(&url).send().await.expect("request");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.text().await.expect("body"), "hello");
    };
    let metric = |name: &'static str| {
        let server = &server;
        async move {
            let text = server.metrics().await;
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        }
    };
    let started = std::time::Instant::now();
    hello().await;
    hello().await;
    assert_eq!(metric("connections_accepted_total").await, 1);
    // The client keeps the connection; the server sends GOAWAY at 0.9 to 1.1 s and closes it.
    wait_until(
        "the server closed the aged connection",
        Duration::from_secs(3),
        || async { metric("connections_open").await == 0 },
    )
    .await;
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed after {closed_after:?}, before its maximum age"
    );
    // The client notices the GOAWAY and opens a new connection: no request fails.
    hello().await;
    assert_eq!(metric("connections_accepted_total").await, 2);
    server.stop().await;
}
