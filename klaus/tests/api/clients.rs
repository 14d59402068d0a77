//! What clients see and send: error answers that name nothing internal, request ids and trace
//! context checked before they are logged or passed on, Petra's load shedding passed on as
//! 503 with `Retry-After`, and `X-Content-Type-Options: nosniff` on every answer.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::routing::get;
use clap::CommandFactory;
use klaus::ErrorDetail;
use serving::testing::{TestPki, plain_client};

use crate::helpers::{
    get as http_get, petra_args, recording_petra, spawn_fake_petra, spawn_fake_petra_at,
    spawn_klaus,
};
use crate::upstream::{Dns, attempts, ip, klaus_with, server_cert, shared_port, value};

/// Checks that a public problem names nothing internal: not the host or port of `petra_url`,
/// no environment variable Klaus reads, no TLS term.
pub(crate) fn assert_nothing_internal(problem: &serde_json::Value, petra_url: &str) {
    let url = url::Url::parse(petra_url).expect("Petra URL");
    let text = problem.to_string();
    let mut words: Vec<String> = klaus::Cli::command()
        .get_arguments()
        .filter_map(|arg| Some(arg.get_env()?.to_string_lossy().into_owned()))
        .collect();
    assert!(words.iter().any(|var| var == "PETRA_CA_FILE"), "{words:?}");
    words.extend(url.host_str().map(str::to_owned));
    words.extend(url.port_or_known_default().map(|port| port.to_string()));
    words.extend(
        [
            "TLS",
            "CA",
            "handshake",
            "alert",
            "os error",
            "rustls",
            "hyper",
            "h2 ",
            "SAN",
        ]
        .map(str::to_owned),
    );
    for word in words {
        assert!(!text.contains(&word), "{word:?} leaks in {text}");
    }
}

/// A fake Petra answering every call as `answer` does, and Klaus in front of it with
/// `detail`; Klaus's answer: status, headers and problem.
async fn klaus_over(
    answer: Router,
    detail: ErrorDetail,
) -> (StatusCode, HeaderMap, serde_json::Value, String) {
    let pki = TestPki::new();
    let petra = spawn_fake_petra(&pki, &pki.petra, answer).await;
    let url = petra.https_url();
    let mut args = petra_args(&url, Some(pki.ca_file.clone()), Some(&pki.klaus));
    args.error_detail = detail;
    let klaus = spawn_klaus(&args).await;
    let response = plain_client()
        .get(klaus.http_url())
        .send()
        .await
        .expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.expect("body");
    let problem = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    klaus.stop().await;
    petra.stop().await;
    (status, headers, problem, url)
}

#[tokio::test]
async fn a_shed_call_is_answered_503_with_petras_retry_after() {
    for (given, passed) in [("7", "7"), ("3600", "30"), ("soon", "1")] {
        let shedding = Router::new().route(
            "/",
            get(move || async move {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", given)],
                    "overloaded, retry later\n",
                )
            }),
        );
        let (status, headers, problem, url) = klaus_over(shedding, ErrorDetail::Public).await;
        assert_eq!(status, 503, "{problem}");
        assert_eq!(headers["retry-after"], passed, "Petra said {given}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(problem["code"], "petra_overloaded", "{problem}");
        assert_eq!(problem["status"], 503, "{problem}");
        assert_nothing_internal(&problem, &url);
    }
}

#[tokio::test]
async fn a_shed_call_moves_to_another_replica_and_the_busy_one_is_not_ejected() {
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["shed.test"]);
    let (busy_ip, free_ip) = (ip(81), ip(82));
    let port = shared_port(&[busy_ip, free_ip]);
    let (busy_addr, free_addr) = (
        SocketAddr::new(busy_ip, port),
        SocketAddr::new(free_ip, port),
    );
    let busy = spawn_fake_petra_at(
        &pki,
        &cert,
        Router::new().route(
            "/",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "1")],
                    "busy",
                )
            }),
        ),
        busy_addr,
    )
    .await;
    let free = spawn_fake_petra_at(
        &pki,
        &cert,
        Router::new().route("/", get(|| async { "hello" })),
        free_addr,
    )
    .await;
    let dns = Arc::new(Dns::default());
    dns.set("shed.test", &[busy_ip, free_ip]);
    let klaus = klaus_with(&pki, &format!("https://shed.test:{port}"), &dns, |args| {
        // One failure would eject: a shed must not count as one.
        args.petra_eject_after = 1;
    })
    .await;
    for call in 0..20 {
        let (status, _, body) = http_get(&klaus.http_url()).await;
        assert_eq!((status, body.as_str()), (200, "hello world"), "call {call}");
    }
    let shed = attempts(&klaus, 0, busy_addr, "overloaded").await;
    assert!(shed >= 1.0, "the busy replica was never tried");
    let metrics = klaus.metrics().await;
    assert_eq!(
        value(
            &metrics,
            &format!(r#"petra_ejections_total{{priority="0",endpoint="{busy_addr}"}}"#)
        ),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, r#"petra_retries_total{result="attempted"}"#),
        shed,
        "{metrics}"
    );
    klaus.stop().await;
    busy.stop().await;
    free.stop().await;
}

#[tokio::test]
async fn public_problems_name_nothing_internal_and_verbose_ones_do() {
    let failing = || {
        Router::new().route(
            "/",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
    };
    let (status, _, problem, url) = klaus_over(failing(), ErrorDetail::Public).await;
    assert_eq!(status, 502);
    assert_eq!(problem["code"], "petra_bad_status");
    assert_nothing_internal(&problem, &url);
    let (_, _, problem, _) = klaus_over(failing(), ErrorDetail::Verbose).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "{problem}"
    );
}

/// Calls Klaus with `x-request-id` set to `id`; returns the id Klaus answered with.
async fn call_with_id(url: &str, id: &[u8], extra: &[(&str, &str)]) -> String {
    let mut request = plain_client().get(url).header(
        HeaderName::from_static("x-request-id"),
        HeaderValue::from_bytes(id).expect("a header value"),
    );
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request");
    assert_eq!(response.status(), 200);
    let answered = response.headers()["x-request-id"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert_eq!(response.text().await.expect("body"), "hello world");
    answered
}

#[tokio::test]
async fn hostile_request_ids_and_trace_context_are_replaced_before_petra_sees_them() {
    let pki = TestPki::new();
    let (petra, seen) = recording_petra(&pki).await;
    let klaus = crate::helpers::spawn_klaus_for(&pki, &petra).await;
    let url = klaus.http_url();
    let long = vec![b'a'; 129];
    let hostile: [&[u8]; 6] = [
        b"<script>alert(1)</script>",
        b"\"quoted\"",
        b"it's",
        &long,
        "ünïcode".as_bytes(),
        b"a b",
    ];
    for id in hostile {
        let answered = call_with_id(&url, id, &[]).await;
        assert_ne!(answered.as_bytes(), id);
        assert!(
            serving::propagate::is_valid_request_id(answered.as_bytes()),
            "{answered}"
        );
        let forwarded = seen.lock().expect("lock").pop().expect("Petra was called");
        // Petra got (and logs) the id the client was given, not the hostile one.
        assert_eq!(forwarded["x-request-id"], answered.as_str());
    }
    // A fine id is kept.
    assert_eq!(
        call_with_id(&url, b"req-42.a_b:c", &[]).await,
        "req-42.a_b:c"
    );
    assert_eq!(
        seen.lock().expect("lock").pop().expect("called")["x-request-id"],
        "req-42.a_b:c"
    );

    // An invalid traceparent is not passed on, nor the tracestate that came with it: Klaus
    // starts a new trace, unsampled, and names its attempt as Petra's parent.
    let zeros = "00-00000000000000000000000000000000-b7ad6b7169203331-01";
    call_with_id(
        &url,
        b"t1",
        &[("traceparent", zeros), ("tracestate", "rojo=1")],
    )
    .await;
    let forwarded = seen.lock().expect("lock").pop().expect("called");
    assert!(!forwarded.contains_key("tracestate"), "{forwarded:?}");
    let new = forwarded["traceparent"].to_str().expect("ascii");
    assert!(
        serving::propagate::is_valid_traceparent(new.as_bytes()),
        "{new}"
    );
    assert!(!new.contains("-00000000000000000000000000000000-"), "{new}");
    assert!(new.ends_with("-00"), "{new}");
    // A valid one is passed on; a tracestate over 32 members is dropped, the parent kept.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let many = (0..33)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    call_with_id(
        &url,
        b"t2",
        &[("traceparent", parent), ("tracestate", &many)],
    )
    .await;
    let forwarded = seen.lock().expect("lock").pop().expect("called");
    // The caller's trace and sampled flag, with Klaus's attempt as the parent.
    let passed = forwarded["traceparent"].to_str().expect("ascii");
    assert!(
        passed.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && passed.ends_with("-01"),
        "{passed}"
    );
    assert_ne!(passed, parent);
    assert!(!forwarded.contains_key("tracestate"), "{forwarded:?}");
    call_with_id(
        &url,
        b"t3",
        &[("traceparent", parent), ("tracestate", "rojo=1,congo=2")],
    )
    .await;
    let forwarded = seen.lock().expect("lock").pop().expect("called");
    assert_eq!(forwarded["tracestate"], "rojo=1,congo=2");
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn every_answer_says_nosniff() {
    let pki = TestPki::new();
    let petra = crate::helpers::spawn_petra(&pki).await;
    let klaus = crate::helpers::spawn_klaus_for(&pki, &petra).await;
    let (_, down) = crate::helpers::spawn_klaus_without_petra(&pki).await;
    let urls = [
        klaus.http_url(),
        format!("{}/nope", klaus.http_url()),
        down.http_url(),
        format!("{}/livez", klaus.admin_url()),
        format!("{}/metrics", klaus.admin_url()),
        format!("{}/nope", klaus.admin_url()),
    ];
    for url in urls {
        let response = plain_client().get(&url).send().await.expect("request");
        assert_eq!(
            response
                .headers()
                .get("x-content-type-options")
                .map(|v| v.as_bytes()),
            Some(b"nosniff".as_slice()),
            "{url}: {:?}",
            response.headers()
        );
    }
    down.stop().await;
    klaus.stop().await;
    petra.stop().await;
}
