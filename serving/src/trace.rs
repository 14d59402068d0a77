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

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::error::ConfigError;
use crate::propagate::TRACEPARENT;

pub use opentelemetry::trace::SpanRef;

/// The standard OpenTelemetry variables this service reads. Only the trace signal is
/// exported, over OTLP/HTTP; `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and the
/// other `OTEL_BSP_*` are read by the SDK as it documents them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TraceArgs {
    /// Base URL of an OTLP/HTTP collector (`/v1/traces` is appended), such as
    /// `http://otel-collector:4318`. Unset (and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT unset),
    /// nothing is exported; requests still get a trace id for their log lines.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// Full URL traces are sent to, used as it is; it takes precedence over
    /// OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_name = "URL")]
    pub otel_exporter_otlp_traces_endpoint: Option<String>,

    /// `http/protobuf` (the default) or `http/json`. `grpc` is not built in: point the
    /// endpoint at the collector's OTLP/HTTP port (4318) instead.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", value_name = "PROTOCOL")]
    pub otel_exporter_otlp_protocol: Option<String>,

    /// PEM file with the CA certificates that an `https://` collector's certificate must chain
    /// to; unset, the system's roots.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE", value_name = "PEM_FILE")]
    pub otel_exporter_otlp_certificate: Option<PathBuf>,

    /// `otlp` (the default, when an endpoint is set) or `none`.
    #[arg(long, env = "OTEL_TRACES_EXPORTER", value_name = "EXPORTER")]
    pub otel_traces_exporter: Option<String>,

    /// The service name traces carry; the binary's name when unset.
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME")]
    pub otel_service_name: Option<String>,

    /// Comma-separated `key=value` resource attributes (percent-encoded values), such as
    /// `cloud.provider=aws,deployment.environment=prod`.
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_name = "KEY=VALUE,...")]
    pub otel_resource_attributes: Option<String>,

    /// Which requests are recorded: `parentbased_always_on` (the default), `always_on`,
    /// `always_off`, `traceidratio`, `parentbased_always_off` or `parentbased_traceidratio`.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_name = "SAMPLER")]
    pub otel_traces_sampler: Option<String>,

    /// The ratio for the `traceidratio` samplers, from 0 to 1 (default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", value_name = "RATIO")]
    pub otel_traces_sampler_arg: Option<String>,

    /// The longest a finished span waits in the queue before it is sent, in milliseconds
    /// (default 5000; 1 to 60000).
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub otel_bsp_schedule_delay: Option<u64>,

    /// `true` turns the export off, whatever else is set.
    #[arg(long, env = "OTEL_SDK_DISABLED", value_name = "BOOL")]
    pub otel_sdk_disabled: Option<String>,
}

/// Where and how spans are exported, once the variables have been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    /// The URL spans are posted to.
    pub url: String,
    /// `http/protobuf` or `http/json`.
    pub json: bool,
    /// The sampler, as named in OTEL_TRACES_SAMPLER.
    pub sampler: SamplerSetting,
    /// CA certificates for an `https://` collector.
    pub ca_file: Option<PathBuf>,
}

/// OTEL_TRACES_SAMPLER and its argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSetting {
    /// Whether a sampled or unsampled parent decides.
    pub parent_based: bool,
    /// The share of new traces recorded: 1 for `always_on`, 0 for `always_off`.
    pub ratio: f64,
}

impl SamplerSetting {
    fn sampler(self) -> Sampler {
        let root = if self.ratio >= 1.0 {
            Sampler::AlwaysOn
        } else if self.ratio <= 0.0 {
            Sampler::AlwaysOff
        } else {
            Sampler::TraceIdRatioBased(self.ratio)
        };
        if self.parent_based {
            Sampler::ParentBased(Box::new(root))
        } else {
            root
        }
    }
}

impl fmt::Display for SamplerSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root = match self.ratio {
            r if r >= 1.0 => "always_on".to_owned(),
            r if r <= 0.0 => "always_off".to_owned(),
            r => format!("traceidratio {r}"),
        };
        if self.parent_based {
            write!(f, "parentbased_{root}")
        } else {
            f.write_str(&root)
        }
    }
}

impl TraceArgs {
    /// The export these variables ask for: `None` when no endpoint is set, or the export is
    /// turned off. Every error names the variable to fix.
    pub fn export(&self) -> Result<Option<ExportSettings>, ConfigError> {
        let disabled = match self.otel_sdk_disabled.as_deref().map(str::trim) {
            None | Some("") => false,
            Some(value) if value.eq_ignore_ascii_case("true") => true,
            Some(value) if value.eq_ignore_ascii_case("false") => false,
            Some(value) => {
                return Err(ConfigError::new(
                    "OTEL_SDK_DISABLED",
                    format!("'{value}' is neither true nor false"),
                ));
            }
        };
        let exporter_on = match self.otel_traces_exporter.as_deref().map(str::trim) {
            None | Some("") | Some("otlp") => true,
            Some("none") => false,
            Some(other) => {
                return Err(ConfigError::new(
                    "OTEL_TRACES_EXPORTER",
                    format!("'{other}' is not supported; use otlp or none"),
                ));
            }
        };
        let json = match self.otel_exporter_otlp_protocol.as_deref().map(str::trim) {
            None | Some("") | Some("http/protobuf") => false,
            Some("http/json") => true,
            Some("grpc") => {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    "grpc is not built in; use http/protobuf and the collector's OTLP/HTTP port (4318)",
                ));
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    format!("'{other}' is not a protocol; use http/protobuf or http/json"),
                ));
            }
        };
        let sampler = self.sampler()?;
        let url = match (
            non_empty(&self.otel_exporter_otlp_traces_endpoint),
            non_empty(&self.otel_exporter_otlp_endpoint),
        ) {
            (Some(url), _) => checked_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)?,
            (None, Some(base)) => {
                let base = checked_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)?;
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
            (None, None) => return Ok(None),
        };
        if let Some(attributes) = non_empty(&self.otel_resource_attributes) {
            resource_attributes(attributes)?;
        }
        if disabled || !exporter_on {
            return Ok(None);
        }
        Ok(Some(ExportSettings {
            url,
            json,
            sampler,
            ca_file: self.otel_exporter_otlp_certificate.clone(),
        }))
    }

    fn sampler(&self) -> Result<SamplerSetting, ConfigError> {
        let ratio = match non_empty(&self.otel_traces_sampler_arg) {
            None => 1.0,
            Some(arg) => arg
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|ratio| (0.0..=1.0).contains(ratio))
                .ok_or_else(|| {
                    ConfigError::new(
                        "OTEL_TRACES_SAMPLER_ARG",
                        format!("'{arg}' is not a ratio from 0 to 1"),
                    )
                })?,
        };
        let name = non_empty(&self.otel_traces_sampler).unwrap_or("parentbased_always_on");
        let (parent_based, root) = match name.trim().strip_prefix("parentbased_") {
            Some(root) => (true, root),
            None => (false, name.trim()),
        };
        let ratio = match root {
            "always_on" => 1.0,
            "always_off" => 0.0,
            "traceidratio" => ratio,
            _ => {
                return Err(ConfigError::new(
                    "OTEL_TRACES_SAMPLER",
                    format!(
                        "'{name}' is not supported; use always_on, always_off, traceidratio or their parentbased_ forms"
                    ),
                ));
            }
        };
        Ok(SamplerSetting {
            parent_based,
            ratio,
        })
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|value| !value.trim().is_empty())
}

fn checked_url(variable: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    match url::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(value.to_owned())
        }
        Ok(_) => Err(ConfigError::new(
            variable,
            format!("'{value}' must be an http:// or https:// URL with a host"),
        )),
        Err(err) => Err(ConfigError::new(
            variable,
            format!("'{value}' is not a URL: {err}"),
        )),
    }
}

/// OTEL_RESOURCE_ATTRIBUTES as key-value pairs: `key=value` separated by commas, values
/// percent-decoded (W3C Baggage's format, as the specification asks).
fn resource_attributes(raw: &str) -> Result<Vec<KeyValue>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .filter(|(key, _)| !key.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "OTEL_RESOURCE_ATTRIBUTES",
                        format!("'{pair}' is not key=value"),
                    )
                })?;
            let value = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8()
                .map_err(|_| {
                    ConfigError::new(
                        "OTEL_RESOURCE_ATTRIBUTES",
                        format!("the value of '{}' is not UTF-8 once decoded", key.trim()),
                    )
                })?;
            Ok(KeyValue::new(key.trim().to_owned(), value.into_owned()))
        })
        .collect()
}

/// The span source of a service: exporting through the OpenTelemetry SDK, or only making up
/// ids. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tracer {
    sdk: Option<SdkTracer>,
}

/// The exporting pipeline of the process, shut down (its last spans sent) by [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

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
        register(registry);
        let Some(settings) = args.export()? else {
            return Ok(Self::ids_only());
        };
        if let Some(provider) = PROVIDER.get() {
            return Ok(Self {
                sdk: Some(provider.tracer(service)),
            });
        }
        let client = ExportClient::new(settings.ca_file.as_deref())?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(settings.url.clone())
            .with_protocol(if settings.json {
                Protocol::HttpJson
            } else {
                Protocol::HttpBinary
            })
            .build()
            .map_err(|err| {
                ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("cannot build the OTLP exporter: {err}"),
                )
            })?;
        let mut resource = Resource::builder_empty()
            .with_service_name(
                non_empty(&args.otel_service_name)
                    .map_or_else(|| service.to_owned(), str::to_owned),
            )
            .with_attribute(KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION").to_owned(),
            ))
            .with_attribute(KeyValue::new("telemetry.sdk.language", "rust"))
            .with_attribute(KeyValue::new("telemetry.sdk.name", "opentelemetry"));
        if let Some(raw) = non_empty(&args.otel_resource_attributes) {
            resource = resource.with_attributes(resource_attributes(raw)?);
        }
        let exporter = Counted {
            inner: exporter,
            url: settings.url.clone(),
        };
        let mut batch = BatchConfigBuilder::default();
        if let Some(ms) = args.otel_bsp_schedule_delay {
            batch = batch.with_scheduled_delay(Duration::from_millis(ms));
        }
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch.build())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(settings.sampler.sampler())
            .with_resource(resource.build())
            .build();
        let provider = PROVIDER.get_or_init(|| provider);
        tracing::info!(
            url = %settings.url,
            protocol = if settings.json { "http/json" } else { "http/protobuf" },
            sampler = %settings.sampler,
            "exporting traces over OTLP"
        );
        Ok(Self {
            sdk: Some(provider.tracer(service)),
        })
    }

    /// Whether spans are exported.
    pub fn exports(&self) -> bool {
        self.sdk.is_some()
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
        let span = sdk.build_with_context(
            sdk.span_builder(name())
                .with_kind(SpanKind::Server)
                .with_attributes(attributes()),
            &parent_cx,
        );
        Span::from_sdk(sdk, span, &parent_cx)
    }
}

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
    fn ids(trace_id: TraceId, flags: TraceFlags) -> Self {
        Self {
            context: SpanContext::new(trace_id, new_span_id(), flags, false, TraceState::NONE),
            recorded: None,
        }
    }

    fn from_sdk(
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
                let span = recorded.tracer.build_with_context(
                    recorded
                        .tracer
                        .span_builder(name())
                        .with_kind(kind)
                        .with_attributes(attributes()),
                    &recorded.cx,
                );
                Self::from_sdk(&recorded.tracer, span, &recorded.cx)
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

    /// `traceparent` naming this span as the parent of the next service's.
    pub fn traceparent(&self) -> HeaderValue {
        fn hex(out: &mut [u8], bytes: &[u8]) {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
                pair[0] = HEX[usize::from(byte >> 4)];
                pair[1] = HEX[usize::from(byte & 0xf)];
            }
        }
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

/// A `traceparent` the middleware kept, as the remote parent's span context. Only version 00's
/// fields are read; a later version's extra fields are ignored, as W3C asks.
fn parse_traceparent(value: &HeaderValue) -> Option<SpanContext> {
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

fn new_trace_id() -> TraceId {
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

/// Sends the spans still queued, waiting at most `limit`. Call it before the process exits.
pub fn shutdown(limit: Duration) {
    if let Some(provider) = PROVIDER.get()
        && let Err(err) = provider.shutdown_with_timeout(limit)
    {
        tracing::warn!(error = %err, "the last spans may not have been exported");
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// `trace_spans_exported_total{outcome}`, for the whole process.
static EXPORTED: LazyLock<Family<OutcomeLabel, Counter>> = LazyLock::new(Family::default);

/// Registers `trace_spans_exported_total{outcome="ok"|"failed"}`.
fn register(registry: &mut Registry) {
    for outcome in ["ok", "failed"] {
        let _ = EXPORTED.get_or_create(&OutcomeLabel { outcome });
    }
    registry.register(
        "trace_spans_exported",
        "Spans sent to the OTLP collector (ok) or lost because it did not take them (failed)",
        EXPORTED.clone(),
    );
}

/// How often an export failure is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The OTLP exporter, counting what it sends and warning (at most once a minute) when the
/// collector does not take it.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    url: String,
}

static LAST_WARNING: Mutex<Option<Instant>> = Mutex::new(None);

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        EXPORTED
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(spans);
        if let Err(err) = &result {
            let mut last = LAST_WARNING.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                *last = Some(Instant::now());
                tracing::warn!(
                    url = %self.url,
                    spans,
                    error = %err,
                    "the OTLP collector did not take the spans; they are lost (trace_spans_exported_total{{outcome=\"failed\"}}), serving goes on"
                );
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The exporter's HTTP client: hyper over rustls, on a runtime of its own (one thread), so
/// that a slow collector never takes time from the threads that serve.
#[derive(Debug, Clone)]
struct ExportClient {
    inner: opentelemetry_http::hyper::HyperClient<Connector>,
    runtime: tokio::runtime::Handle,
}

/// The export client's runtime, started with the first exporter and kept for the process.
static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// How long one export request may take (OTLP's default).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

impl ExportClient {
    fn new(ca_file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs = crate::tls::load_certs("OTEL_EXPORTER_OTLP_CERTIFICATE", path)?;
                for cert in certs {
                    roots.add(cert).map_err(|err| {
                        ConfigError::new(
                            "OTEL_EXPORTER_OTLP_CERTIFICATE",
                            format!("{}: {err}", path.display()),
                        )
                    })?;
                }
            }
            None => {
                // A missing or partly unreadable system store only matters for an https://
                // collector, whose handshake then fails and is counted.
                let _ =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|err| ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let runtime = match RUNTIME.get() {
            Some(runtime) => runtime,
            None => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("otlp-export")
                    .enable_all()
                    .build()
                    .map_err(|err| {
                        ConfigError::new(
                            "OTEL_EXPORTER_OTLP_ENDPOINT",
                            format!("cannot start the export thread: {err}"),
                        )
                    })?;
                RUNTIME.get_or_init(|| runtime)
            }
        };
        Ok(Self {
            inner: opentelemetry_http::hyper::HyperClient::new(connector, EXPORT_TIMEOUT, None),
            runtime: runtime.handle().clone(),
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        self.runtime
            .spawn(async move { inner.send_bytes(request).await })
            .await
            .map_err(|err| Box::new(err) as HttpError)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(vars: &[(&str, &str)]) -> TraceArgs {
        let get = |name: &str| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        };
        TraceArgs {
            otel_exporter_otlp_endpoint: get("endpoint"),
            otel_exporter_otlp_traces_endpoint: get("traces_endpoint"),
            otel_exporter_otlp_protocol: get("protocol"),
            otel_exporter_otlp_certificate: None,
            otel_traces_exporter: get("exporter"),
            otel_service_name: None,
            otel_resource_attributes: get("attributes"),
            otel_traces_sampler: get("sampler"),
            otel_traces_sampler_arg: get("arg"),
            otel_bsp_schedule_delay: None,
            otel_sdk_disabled: get("disabled"),
        }
    }

    fn error(vars: &[(&str, &str)]) -> String {
        args(vars)
            .export()
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint_or_when_turned_off() {
        assert_eq!(args(&[]).export().expect("valid"), None);
        assert_eq!(
            args(&[("sampler", "always_on")]).export().expect("valid"),
            None
        );
        let on = [("endpoint", "http://collector:4318")];
        assert!(args(&on).export().expect("valid").is_some());
        for off in [("disabled", "true"), ("exporter", "none")] {
            assert_eq!(args(&[on[0], off]).export().expect("valid"), None);
        }
    }

    #[test]
    fn the_traces_endpoint_is_used_as_it_is_and_the_base_gets_the_signal_path() {
        let base = args(&[("endpoint", "http://collector:4318/")]).export();
        assert_eq!(
            base.expect("valid").expect("on").url,
            "http://collector:4318/v1/traces"
        );
        let full = args(&[
            ("endpoint", "http://collector:4318"),
            ("traces_endpoint", "https://traces.example:443/otlp"),
        ])
        .export();
        assert_eq!(
            full.expect("valid").expect("on").url,
            "https://traces.example:443/otlp"
        );
    }

    #[test]
    fn the_samplers_of_the_specification_are_read_with_their_ratio() {
        let on = ("endpoint", "http://c:4318");
        let setting = |vars: &[(&str, &str)]| {
            let mut all = vec![on];
            all.extend_from_slice(vars);
            args(&all).export().expect("valid").expect("on").sampler
        };
        assert_eq!(
            setting(&[]),
            SamplerSetting {
                parent_based: true,
                ratio: 1.0
            }
        );
        assert_eq!(
            setting(&[("sampler", "traceidratio"), ("arg", "0.01")]),
            SamplerSetting {
                parent_based: false,
                ratio: 0.01
            }
        );
        assert_eq!(
            setting(&[("sampler", "parentbased_always_off")]),
            SamplerSetting {
                parent_based: true,
                ratio: 0.0
            }
        );
        assert_eq!(
            setting(&[("sampler", "parentbased_traceidratio"), ("arg", "0.5")]).to_string(),
            "parentbased_traceidratio 0.5"
        );
    }

    #[test]
    fn bad_values_name_their_variable_and_what_would_do() {
        let on = ("endpoint", "http://c:4318");
        assert!(error(&[on, ("protocol", "grpc")]).contains("OTEL_EXPORTER_OTLP_PROTOCOL"));
        assert!(error(&[on, ("protocol", "grpc")]).contains("4318"));
        assert!(error(&[on, ("protocol", "thrift")]).contains("http/json"));
        assert!(error(&[on, ("sampler", "jaeger_remote")]).contains("OTEL_TRACES_SAMPLER"));
        assert!(
            error(&[on, ("sampler", "traceidratio"), ("arg", "2")])
                .contains("OTEL_TRACES_SAMPLER_ARG")
        );
        assert!(error(&[on, ("arg", "half")]).contains("OTEL_TRACES_SAMPLER_ARG"));
        assert!(error(&[("endpoint", "collector:4318")]).contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
        assert!(error(&[("endpoint", "ftp://c/")]).contains("http://"));
        assert!(error(&[on, ("disabled", "maybe")]).contains("OTEL_SDK_DISABLED"));
        assert!(error(&[on, ("exporter", "zipkin")]).contains("OTEL_TRACES_EXPORTER"));
        assert!(error(&[on, ("attributes", "cloud.provider")]).contains("key=value"));
    }

    #[test]
    fn resource_attributes_are_percent_decoded() {
        let attributes = resource_attributes("cloud.provider=aws, team=a%2Cb ,,").expect("valid");
        assert_eq!(
            attributes,
            vec![
                KeyValue::new("cloud.provider", "aws"),
                KeyValue::new("team", "a,b")
            ]
        );
    }

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
