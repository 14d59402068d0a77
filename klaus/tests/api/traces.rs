//! Traces through a real OTLP export: the `klaus` and `petra` binaries export over OTLP/HTTP to
//! a receiver in this process (tracesink), and their spans must form one trace: Klaus's
//! request, its call to Petra, the attempt, and Petra's request under the attempt. Their log
//! lines carry the same trace id.

use std::sync::Arc;
use std::time::Duration;

use serving::testing::{Binary, TestPki, plain_client, wait_until};
use tracesink::{Span, Store};

use crate::faults::petra_exe;

const KLAUS: &str = env!("CARGO_BIN_EXE_klaus");

/// A receiver on a free loopback port: its store and the base URL to export to.
async fn sink() -> (Arc<Store>, String) {
    let store = Store::new(10_000);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the sink");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = tracesink::router(Arc::clone(&store), false);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (store, url)
}

pub(crate) fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A Petra binary with mutual TLS from `pki`, and `extra` in its environment (a variable set
/// again in `extra` wins).
pub(crate) fn start_petra(pki: &TestPki, extra: &[(&str, &str)]) -> Binary {
    Binary::start(&petra_exe(), &petra_env(pki, extra))
}

/// The Petra binary's environment for [`start_petra`].
pub(crate) fn petra_env<'a>(
    pki: &'a TestPki,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("TLS_CERT_FILE", path(&pki.petra.cert)),
        ("TLS_KEY_FILE", path(&pki.petra.key)),
        ("TLS_CLIENT_CA_FILE", path(&pki.ca_file)),
        ("SHUTDOWN_DELAY_SECONDS", "0"),
    ];
    env.extend_from_slice(extra);
    env
}

/// A Klaus binary calling `petra_url`, with `extra` in its environment.
fn start_klaus(pki: &TestPki, petra_url: &str, extra: &[(&str, &str)]) -> Binary {
    let mut env = vec![
        ("PETRA_URL", petra_url),
        ("PETRA_CA_FILE", path(&pki.ca_file)),
        ("PETRA_CLIENT_CERT_FILE", path(&pki.klaus.cert)),
        ("PETRA_CLIENT_KEY_FILE", path(&pki.klaus.key)),
        ("SHUTDOWN_DELAY_SECONDS", "0"),
    ];
    env.extend_from_slice(extra);
    Binary::start(KLAUS, &env)
}

/// Petra and Klaus binaries (Klaus calling that Petra), with `both` added to the environment of
/// each and `klaus_only` to Klaus's.
pub(crate) fn start_pair(
    pki: &TestPki,
    both: &[(&str, &str)],
    klaus_only: &[(&str, &str)],
) -> (Binary, Binary) {
    let petra = start_petra(pki, both);
    let url = format!("https://localhost:{}", petra.main_addr.port());
    let klaus = start_klaus(pki, &url, &[both, klaus_only].concat());
    (petra, klaus)
}

/// A receiver, and Petra and Klaus exporting to it, each batch within 100 ms rather than 5 s.
async fn exporting_pair(pki: &TestPki) -> (Arc<Store>, Binary, Binary) {
    let (store, endpoint) = sink().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let (petra, klaus) = start_pair(pki, &otel, &[]);
    (store, petra, klaus)
}

/// The next request log line of `binary` (within 10 s), parsed.
fn request_line(binary: &Binary) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = binary
            .lines
            .recv_timeout(left)
            .expect("a request log line within 10 s");
        let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        if value["message"] == "request" {
            return value;
        }
    }
}

async fn hello_world(klaus: &Binary, traceparent: Option<&str>) {
    let mut request = plain_client().get(format!("http://{}/", klaus.main_addr));
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "hello world");
}

/// Waits until `store` holds `count` spans of `trace_id`, and returns them.
async fn spans_of(store: &Store, trace_id: &str, count: usize) -> Vec<Span> {
    wait_until(
        &format!("{count} spans of trace {trace_id} are exported"),
        Duration::from_secs(15),
        || async { store.trace(trace_id).len() >= count },
    )
    .await;
    store.trace(trace_id)
}

fn one<'a>(spans: &'a [Span], service: &str, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "one {service} span {name:?} in {spans:#?}");
    found[0]
}

#[tokio::test]
async fn klaus_and_petra_spans_share_one_trace_through_a_real_otlp_export() {
    let pki = TestPki::new();
    let (store, petra, klaus) = exporting_pair(&pki).await;

    // A request with no trace context starts a trace in Klaus.
    hello_world(&klaus, None).await;
    let klaus_line = request_line(&klaus);
    let petra_line = request_line(&petra);
    let trace_id = klaus_line["trace_id"]
        .as_str()
        .expect("trace_id")
        .to_owned();
    assert_eq!(trace_id.len(), 32, "{klaus_line}");
    assert_eq!(petra_line["trace_id"], trace_id.as_str(), "{petra_line}");

    let spans = spans_of(&store, &trace_id, 4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let server = one(&spans, "klaus", "GET /");
    let call = one(&spans, "klaus", "call Petra");
    let attempt = one(&spans, "klaus", "GET");
    let petra_server = one(&spans, "petra", "GET /");
    // The log lines name the services' own spans.
    assert_eq!(klaus_line["span_id"], server.span_id.as_str());
    assert_eq!(petra_line["span_id"], petra_server.span_id.as_str());
    // One tree: Klaus's request > the call > the attempt > Petra's request.
    assert_eq!(server.parent_span_id, "", "a root span");
    assert_eq!(server.kind, "server");
    assert_eq!(call.parent_span_id, server.span_id);
    assert_eq!(attempt.parent_span_id, call.span_id);
    assert_eq!(attempt.kind, "client");
    assert_eq!(petra_server.parent_span_id, attempt.span_id);
    assert_eq!(petra_server.kind, "server");
    // What the attempt went to, and the answers.
    assert_eq!(attempt.attributes["server.address"], "localhost");
    assert_eq!(
        attempt.attributes["network.peer.port"],
        petra.main_addr.port().to_string()
    );
    assert_eq!(attempt.attributes["petra.priority"], "0");
    assert_eq!(attempt.attributes["petra.connection"], "pooled");
    assert_eq!(call.attributes["petra.outcome"], "ok");
    assert_eq!(call.attributes["petra.attempts"], "1");
    assert_eq!(call.attributes["petra.priority"], "0");
    assert_eq!(server.attributes["http.response.status_code"], "200");
    assert_eq!(petra_server.attributes["http.response.status_code"], "200");
    assert_eq!(server.attributes["http.route"], "/");
    // Petra's request happened inside Klaus's attempt.
    assert!(petra_server.start_unix_nano >= attempt.start_unix_nano);
    assert!(petra_server.duration_us <= attempt.duration_us);

    // A caller's sampled trace context is joined: Klaus's request is its child.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    hello_world(&klaus, Some(caller)).await;
    let spans = spans_of(&store, "4bf92f3577b34da6a3ce929d0e0e4736", 4).await;
    let server = one(&spans, "klaus", "GET /");
    assert_eq!(server.parent_span_id, "00f067aa0ba902b7");
    assert_eq!(
        one(&spans, "petra", "GET /").parent_span_id,
        one(&spans, "klaus", "GET").span_id
    );

    // Calls one at a time soon go over the solo connection, and their attempts say so.
    let traces: Vec<String> = (0..20)
        .map(|i| format!("{:032x}", 0xc0ffee_u64 + i))
        .collect();
    for trace in &traces {
        hello_world(&klaus, Some(&format!("00-{trace}-00f067aa0ba902b7-01"))).await;
    }
    let mut connections = Vec::new();
    for trace in &traces[10..] {
        let spans = spans_of(&store, trace, 4).await;
        connections.push(one(&spans, "klaus", "GET").attributes["petra.connection"].clone());
    }
    assert!(connections.iter().any(|c| c == "solo"), "{connections:?}");
}

#[tokio::test]
async fn an_unsampled_caller_is_not_recorded_yet_its_trace_id_reaches_both_logs() {
    let pki = TestPki::new();
    let (store, petra, klaus) = exporting_pair(&pki).await;
    // The default sampler follows the caller: flags 00 means not recorded.
    let caller = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    hello_world(&klaus, Some(caller)).await;
    assert_eq!(
        request_line(&klaus)["trace_id"],
        "5bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        request_line(&petra)["trace_id"],
        "5bf92f3577b34da6a3ce929d0e0e4736"
    );
    // A sampled request after it is exported, so the export works and the first was left out.
    hello_world(&klaus, None).await;
    let sampled = request_line(&klaus)["trace_id"]
        .as_str()
        .expect("trace_id")
        .to_owned();
    spans_of(&store, &sampled, 4).await;
    assert!(
        store.trace("5bf92f3577b34da6a3ce929d0e0e4736").is_empty(),
        "{:#?}",
        store.trace("5bf92f3577b34da6a3ce929d0e0e4736")
    );
}

#[tokio::test]
async fn a_collector_that_does_not_answer_costs_a_counter_and_a_warning_never_a_request() {
    let pki = TestPki::new();
    // An address nothing listens on.
    let endpoint = format!("http://{}", serving::testing::refused_addr());
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let (_petra, klaus) = start_pair(&pki, &otel, &[]);
    for _ in 0..20 {
        hello_world(&klaus, None).await;
    }
    wait_until(
        "failed exports are counted",
        Duration::from_secs(15),
        || async {
            let text = klaus.metrics().await;
            text.lines()
                .find_map(|l| l.strip_prefix("trace_spans_exported_total{outcome=\"failed\"} "))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        },
    )
    .await;
    // One warning, however many exports failed (at most one a minute).
    let mut warnings = 0;
    while let Ok(line) = klaus.lines.recv_timeout(Duration::from_millis(500)) {
        if line.contains("the OTLP collector did not take the spans") {
            warnings += 1;
            assert!(line.contains("\"level\":\"WARN\""), "{line}");
        }
    }
    assert_eq!(warnings, 1);
    // Serving went on throughout.
    hello_world(&klaus, None).await;
}

#[tokio::test]
async fn without_an_exporter_both_log_lines_of_a_call_still_share_its_trace_id() {
    let pki = TestPki::new();
    let (petra, klaus) = start_pair(&pki, &[], &[]);
    hello_world(&klaus, None).await;
    let klaus_line = request_line(&klaus);
    let petra_line = request_line(&petra);
    let trace_id = klaus_line["trace_id"].as_str().expect("trace_id");
    assert_eq!(trace_id.len(), 32, "{klaus_line}");
    assert_ne!(trace_id, "00000000000000000000000000000000");
    assert_eq!(petra_line["trace_id"], trace_id, "{petra_line}");
    assert_ne!(petra_line["span_id"], klaus_line["span_id"]);
    // A caller's trace is kept.
    let caller = "00-6bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    hello_world(&klaus, Some(caller)).await;
    assert_eq!(
        request_line(&klaus)["trace_id"],
        "6bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        request_line(&petra)["trace_id"],
        "6bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[tokio::test]
async fn a_failover_shows_in_the_trace_as_a_second_attempt_on_the_later_url() {
    let pki = TestPki::new();
    let (store, endpoint) = sink().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let petra = start_petra(&pki, &otel);
    // Nothing listens at the first URL: the attempt there is refused, the call goes on to the
    // second URL.
    let urls = format!(
        "{},https://localhost:{}",
        crate::helpers::refused_url(),
        petra.main_addr.port()
    );
    let klaus = start_klaus(&pki, &urls, &otel);
    hello_world(&klaus, None).await;
    let trace_id = request_line(&klaus)["trace_id"]
        .as_str()
        .expect("trace_id")
        .to_owned();
    let spans = spans_of(&store, &trace_id, 5).await;
    let call = one(&spans, "klaus", "call Petra");
    assert_eq!(call.attributes["petra.attempts"], "2", "{call:#?}");
    assert_eq!(call.attributes["petra.priority"], "1", "{call:#?}");
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "klaus" && s.name == "GET")
        .collect();
    attempts.sort_by_key(|s| s.start_unix_nano);
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    assert_eq!(attempts[0].attributes["petra.priority"], "0");
    assert_eq!(attempts[0].status, "error");
    assert_eq!(attempts[0].attributes["error.type"], "unreachable");
    assert_eq!(attempts[1].attributes["petra.priority"], "1");
    assert_eq!(attempts[1].attributes["http.request.resend_count"], "1");
    assert_eq!(attempts[1].status, "unset");
    // Petra's request is the child of the attempt that reached it.
    assert_eq!(
        one(&spans, "petra", "GET /").parent_span_id,
        attempts[1].span_id
    );
}
