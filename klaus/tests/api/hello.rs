//! The happy path: `hello world` end to end over mutual TLS, with trace context passed on.

use axum::http::HeaderMap;
use serving::testing::{TestPki, client_builder};

use crate::helpers::{
    concurrent_gets, get as http_get, recording_petra, spawn_klaus_for, spawn_petra,
};

#[tokio::test]
async fn says_hello_world_through_petra_over_mutual_tls() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    for _ in 0..3 {
        let (status, content_type, body) = http_get(&klaus.http_url()).await;
        assert_eq!(
            (status, content_type.as_str(), body.as_str()),
            (200, "text/plain; charset=utf-8", "hello world")
        );
    }
    let text = klaus.metrics().await;
    assert!(
        text.contains(r#"petra_calls_total{outcome="ok"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"petra_call_duration_seconds_count{outcome="ok"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"http_requests_total{route="/",method="GET",status="200"} 3"#),
        "{text}"
    );
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn multiplexes_concurrent_calls_on_one_http2_connection_to_petra() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    // A first call opens the connection; 19 at once then share it as HTTP/2 streams, where an
    // HTTP/1.1 pool would open a connection for each call in flight.
    assert_eq!(http_get(&klaus.http_url()).await.2, "hello world");
    for body in concurrent_gets(&klaus.http_url(), 19).await {
        assert_eq!(body, "hello world");
    }
    let petra_metrics = petra.metrics().await;
    assert!(
        petra_metrics.contains(r#"http_requests_total{route="/",method="GET",status="200"} 20"#),
        "{petra_metrics}"
    );
    assert!(
        petra_metrics.contains("connections_accepted_total 1\n"),
        "{petra_metrics}"
    );
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn passes_on_traceparent_and_request_id() {
    let pki = TestPki::new();
    let (petra, seen) = recording_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let response = serving::testing::plain_client()
        .get(klaus.http_url())
        .header("traceparent", traceparent)
        .header("x-request-id", "req-42")
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["x-request-id"], "req-42");
    assert_eq!(response.text().await.expect("body"), "hello world");
    let seen: Vec<HeaderMap> = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    // The same trace and sampled flag; the parent is Klaus's attempt, not the caller's span.
    let passed = seen[0]["traceparent"].to_str().expect("ascii");
    assert_eq!(passed.len(), traceparent.len());
    assert_eq!(passed[..36], traceparent[..36]);
    assert_ne!(passed[36..52], traceparent[36..52]);
    assert_eq!(passed[52..], traceparent[52..]);
    assert_eq!(seen[0]["x-request-id"], "req-42");
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn serves_https_on_its_front_when_given_a_certificate() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let mut args = crate::helpers::serve_args();
    // Klaus's front uses a server certificate for localhost (Petra's will do in a test).
    args.tls_cert_file = Some(pki.petra.cert.clone());
    args.tls_key_file = Some(pki.petra.key.clone());
    let petra_args = crate::helpers::petra_args(
        &petra.https_url(),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    let klaus = serving::testing::spawn(
        klaus::service(serving::testing::loopback(), &args, &petra_args).expect("config"),
    )
    .await;
    for http1 in [true, false] {
        let mut builder = client_builder(&pki.ca_file, None);
        if http1 {
            builder = builder.http1_only();
        }
        let response = builder
            .build()
            .expect("client")
            .get(klaus.https_url())
            .send()
            .await
            .expect("request");
        assert_eq!(response.text().await.expect("body"), "hello world");
    }
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn answers_404_and_405() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let klaus = spawn_klaus_for(&pki, &petra).await;
    assert_eq!(http_get(&format!("{}/nope", klaus.http_url())).await.0, 404);
    let post = serving::testing::plain_client()
        .post(klaus.http_url())
        .send()
        .await
        .expect("request");
    assert_eq!(post.status().as_u16(), 405);
    klaus.stop().await;
    petra.stop().await;
}

/// The connection cap of Klaus's listener leaves its calls to Petra alone: Klaus's client
/// connection to Petra is not one of its listener's, and one HTTP/2 connection to a Petra
/// capped at one carries them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn says_hello_world_with_both_listeners_capped_at_one_connection() {
    use crate::helpers::{get_owned, petra_args, serve_args};
    use serving::testing::{loopback, spawn};

    let pki = TestPki::new();
    let mut args = serve_args();
    args.tls_cert_file = Some(pki.petra.cert.clone());
    args.tls_key_file = Some(pki.petra.key.clone());
    args.tls_client_ca_file = Some(pki.ca_file.clone());
    args.max_connections = 1;
    let petra = spawn(petra::service(loopback(), &args).expect("valid Petra configuration")).await;
    let mut args = serve_args();
    args.max_connections = 1;
    let petra_args = petra_args(
        &petra.https_url(),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    let klaus = spawn(klaus::service(loopback(), &args, &petra_args).expect("valid Klaus")).await;
    // Eight clients at once, each on a connection of its own: they take turns at Klaus's one
    // connection, and every one gets its answer.
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(get_owned(klaus.http_url())))
        .collect();
    for call in calls {
        let (status, _, body) = call.await.expect("call");
        assert_eq!((status, body.as_str()), (200, "hello world"));
    }
    let text = klaus.metrics().await;
    assert!(
        text.contains(r#"petra_calls_total{outcome="ok"} 8"#),
        "{text}"
    );
    assert!(
        petra
            .metrics()
            .await
            .contains("connections_accepted_total 1\n"),
        "Klaus's calls shared one connection to Petra"
    );
}
