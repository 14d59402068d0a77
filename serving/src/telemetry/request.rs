//! The request log line, written by the log thread.
//!
//! Every request gets one line (target `http`, message `request`). Formatting it through
//! `tracing` costs the request's own thread the event's dispatch, the JSON and a copy into the
//! buffer: at one request at a time that was about a twentieth of Klaus's CPU and a thirteenth
//! of Petra's (perf), on the path of every answer. With JSON lines, [`super::log_request`]
//! therefore takes the line's values as they are (a clock reading, the status, the ids) and
//! hands them to the batched stdout, whose thread formats them when it writes the batch: the
//! request's thread only checks the filter, samples and appends. The line is the same, byte
//! for byte, as the one `tracing` writes; with text lines, or where this crate's subscriber is
//! not installed (tests with a subscriber of their own), it goes through `tracing` as before.

use std::fmt;
use std::time::SystemTime;

use axum::extract::MatchedPath;
use http::HeaderValue;

use super::json::{write_field_name, write_json_str};
use super::timestamp::write_timestamp;
use crate::propagate::MAX_REQUEST_ID_LEN;
use crate::trace::HexIds;

/// The route a request matched: a template such as `/`, or `unmatched`.
#[derive(Debug, Clone)]
pub enum Route {
    /// The template of the route that matched. Cloning it shares its string.
    Matched(MatchedPath),
    /// No route matched.
    Unmatched,
}

impl Route {
    /// The template, or `unmatched`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Matched(path) => path.as_str(),
            Self::Unmatched => "unmatched",
        }
    }
}

/// What a request's log line says.
#[derive(Debug, Clone)]
pub struct RequestLine {
    /// When the answer was ready: the line's timestamp.
    pub at: SystemTime,
    /// `GET`, `POST`, …, or `OTHER`.
    pub method: &'static str,
    /// The route template.
    pub route: Route,
    /// The answer's status.
    pub status: u16,
    /// From the request's arrival to the answer, in milliseconds.
    pub latency_ms: f64,
    /// The request id, one that is safe to log.
    pub request_id: RequestId,
    /// The request's trace and span ids.
    pub ids: HexIds,
}

/// A request id, copied out of its header. The header's bytes are a slice of the connection's
/// read buffer: held until the line is written, they would keep the connection from reusing
/// that buffer, and every request would allocate a new one.
#[derive(Clone)]
pub struct RequestId {
    len: u8,
    bytes: [u8; MAX_REQUEST_ID_LEN],
}

impl RequestId {
    /// The id in `value`; empty when it is longer than a request id may be or not text (which
    /// [`crate::propagate::sanitize`] never lets through).
    pub fn copy(value: &HeaderValue) -> Self {
        let mut id = Self {
            len: 0,
            bytes: [0; MAX_REQUEST_ID_LEN],
        };
        let bytes = value.as_bytes();
        if let (Ok(text), Ok(len)) = (value.to_str(), u8::try_from(bytes.len()))
            && let Some(slot) = id.bytes.get_mut(..text.len())
        {
            slot.copy_from_slice(bytes);
            id.len = len;
        }
        id
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The line as a `tracing` event, which the installed subscriber filters, samples and formats.
pub(super) fn log_as_event(line: &RequestLine) {
    tracing::info!(
        target: "http",
        method = line.method,
        route = line.route.as_str(),
        status = line.status,
        latency_ms = line.latency_ms,
        request_id = line.request_id.as_str(),
        trace_id = line.ids.trace_id(),
        span_id = line.ids.span_id(),
        "request"
    );
}

/// Writes the line as [`super::JsonLine`] writes the event of [`log_as_event`].
pub(super) fn write_json(out: &mut impl fmt::Write, line: &RequestLine) -> fmt::Result {
    out.write_str("{\"timestamp\":\"")?;
    write_timestamp(out, line.at)?;
    out.write_str("\",\"level\":\"INFO\",\"message\":\"request\",\"method\":")?;
    write_json_str(out, line.method)?;
    write_field_name(out, "route")?;
    write_json_str(out, line.route.as_str())?;
    write_field_name(out, "status")?;
    out.write_str(itoa::Buffer::new().format(line.status))?;
    write_field_name(out, "latency_ms")?;
    if line.latency_ms.is_finite() {
        out.write_str(ryu::Buffer::new().format_finite(line.latency_ms))?;
    } else {
        out.write_str("null")?;
    }
    write_field_name(out, "request_id")?;
    write_json_str(out, line.request_id.as_str())?;
    write_field_name(out, "trace_id")?;
    write_json_str(out, line.ids.trace_id())?;
    write_field_name(out, "span_id")?;
    write_json_str(out, line.ids.span_id())?;
    out.write_str(",\"target\":\"http\"}\n")
}

#[cfg(test)]
impl RequestLine {
    /// A 404 line with `request_id`, at 2026-12-01T08:15:02.123456Z.
    pub(super) fn for_tests(request_id: &'static str) -> Self {
        Self {
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_796_112_902_123_456),
            method: "GET",
            route: Route::Unmatched,
            status: 404,
            latency_ms: 1.5,
            request_id: RequestId::copy(&HeaderValue::from_static(request_id)),
            ids: HexIds::for_tests(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::json::tests::one_line;

    fn line(request_id: &'static str, latency_ms: f64) -> RequestLine {
        RequestLine {
            latency_ms,
            ..RequestLine::for_tests(request_id)
        }
    }

    /// The line as `tracing` and [`super::super::JsonLine`] write it, with its timestamp.
    fn as_event(line: &RequestLine) -> String {
        one_line(|| log_as_event(line))
    }

    #[test]
    fn a_request_id_is_copied_whole_or_not_at_all() {
        let longest = "a".repeat(MAX_REQUEST_ID_LEN);
        let id = RequestId::copy(&HeaderValue::from_str(&longest).expect("a header value"));
        assert_eq!(id.as_str(), longest);
        let longer = format!("{longest}b");
        let id = RequestId::copy(&HeaderValue::from_str(&longer).expect("a header value"));
        assert_eq!(id.as_str(), "");
        let id = RequestId::copy(&HeaderValue::from_bytes(b"caf\xe9").expect("a header value"));
        assert_eq!(id.as_str(), "");
    }

    #[test]
    fn the_line_written_from_values_is_the_event_line_byte_for_byte() {
        for line in [
            line(
                "8400af69-a625-41b1-a4a7-5d93225b4d68",
                2.290_377_000_000_000_3,
            ),
            line("a\"b\\c", 0.0),
            line("x", f64::NAN),
        ] {
            let event = as_event(&line);
            let mut from_values = String::new();
            write_json(&mut from_values, &line).expect("write");
            // The event's timestamp is the time it was formatted; the rest must match.
            let stamp = "2026-12-01T08:15:02.123456Z";
            assert!(from_values.contains(stamp), "{from_values}");
            let at = event.find("\",\"level\"").expect("a timestamp");
            let event = format!("{{\"timestamp\":\"{stamp}{}", &event[at..]);
            assert_eq!(from_values, event);
            serde_json::from_str::<serde_json::Value>(&from_values).expect("valid JSON");
        }
    }
}
