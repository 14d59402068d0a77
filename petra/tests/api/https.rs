//! `GET /` over HTTPS with mutual TLS, the refusals, and the error statuses.

use reqwest::StatusCode;
use rustls::version::{TLS12, TLS13};
use std::time::Duration;

use serving::ServeArgs;
use serving::certs::Usage;
use serving::testing::{TestPki, client, client_builder, handshake, plain_client, wait_until};

use crate::helpers::{args, spawn_petra, spawn_with};

#[tokio::test]
async fn says_hello_over_mutual_tls_on_http1_and_http2() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    for http1 in [true, false] {
        let mut builder = client_builder(&pki.ca_file, Some(&pki.klaus));
        if http1 {
            builder = builder.http1_only();
        }
        let response = builder
            .build()
            .expect("client")
            .get(petra.https_url())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.version(),
            if http1 {
                reqwest::Version::HTTP_11
            } else {
                reqwest::Version::HTTP_2
            }
        );
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; charset=utf-8"
        );
        assert!(response.headers().contains_key("x-request-id"));
        assert_eq!(response.text().await.expect("body"), "hello");
    }
    petra.stop().await;
}

#[tokio::test]
async fn speaks_only_tls_1_3_unless_tls_min_version_allows_1_2() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let shake = handshake(
        petra.main_addr,
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
        petra.main_addr,
        &pki.ca_file,
        Some(&pki.klaus),
        &[&TLS12],
        &[b"h2", b"http/1.1"],
    )
    .await
    .expect_err("a TLS 1.2-only client must be refused by default");
    assert!(err.contains("ProtocolVersion"), "{err}");
    petra.stop().await;

    let mut old = args(&pki, Some(&pki.ca_file));
    old.tls_min_version = serving::tls::MinVersion::Tls12;
    let petra = spawn_with(old).await;
    for version in [&TLS12, &TLS13] {
        let shake = handshake(
            petra.main_addr,
            &pki.ca_file,
            Some(&pki.klaus),
            &[version],
            &[b"h2", b"http/1.1"],
        )
        .await
        .expect("handshake with TLS_MIN_VERSION=1.2");
        assert_eq!(shake.version, Some(version.version));
    }
    petra.stop().await;
}

#[tokio::test]
async fn accepts_only_the_client_identities_in_tls_client_allowed_names() {
    let pki = TestPki::new();
    let mut settings = args(&pki, Some(&pki.ca_file));
    settings.tls_client_allowed_names = Some(format!(
        " {} , Old-Klaus.example ",
        serving::certs::klaus_id("petra-klaus")
    ));
    let petra = spawn_with(settings).await;
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
            petra.main_addr,
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
    let metrics = petra.metrics().await;
    assert!(
        metrics.contains("tls_client_certificates_refused_total{reason=\"name_not_allowed\"} 1\n"),
        "{metrics}"
    );
    petra.stop().await;
}

#[tokio::test]
async fn tls_client_allowed_names_needs_client_certificates_and_a_name() {
    let pki = TestPki::new();
    let mut settings = args(&pki, None);
    settings.tls_client_allowed_names = Some("klaus".to_owned());
    let err = petra::service(serving::testing::loopback(), &settings).expect_err("no CA");
    assert_eq!(err.var, "TLS_CLIENT_ALLOWED_NAMES");
    for bad in [" , ", "*.example", "klaus name"] {
        let mut settings = args(&pki, Some(&pki.ca_file));
        settings.tls_client_allowed_names = Some(bad.to_owned());
        let err = petra::service(serving::testing::loopback(), &settings).expect_err(bad);
        assert_eq!(err.var, "TLS_CLIENT_ALLOWED_NAMES", "{bad}: {err}");
    }
}

#[tokio::test]
async fn refuses_clients_without_a_certificate_or_with_one_from_another_ca() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let foreign = serving::testing::foreign_client(pki.dir.path());
    for (what, identity) in [
        ("no client certificate", None),
        ("a certificate from another CA", Some(&foreign)),
    ] {
        for version in [&TLS13] {
            let result = handshake(
                petra.main_addr,
                &pki.ca_file,
                identity,
                &[version],
                &[b"http/1.1"],
            )
            .await;
            let err = result.expect_err(what);
            assert!(
                err.contains("CertificateRequired")
                    || err.contains("UnknownCA")
                    || err.contains("BadCertificate")
                    || err.contains("Decrypt"),
                "{what} over {version:?}: {err}"
            );
        }
        let response = client(&pki.ca_file, identity)
            .get(petra.https_url())
            .send()
            .await;
        assert!(response.is_err(), "{what}: Petra answered {response:?}");
    }
    // The refused connections never reached the router.
    let metrics = plain_client()
        .get(format!("{}/metrics", petra.admin_url()))
        .send()
        .await
        .expect("metrics");
    let text = metrics.text().await.expect("body");
    assert!(!text.contains("http_requests_total{"), "{text}");
    petra.stop().await;
}

#[tokio::test]
async fn answers_404_405_and_431_with_short_plain_bodies() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let url = petra.https_url();
    let cases = [
        (
            client.get(format!("{url}/nope")),
            StatusCode::NOT_FOUND,
            "not found\n",
        ),
        (
            client.post(&url),
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
        ),
        (
            client.delete(&url),
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
        ),
        (
            client.get(&url).header("x-big", "a".repeat(12 * 1024)),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large\n",
        ),
    ];
    for (request, status, body) in cases {
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; charset=utf-8"
        );
        assert_eq!(response.text().await.expect("body"), body);
    }
    // Headers too large even for the connection's buffer are refused by hyper itself.
    let huge = client
        .get(&url)
        .header("x-huge", "a".repeat(100 * 1024))
        .version(reqwest::Version::HTTP_11)
        .send()
        .await;
    assert!(
        huge.is_err()
            || huge.is_ok_and(|r| r.status() == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    );
    petra.stop().await;
}

#[tokio::test]
async fn keeps_a_sane_request_id_and_replaces_a_bad_one() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let kept = client
        .get(petra.https_url())
        .header("x-request-id", "abc-123")
        .send()
        .await
        .expect("request");
    assert_eq!(kept.headers()["x-request-id"], "abc-123");
    let replaced = client
        .get(petra.https_url())
        .header("x-request-id", "a b")
        .send()
        .await
        .expect("request");
    assert_ne!(replaced.headers()["x-request-id"], "a b");
    assert_eq!(replaced.headers()["x-request-id"].len(), 36);
    petra.stop().await;
}

#[tokio::test]
async fn counts_requests_by_route_template_method_and_status() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let client = client(&pki.ca_file, Some(&pki.klaus));
    for path in ["/", "/", "/a/b/c"] {
        client
            .get(format!("{}{path}", petra.https_url()))
            .send()
            .await
            .expect("request");
    }
    let text = petra.metrics().await;
    assert!(
        text.contains(r#"http_requests_total{route="/",method="GET",status="200"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"http_requests_total{route="unmatched",method="GET",status="404"} 1"#),
        "{text}"
    );
    assert!(
        !text.contains("/a/b/c"),
        "raw paths must not become labels: {text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
    petra.stop().await;
}

#[tokio::test]
async fn admin_port_reports_liveness_and_readiness_and_turns_unready_on_shutdown() {
    let pki = TestPki::new();
    let mut args = crate::helpers::args(&pki, Some(&pki.ca_file));
    args.shutdown_delay_seconds = 30;
    let mut petra = crate::helpers::spawn_with(args).await;
    let admin = plain_client();
    let admin_url = petra.admin_url();
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

    petra.begin_shutdown();
    serving::testing::wait_until(
        "readiness turns false",
        std::time::Duration::from_secs(5),
        || async { !petra.health.is_ready() },
    )
    .await;
    let readyz = get("/readyz").await.expect("readyz");
    assert_eq!(readyz.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get("/livez").await.expect("livez").status(), StatusCode::OK);
    // During the shutdown delay the main listener still serves.
    let hello = client(&pki.ca_file, Some(&pki.klaus))
        .get(petra.https_url())
        .send()
        .await
        .expect("hello");
    assert_eq!(hello.text().await.expect("body"), "hello");
}

#[tokio::test]
async fn closes_an_http2_connection_gracefully_at_its_maximum_age() {
    let pki = TestPki::new();
    let petra = spawn_with(ServeArgs {
        max_connection_age_seconds: 1,
        ..args(&pki, Some(&pki.ca_file))
    })
    .await;
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let url = petra.https_url();
    let hello = || async {
        let response = client.get(&url).send().await.expect("request");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.text().await.expect("body"), "hello");
    };
    let metric = |name: &'static str| {
        let petra = &petra;
        async move {
            let text = petra.metrics().await;
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        }
    };
    let started = std::time::Instant::now();
    hello().await;
    hello().await;
    assert_eq!(metric("connections_accepted_total").await, 1);
    // The client keeps the connection; Petra sends GOAWAY at 0.9 to 1.1 s and closes it.
    wait_until(
        "Petra closed the aged connection",
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
    petra.stop().await;
}
