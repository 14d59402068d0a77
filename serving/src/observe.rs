//! The middleware every main listener runs: request ids and trace context checked
//! ([`crate::propagate`]), the header-size limit, `X-Content-Type-Options: nosniff`, metrics and
//! one log line per request.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode, Version};

use opentelemetry::KeyValue;
use opentelemetry::trace::Status;

use crate::admission::Admission;
use crate::metrics::{HttpMetrics, method_label};
use crate::propagate;
use crate::telemetry::{self, RequestId, RequestLine, Route};
use crate::trace::{Span, Tracer};

pub use crate::propagate::{REQUEST_ID, TRACEPARENT, TRACESTATE};

/// The most request-header bytes (names and values) a request may carry: 8 KiB, as nginx's
/// default. More is answered with 431.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// The header that tells a browser not to guess a response's content type.
pub const CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");

/// Adds request ids, a span ([`crate::trace`]), the header limit, admission control (see
/// [`crate::admission`]), metrics and request logs to a router. Call it after the routes are
/// added, so that the route template is known. The handler finds the request's [`Span`] in
/// its extensions.
pub fn layer(
    router: axum::Router,
    metrics: HttpMetrics,
    admission: Arc<Admission>,
    tracer: Tracer,
) -> axum::Router {
    let state = Arc::new(Observe {
        metrics,
        admission,
        tracer,
    });
    router.layer(axum::middleware::from_fn_with_state(state, observe))
}

#[derive(Debug)]
struct Observe {
    metrics: HttpMetrics,
    admission: Arc<Admission>,
    tracer: Tracer,
}

async fn observe(State(state): State<Arc<Observe>>, mut request: Request, next: Next) -> Response {
    // From when the request arrived: a wait behind the read gate counts.
    let started = crate::admission::take_arrival().unwrap_or_else(Instant::now);
    // Measured before the request id and trace context are checked, which may drop some.
    let too_large = header_bytes(request.headers()) > MAX_HEADER_BYTES;
    // Only a request id and trace context that are safe to log and pass on are kept.
    let request_id = propagate::sanitize(request.headers_mut());
    let method = method_label(request.method());
    // A clone of the matched path shares its string (an `Arc`): nothing is copied per request.
    let route = match request.extensions().get::<MatchedPath>() {
        Some(matched) => Route::Matched(matched.clone()),
        None => Route::Unmatched,
    };
    let version = request.version();
    let span = state.tracer.server(
        request.headers(),
        || format!("{method} {}", route.as_str()).into(),
        || {
            vec![
                KeyValue::new("http.request.method", method),
                KeyValue::new("http.route", route.as_str().to_owned()),
                KeyValue::new("network.protocol.version", protocol_version(version)),
            ]
        },
    );
    request.extensions_mut().insert(span.clone());

    let mut response = if too_large {
        plain(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large\n",
        )
    } else {
        match state.admission.acquire().await {
            Ok(_permit) => next.run(request).await,
            Err(_) => overloaded(version),
        }
    };
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID, unique(&request_id));
    nosniff(headers);

    let elapsed = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    end_span(&span, status);
    state
        .metrics
        .record(route.as_str(), method, status, elapsed);
    telemetry::log_request(status, || RequestLine {
        at: SystemTime::now(),
        method,
        route,
        status,
        latency_ms: elapsed * 1000.0,
        request_id: RequestId::copy(&request_id),
        ids: span.hex_ids(),
    });
    response
}

/// Records the answer on a recorded span and ends it: server errors (5xx) mark it failed,
/// client errors do not (OpenTelemetry's HTTP conventions).
fn end_span(span: &Span, status: u16) {
    span.record(|span| {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            span.set_attribute(KeyValue::new("error.type", status.to_string()));
            span.set_status(Status::error(""));
        }
        span.end();
    });
}

fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "2",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    }
}

/// The answer to a request that found no room: 503 with `Retry-After`. On HTTP/1.1 the
/// connection is closed too: a client that ignores `Retry-After` would otherwise send its next
/// request at once, and reconnecting meets the listener's backlog while the queue is full.
fn overloaded(version: Version) -> Response {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, "overloaded, retry later\n");
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    if version < Version::HTTP_2 {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Adds `X-Content-Type-Options: nosniff`, which every response of both listeners carries: a
/// browser must take the declared content type (plain text, problem JSON, metrics) as it is,
/// never sniff HTML or script in a body that echoes something a client sent.
pub fn nosniff(headers: &mut HeaderMap) {
    headers.insert(CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

/// [`nosniff`] as a response mapper, for `axum::middleware::map_response`.
pub async fn with_nosniff(mut response: Response) -> Response {
    nosniff(response.headers_mut());
    response
}

/// `value`, marked as one that HTTP/2's header compression should never index: a request id
/// or trace context differs on every request, so adding it to the HPACK table only evicts
/// entries that would have been reused (and costs both ends a table update per request).
/// HTTP/1.1 ignores the mark.
pub fn unique(value: &HeaderValue) -> HeaderValue {
    let mut value = value.clone();
    value.set_sensitive(true);
    value
}

/// A short plain-text response.
pub fn plain(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

/// The 404 answer for paths no route serves.
pub async fn not_found() -> Response {
    plain(StatusCode::NOT_FOUND, "not found\n")
}

/// The 405 answer for a known path with a method it does not serve.
pub async fn method_not_allowed() -> Response {
    plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_values_keep_their_bytes_and_are_never_indexed() {
        let id = HeaderValue::from_static("abc-123");
        let marked = unique(&id);
        assert_eq!(marked, id);
        assert!(marked.is_sensitive());
        assert!(!id.is_sensitive());
    }
}
