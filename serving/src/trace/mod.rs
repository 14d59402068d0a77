//! Traces: a span for each request a service serves and, in Klaus, for its call to Petra and
//! each attempt of it, joined across services by W3C trace context (`traceparent`) and
//! exported over OTLP/HTTP when the standard `OTEL_*` variables ask for it.
//!
//! Every request has a trace id and a span id, exported or not: they are in its log line, and
//! Klaus sends Petra a `traceparent` naming its attempt, so that the two services' log lines of
//! one call can be joined by `trace_id` with no collector at all. Without an exporter a span is
//! only those ids (two random numbers, no allocation); with one, the sampler decides which
//! spans are recorded, and recorded spans go to the OpenTelemetry SDK's batch processor, whose
//! thread sends them. Serving never waits on the export: a full queue drops spans, and a
//! collector that does not answer costs `trace_spans_exported_total{outcome="failed"}` and one
//! warning a minute.

mod export;
mod settings;
mod span;

use std::borrow::Cow;

use http::HeaderMap;
use opentelemetry::trace::{
    SpanKind, TraceContextExt as _, TraceFlags, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;
use prometheus_client::registry::Registry;

use crate::error::ConfigError;
use crate::propagate::TRACEPARENT;

pub use export::shutdown;
pub use opentelemetry::trace::SpanRef;
pub use settings::{ExportSettings, SamplerSetting, TraceArgs};
pub use span::{HexIds, Span};

use span::{new_trace_id, parse_traceparent};

/// The name a span has until the sampler has decided to record it: [`Tracer::server`] and
/// [`Span::child`] name only the spans they record.
pub(crate) const UNNAMED: &str = "unnamed";

/// The span source of a service: exporting through the OpenTelemetry SDK, or only making up
/// ids. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tracer {
    sdk: Option<SdkTracer>,
}

impl Tracer {
    /// A tracer that exports nothing: spans are ids only.
    pub fn ids_only() -> Self {
        Self::default()
    }

    /// The tracer `args` ask for, for the service `service` (the default service name); its
    /// export metrics go into `registry`. One process exports through one pipeline: a second
    /// service in the same process (tests) shares the first one's.
    pub fn new(
        args: &TraceArgs,
        service: &'static str,
        registry: &mut Registry,
    ) -> Result<Self, ConfigError> {
        export::register(registry);
        let Some(settings) = args.export()? else {
            return Ok(Self::ids_only());
        };
        let provider = export::pipeline(args, &settings, service)?;
        Ok(Self {
            sdk: Some(provider.tracer(service)),
        })
    }

    /// The span of a request this service serves, the child of the `traceparent` in `headers`
    /// when there is one (the middleware has already dropped one that is not valid), the root
    /// of a new trace otherwise. `name` and `attributes` are asked for only when the span is
    /// recorded.
    pub fn server(
        &self,
        headers: &HeaderMap,
        name: impl FnOnce() -> Cow<'static, str>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Span {
        let parent = headers.get(TRACEPARENT).and_then(parse_traceparent);
        let Some(sdk) = &self.sdk else {
            let (trace_id, flags) = parent.as_ref().map_or_else(
                || (new_trace_id(), TraceFlags::NOT_SAMPLED),
                |parent| (parent.trace_id(), parent.trace_flags()),
            );
            return Span::ids(trace_id, flags);
        };
        let parent_cx = match parent {
            Some(parent) => Context::new().with_remote_span_context(parent),
            None => Context::new(),
        };
        // Named and given its attributes only once the sampler has chosen to record it, so
        // that a request it leaves out allocates nothing for them.
        let span = sdk.build_with_context(
            sdk.span_builder(UNNAMED).with_kind(SpanKind::Server),
            &parent_cx,
        );
        let span = Span::from_sdk(sdk, span, &parent_cx);
        span.record(|recorded| {
            recorded.update_name(name());
            recorded.set_attributes(attributes());
        });
        span
    }
}
