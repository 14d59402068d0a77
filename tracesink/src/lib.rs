//! A small OTLP/HTTP trace receiver, so that the pair's traces can be looked at where no
//! collector or tracing backend can be installed: on a laptop (docker-compose.observability.yml)
//! and in tests, which read what a service really exported.
//!
//! It takes `POST /v1/traces` in both OTLP/HTTP encodings (protobuf and JSON), keeps the
//! latest spans in memory (oldest dropped first), prints each span as one JSON line, and
//! shows them: `GET /api/traces` (the latest traces), `GET /api/traces/{trace_id}` (a trace's
//! spans as JSON) and `GET /traces/{trace_id}` (the trace as a text waterfall). It is not a
//! tracing backend: nothing is stored on disk and nothing is indexed.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode as SpanStatus};
use prost::Message as _;
use serde::Serialize;

/// The largest export request taken: the OTLP exporters' batches are far smaller.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;

/// One received span, flattened: what a person or a test looks at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// `server`, `client`, `internal`, `producer`, `consumer` or `unspecified`.
    pub kind: &'static str,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// The parent's span id, empty for a root span.
    pub parent_span_id: String,
    /// Start, in nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// End minus start, in microseconds.
    pub duration_us: u64,
    /// `unset`, `ok` or `error`.
    pub status: &'static str,
    /// The span's attributes, each value written as text.
    pub attributes: BTreeMap<String, String>,
}

/// The latest spans received, at most `capacity`.
#[derive(Debug)]
pub struct Store {
    spans: Mutex<VecDeque<Span>>,
    capacity: usize,
}

impl Store {
    /// An empty store that keeps at most `capacity` spans.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            spans: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Span>> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, new: Vec<Span>) {
        let mut spans = self.lock();
        for span in new {
            if spans.len() == self.capacity {
                spans.pop_front();
            }
            spans.push_back(span);
        }
    }

    /// Every span kept, oldest first.
    pub fn spans(&self) -> Vec<Span> {
        self.lock().iter().cloned().collect()
    }

    /// The spans of one trace, by start time.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        let mut spans: Vec<Span> = self
            .lock()
            .iter()
            .filter(|span| span.trace_id == trace_id)
            .cloned()
            .collect();
        spans.sort_by_key(|span| span.start_unix_nano);
        spans
    }
}

/// The receiver's routes. With `echo`, each span received is printed to stdout as a JSON line.
pub fn router(store: Arc<Store>, echo: bool) -> Router {
    Router::new()
        .route("/v1/traces", post(receive))
        .route("/api/traces", get(traces))
        .route("/api/traces/{trace_id}", get(trace_json))
        .route("/traces/{trace_id}", get(waterfall))
        .route("/", get(|| async { "tracesink: POST /v1/traces (OTLP/HTTP); GET /api/traces, /api/traces/{trace_id}, /traces/{trace_id}\n" }))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(Sink { store, echo })
}

#[derive(Debug, Clone)]
struct Sink {
    store: Arc<Store>,
    echo: bool,
}

async fn receive(State(sink): State<Sink>, headers: HeaderMap, body: Bytes) -> Response {
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|encoding| encoding != "identity")
    {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed requests are not taken; set OTEL_EXPORTER_OTLP_COMPRESSION=none\n".into(),
        );
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    let request = if json {
        serde_json::from_slice::<ExportTraceServiceRequest>(&body).map_err(|err| err.to_string())
    } else {
        ExportTraceServiceRequest::decode(body).map_err(|err| err.to_string())
    };
    let request = match request {
        Ok(request) => request,
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("not an OTLP trace export request: {err}\n"),
            );
        }
    };
    let spans = flatten(request);
    if sink.echo {
        let mut out = String::new();
        for span in &spans {
            if let Ok(line) = serde_json::to_string(span) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        print!("{out}");
    }
    sink.store.add(spans);
    // An empty ExportTraceServiceResponse: nothing rejected.
    if json {
        ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            Bytes::new(),
        )
            .into_response()
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| {
                resource
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
            })
            .map_or_else(|| "unknown_service".to_owned(), |kv| value_text(&kv.value));
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                out.push(Span {
                    service: service.clone(),
                    name: span.name,
                    kind: kind_name(span.kind),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    start_unix_nano: span.start_time_unix_nano,
                    duration_us: span
                        .end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano)
                        / 1000,
                    status: match span.status.map(|status| status.code) {
                        Some(code) if code == SpanStatus::Error as i32 => "error",
                        Some(code) if code == SpanStatus::Ok as i32 => "ok",
                        _ => "unset",
                    },
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(&kv.value)))
        .collect()
}

fn value_text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|value| value.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn kind_name(kind: i32) -> &'static str {
    match SpanKind::try_from(kind) {
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Internal) => "internal",
        Ok(SpanKind::Producer) => "producer",
        Ok(SpanKind::Consumer) => "consumer",
        _ => "unspecified",
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// A trace in the list of `/api/traces`.
#[derive(Debug, Serialize)]
struct TraceSummary {
    trace_id: String,
    root: String,
    services: Vec<String>,
    spans: usize,
    duration_us: u64,
    errors: usize,
}

async fn traces(State(sink): State<Sink>) -> Response {
    let mut by_trace: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    for span in sink.store.spans() {
        by_trace
            .entry(span.trace_id.clone())
            .or_default()
            .push(span);
    }
    let mut summaries: Vec<(u64, TraceSummary)> = by_trace
        .into_iter()
        .map(|(trace_id, spans)| {
            let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
            let end = spans
                .iter()
                .map(|s| s.start_unix_nano + s.duration_us * 1000)
                .max()
                .unwrap_or(0);
            let root = spans
                .iter()
                .find(|s| !spans.iter().any(|p| p.span_id == s.parent_span_id))
                .map_or_else(String::new, |s| format!("{} {}", s.service, s.name));
            let mut services: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
            services.sort();
            services.dedup();
            let summary = TraceSummary {
                trace_id,
                root,
                services,
                spans: spans.len(),
                duration_us: end.saturating_sub(start) / 1000,
                errors: spans.iter().filter(|s| s.status == "error").count(),
            };
            (start, summary)
        })
        .collect();
    // The latest first, at most 100.
    summaries.sort_by_key(|summary| std::cmp::Reverse(summary.0));
    summaries.truncate(100);
    json(&summaries.into_iter().map(|(_, s)| s).collect::<Vec<_>>())
}

async fn trace_json(State(sink): State<Sink>, Path(trace_id): Path<String>) -> Response {
    json(&sink.store.trace(&trace_id.to_ascii_lowercase()))
}

async fn waterfall(State(sink): State<Sink>, Path(trace_id): Path<String>) -> Response {
    let spans = sink.store.trace(&trace_id.to_ascii_lowercase());
    if spans.is_empty() {
        return text(
            StatusCode::NOT_FOUND,
            format!("no span of trace {trace_id} is kept\n"),
        );
    }
    text(StatusCode::OK, render_waterfall(&spans))
}

/// A trace as text: one line per span, children under their parent, with the start offset and
/// duration in milliseconds, the status and the attributes that say where the span went.
pub fn render_waterfall(spans: &[Span]) -> String {
    let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let mut out = String::new();
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| !spans.iter().any(|p| p.span_id == s.parent_span_id))
        .collect();
    for root in roots {
        line(&mut out, spans, root, start, 0);
    }
    out
}

fn line(out: &mut String, spans: &[Span], span: &Span, start: u64, depth: usize) {
    const SHOWN: [&str; 5] = [
        "http.response.status_code",
        "network.peer.address",
        "petra.priority",
        "http.request.resend_count",
        "error.type",
    ];
    let offset_ms = span.start_unix_nano.saturating_sub(start) as f64 / 1e6;
    let _ = write!(
        out,
        "{:indent$}{} {} [{}] +{offset_ms:.3} ms {:.3} ms",
        "",
        span.service,
        span.name,
        span.kind,
        span.duration_us as f64 / 1e3,
        indent = depth * 2
    );
    if span.status == "error" {
        out.push_str(" ERROR");
    }
    for key in SHOWN {
        if let Some(value) = span.attributes.get(key) {
            let _ = write!(out, " {key}={value}");
        }
    }
    out.push('\n');
    for child in spans.iter().filter(|c| c.parent_span_id == span.span_id) {
        line(out, spans, child, start, depth + 1);
    }
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_string_pretty(value) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body + "\n",
        )
            .into_response(),
        Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}
