//! `GET /` over HTTPS with mutual TLS, the refusals, the error statuses, request ids and
//! metrics of Petra's routes. TLS versions, client identities and the server's limits are
//! tested in serving/tests.

use reqwest::StatusCode;
use rustls::version::TLS13;

use serving::testing::{TestPki, client, client_builder, handshake, plain_client};

use crate::helpers::spawn_petra;

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
