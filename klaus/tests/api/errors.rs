//! Every way a call to Petra can fail ends in a fast, specific problem+json answer.

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use serving::certs::Usage;
use serving::testing::{TestPki, wait_until};
use time::OffsetDateTime;

use crate::clients::assert_nothing_internal;
use crate::helpers::{
    get as http_get, petra_args, spawn_fake_petra, spawn_klaus, spawn_klaus_for, spawn_petra,
};

/// Calls Klaus and checks that it answered `status` with a problem whose code is `code`;
/// returns the problem.
async fn expect_problem(url: &str, status: u16, code: &str) -> serde_json::Value {
    let (got, content_type, body) = http_get(url).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem is JSON");
    assert_eq!(problem["status"], status, "{problem}");
    assert_eq!(problem["code"], code, "{problem}");
    assert!(
        problem["title"].is_string() && problem["detail"].is_string(),
        "{problem}"
    );
    problem
}

#[tokio::test]
async fn petra_down_gives_502_in_well_under_a_second() {
    // A port that was just free: nothing listens there.
    let pki = TestPki::new();
    let (url, klaus) = crate::helpers::spawn_klaus_without_petra(&pki).await;
    let started = Instant::now();
    let problem = expect_problem(&klaus.http_url(), 502, "petra_unreachable").await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("refused"), "{detail}");
    assert_nothing_internal(&problem, &url);
    // Klaus stays ready: readiness does not depend on Petra.
    assert_eq!(
        http_get(&format!("{}/readyz", klaus.admin_url())).await.0,
        200
    );
    let text = klaus.metrics().await;
    assert!(
        text.contains(r#"petra_calls_total{outcome="unreachable"} 1"#),
        "{text}"
    );
    klaus.stop().await;
}

#[tokio::test]
async fn petra_too_slow_gives_504_at_the_deadline() {
    let pki = TestPki::new();
    let slow = Router::new().route(
        "/",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "hello"
        }),
    );
    let petra = spawn_fake_petra(&pki, &pki.petra, slow).await;
    let mut args = petra_args(
        &petra.https_url(),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    args.petra_timeout_ms = 300;
    let klaus = spawn_klaus(&args).await;
    let started = Instant::now();
    let problem = expect_problem(&klaus.http_url(), 504, "petra_timeout").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(800),
        "took {took:?}"
    );
    assert_nothing_internal(&problem, &petra.https_url());
    assert_eq!(problem["title"], "Gateway Timeout");
    klaus.stop().await;
}

#[tokio::test]
async fn an_untrusted_petra_certificate_gives_502_naming_the_ca() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    // Klaus trusts a different CA than the one that signed Petra's certificate.
    let other = TestPki::new();
    let mut args = petra_args(
        &petra.https_url(),
        Some(other.ca_file.clone()),
        Some(&pki.klaus),
    );
    let klaus = spawn_klaus(&args).await;
    let problem = expect_problem(&klaus.http_url(), 502, "petra_tls_unknown_ca").await;
    assert_nothing_internal(&problem, &petra.https_url());
    klaus.stop().await;
    // ERROR_DETAIL=verbose, for local use: the detail says where, and what to set.
    args.error_detail = klaus::ErrorDetail::Verbose;
    let klaus = spawn_klaus(&args).await;
    let problem = expect_problem(&klaus.http_url(), 502, "petra_tls_unknown_ca").await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("PETRA_CA_FILE")
            && detail.contains(&format!("localhost:{}", petra.main_addr.port())),
        "{problem}"
    );
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn a_petra_certificate_for_another_name_gives_502_naming_the_name() {
    let pki = TestPki::new();
    let now = OffsetDateTime::now_utc();
    let wrong = pki.issue(
        "wrong",
        &["elsewhere.example"],
        Usage::Server,
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    );
    let petra = spawn_fake_petra(
        &pki,
        &wrong,
        Router::new().route("/", get(|| async { "hello" })),
    )
    .await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    let problem = expect_problem(&klaus.http_url(), 502, "petra_tls_wrong_name").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("not valid for the name"),
        "{problem}"
    );
    assert_nothing_internal(&problem, &petra.https_url());
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn an_expired_petra_certificate_gives_502() {
    let pki = TestPki::new();
    let now = OffsetDateTime::now_utc();
    let expired = pki.issue(
        "expired",
        &["localhost"],
        Usage::Server,
        now - time::Duration::days(10),
        now - time::Duration::days(1),
    );
    let petra = spawn_fake_petra(
        &pki,
        &expired,
        Router::new().route("/", get(|| async { "hello" })),
    )
    .await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    let problem = expect_problem(&klaus.http_url(), 502, "petra_tls_expired").await;
    assert_nothing_internal(&problem, &petra.https_url());
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn petra_refusing_klaus_gives_502_for_no_or_a_foreign_client_certificate() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let foreign = serving::testing::foreign_client(pki.dir.path());
    for identity in [None, Some(&foreign)] {
        let klaus = spawn_klaus(&petra_args(
            &petra.https_url(),
            Some(pki.ca_file.clone()),
            identity,
        ))
        .await;
        let (status, content_type, body) = http_get(&klaus.http_url()).await;
        assert_eq!(
            (status, content_type.as_str()),
            (502, "application/problem+json"),
            "{body}"
        );
        let problem: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let code = problem["code"].as_str().unwrap_or_default();
        assert!(
            matches!(
                code,
                "petra_tls_client_cert_required" | "petra_tls_client_cert_refused"
            ),
            "identity {:?}: {problem}",
            identity.map(|f| &f.cert)
        );
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("client certificate"),
            "{problem}"
        );
        assert_nothing_internal(&problem, &petra.https_url());
        klaus.stop().await;
    }
    petra.stop().await;
}

#[tokio::test]
async fn petra_refusing_klaus_identity_gives_502_client_cert_refused() {
    let pki = TestPki::new();
    let mut args = crate::helpers::serve_args();
    args.tls_cert_file = Some(pki.petra.cert.clone());
    args.tls_key_file = Some(pki.petra.key.clone());
    args.tls_client_ca_file = Some(pki.ca_file.clone());
    // Klaus's certificate is valid and from the CA, but not the identity Petra accepts.
    args.tls_client_allowed_names = Some("spiffe://petra-klaus/ns/other/sa/klaus".to_owned());
    let petra = serving::testing::spawn(
        petra::service(serving::testing::loopback(), &args).expect("valid Petra configuration"),
    )
    .await;
    let klaus = spawn_klaus(&petra_args(
        &petra.https_url(),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    ))
    .await;
    expect_problem(&klaus.http_url(), 502, "petra_tls_client_cert_refused").await;
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn bad_answers_from_petra_give_502() {
    let pki = TestPki::new();
    let fake = Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/failing/",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .route("/binary/", get(|| async { vec![0xff_u8, 0xfe, 0x00] }))
        .route(
            "/huge/",
            get(|| async { "x".repeat(klaus::upstream::MAX_BODY_BYTES + 1) }),
        );
    let petra = spawn_fake_petra(&pki, &pki.petra, fake).await;
    for (prefix, code) in [
        ("failing", "petra_bad_status"),
        ("binary", "petra_body_not_text"),
        ("huge", "petra_body_too_large"),
    ] {
        let url = format!("{}/{prefix}", petra.https_url());
        let klaus = spawn_klaus(&petra_args(
            &url,
            Some(pki.ca_file.clone()),
            Some(&pki.klaus),
        ))
        .await;
        let problem = expect_problem(&klaus.http_url(), 502, code).await;
        assert_nothing_internal(&problem, &url);
        klaus.stop().await;
    }
    petra.stop().await;
}

#[tokio::test]
async fn klaus_recovers_when_petra_comes_back() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    assert_eq!(http_get(&klaus.http_url()).await.2, "hello world");
    let addr = petra.main_addr;
    petra.stop().await;
    expect_problem(&klaus.http_url(), 502, "petra_unreachable").await;

    // Petra returns on the same port.
    let mut args = crate::helpers::serve_args();
    args.tls_cert_file = Some(pki.petra.cert.clone());
    args.tls_key_file = Some(pki.petra.key.clone());
    args.tls_client_ca_file = Some(pki.ca_file.clone());
    let back = serving::testing::spawn(petra::service(addr, &args).expect("config")).await;
    wait_until(
        "Klaus answers hello world again",
        Duration::from_secs(5),
        || async { http_get(&klaus.http_url()).await.2 == "hello world" },
    )
    .await;
    klaus.stop().await;
    back.stop().await;
}

#[tokio::test]
async fn a_petra_that_never_finishes_the_tls_handshake_gives_504_at_the_deadline() {
    // Accepts TCP connections and never says a word: the handshake cannot finish.
    let (addr, held) = crate::helpers::silent_listener("127.0.0.1:0").await;
    let pki = TestPki::new();
    let mut args = petra_args(
        &format!("https://localhost:{}", addr.port()),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    args.petra_timeout_ms = 400;
    let klaus = spawn_klaus(&args).await;
    let started = Instant::now();
    expect_problem(&klaus.http_url(), 504, "petra_timeout").await;
    let took = started.elapsed();
    // Connecting gets half the deadline; the call never outlives the whole of it.
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(900),
        "took {took:?}"
    );
    klaus.stop().await;
    held.abort();
}

#[tokio::test]
async fn a_petra_host_that_does_not_resolve_gives_502_saying_so() {
    let pki = TestPki::new();
    // `.invalid` never resolves (RFC 6761).
    let mut args = petra_args(
        "https://petra.invalid:8443",
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    args.petra_timeout_ms = 10_000;
    let klaus = spawn_klaus(&args).await;
    let problem = expect_problem(&klaus.http_url(), 502, "petra_unreachable").await;
    assert_nothing_internal(&problem, "https://petra.invalid:8443");
    klaus.stop().await;
    args.error_detail = klaus::ErrorDetail::Verbose;
    let klaus = spawn_klaus(&args).await;
    let problem = expect_problem(&klaus.http_url(), 502, "petra_unreachable").await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("does not resolve") && detail.contains("petra.invalid:8443"),
        "{detail}"
    );
    klaus.stop().await;
}
