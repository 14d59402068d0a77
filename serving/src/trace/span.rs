//! A span: its ids always, the SDK's span when it is recorded, and `traceparent` in and out.

use std::borrow::Cow;

use http::HeaderValue;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

use super::SpanRef;

/// One span: its ids always, and the SDK's span when it is recorded. Cheap to clone; the
/// recorded span is exported when [`Span::end`] is called, or when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Span {
    context: SpanContext,
    recorded: Option<Recorded>,
}

#[derive(Debug, Clone)]
struct Recorded {
    tracer: SdkTracer,
    cx: Context,
}

impl Span {
    pub(super) fn ids(trace_id: TraceId, flags: TraceFlags) -> Self {
        Self {
            context: SpanContext::new(trace_id, new_span_id(), flags, false, TraceState::NONE),
            recorded: None,
        }
    }

    pub(super) fn from_sdk(
        tracer: &SdkTracer,
        span: opentelemetry_sdk::trace::Span,
        parent: &Context,
    ) -> Self {
        use opentelemetry::trace::Span as _;
        let context = span.span_context().clone();
        let recorded = span.is_recording().then(|| Recorded {
            tracer: tracer.clone(),
            cx: parent.with_span(span),
        });
        Self { context, recorded }
    }

    /// A span for work this span's request does, such as Klaus's call to Petra or one attempt
    /// of it. The child of a span that is not recorded is not recorded either.
    pub fn child(
        &self,
        kind: SpanKind,
        name: impl FnOnce() -> Cow<'static, str>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        match &self.recorded {
            None => Self::ids(self.context.trace_id(), self.context.trace_flags()),
            Some(recorded) => {
                // As in `Tracer::server`: named once the sampler has chosen to record it.
                let span = recorded.tracer.build_with_context(
                    recorded.tracer.span_builder(super::UNNAMED).with_kind(kind),
                    &recorded.cx,
                );
                let span = Self::from_sdk(&recorded.tracer, span, &recorded.cx);
                span.record(|child| {
                    child.update_name(name());
                    child.set_attributes(attributes());
                });
                span
            }
        }
    }

    /// The trace this span belongs to.
    pub fn trace_id(&self) -> TraceId {
        self.context.trace_id()
    }

    /// This span's id.
    pub fn span_id(&self) -> SpanId {
        self.context.span_id()
    }

    /// Whether this span is recorded (and will be exported).
    pub fn is_recorded(&self) -> bool {
        self.recorded.is_some()
    }

    /// The trace id and span id in lowercase hex, for a log line: written digit by digit into
    /// buffers on the stack, which is several times cheaper than `{:032x}` on the request path.
    pub fn hex_ids(&self) -> HexIds {
        let mut ids = HexIds {
            trace: [b'0'; 32],
            span: [b'0'; 16],
        };
        hex(&mut ids.trace, &self.context.trace_id().to_bytes());
        hex(&mut ids.span, &self.context.span_id().to_bytes());
        ids
    }

    /// `traceparent` naming this span as the parent of the next service's.
    pub fn traceparent(&self) -> HeaderValue {
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex(&mut out[3..35], &self.context.trace_id().to_bytes());
        hex(&mut out[36..52], &self.context.span_id().to_bytes());
        hex(&mut out[53..55], &[self.context.trace_flags().to_u8()]);
        let mut value =
            HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""));
        // Different on every request: keep it out of HTTP/2's header compression table.
        value.set_sensitive(true);
        value
    }

    /// Runs `f` on the recorded span, to set attributes or the status; nothing when the span
    /// is not recorded, so that `f` may allocate freely.
    pub fn record(&self, f: impl FnOnce(&SpanRef<'_>)) {
        if let Some(recorded) = &self.recorded {
            f(&recorded.cx.span());
        }
    }

    /// Marks the span failed with `error` (an `error.type` such as a problem code).
    pub fn fail(&self, error: &'static str) {
        self.record(|span| {
            span.set_attribute(KeyValue::new("error.type", error));
            span.set_status(Status::error(error));
        });
    }

    /// Ends the span now.
    pub fn end(&self) {
        self.record(|span| span.end());
    }
}

/// A span's ids in lowercase hex ([`Span::hex_ids`]).
#[derive(Debug, Clone, Copy)]
pub struct HexIds {
    trace: [u8; 32],
    span: [u8; 16],
}

impl HexIds {
    /// The trace id: 32 hex digits.
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.trace).unwrap_or_default()
    }

    /// The span id: 16 hex digits.
    pub fn span_id(&self) -> &str {
        std::str::from_utf8(&self.span).unwrap_or_default()
    }

    /// Fixed ids, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        let mut ids = Self {
            trace: [b'0'; 32],
            span: [b'0'; 16],
        };
        hex(&mut ids.trace, &[0x4b; 16]);
        hex(
            &mut ids.span,
            &[0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
        );
        ids
    }
}

/// Writes `bytes` as lowercase hex into `out`, two digits a byte.
fn hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
}

/// A `traceparent` the middleware kept, as the remote parent's span context. Only version 00's
/// fields are read; a later version's extra fields are ignored, as W3C asks.
pub(super) fn parse_traceparent(value: &HeaderValue) -> Option<SpanContext> {
    let text = value.to_str().ok()?;
    let trace_id = TraceId::from_hex(text.get(3..35)?).ok()?;
    let span_id = SpanId::from_hex(text.get(36..52)?).ok()?;
    let flags = u8::from_str_radix(text.get(53..55)?, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    ))
}

pub(super) fn new_trace_id() -> TraceId {
    loop {
        let id = TraceId::from(rand::random::<u128>());
        if id != TraceId::INVALID {
            return id;
        }
    }
}

fn new_span_id() -> SpanId {
    loop {
        let id = SpanId::from(rand::random::<u64>());
        if id != SpanId::INVALID {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::propagate::TRACEPARENT;
    use crate::trace::Tracer;
    use http::HeaderMap;

    #[test]
    fn without_an_exporter_a_request_keeps_its_callers_trace_and_gets_a_span_id_of_its_own() {
        let tracer = Tracer::ids_only();
        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let span = tracer.server(&headers, || "GET /".into(), Vec::new);
        assert!(!span.is_recorded());
        let ids = span.hex_ids();
        assert_eq!(ids.trace_id(), span.trace_id().to_string());
        assert_eq!(ids.span_id(), span.span_id().to_string());
        assert_eq!(
            span.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_ne!(span.span_id().to_string(), "b7ad6b7169203331");
        let child = span.child(SpanKind::Client, || "GET".into(), Vec::new);
        assert_eq!(child.trace_id(), span.trace_id());
        assert_ne!(child.span_id(), span.span_id());
        // The caller's sampled flag is passed on unchanged.
        let traceparent = child.traceparent();
        assert_eq!(
            traceparent.to_str().expect("ascii"),
            format!("00-0af7651916cd43dd8448eb211c80319c-{}-01", child.span_id())
        );
        assert!(crate::propagate::is_valid_traceparent(
            traceparent.as_bytes()
        ));
    }

    #[test]
    fn a_request_without_trace_context_starts_a_new_unsampled_trace() {
        let span = Tracer::ids_only().server(&HeaderMap::new(), || "GET /".into(), Vec::new);
        let other = Tracer::ids_only().server(&HeaderMap::new(), || "GET /".into(), Vec::new);
        assert_ne!(span.trace_id(), other.trace_id());
        assert_ne!(span.trace_id(), TraceId::INVALID);
        let traceparent = span.traceparent();
        let text = traceparent.to_str().expect("ascii");
        assert!(text.ends_with("-00"), "{text}");
        assert!(crate::propagate::is_valid_traceparent(text.as_bytes()));
        assert_eq!(
            parse_traceparent(&traceparent).map(|c| c.trace_id()),
            Some(span.trace_id())
        );
    }
}
