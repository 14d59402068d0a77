//! The OTLP export: the SDK pipeline, its HTTP client on a thread of its own, and the counter and
//! warning of spans the collector did not take.

use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::settings::{ExportSettings, TraceArgs, non_empty};
use crate::error::ConfigError;

/// The exporting pipeline of the process, shut down (its last spans sent) by [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The process's exporting pipeline, built the first time (a second service in the same
/// process, as in tests, shares it): the OTLP exporter counted, the SDK's batch processor, the
/// sampler and the resource.
pub(super) fn pipeline(
    args: &TraceArgs,
    settings: &ExportSettings,
    service: &'static str,
) -> Result<&'static SdkTracerProvider, ConfigError> {
    if let Some(provider) = PROVIDER.get() {
        return Ok(provider);
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
    let resource = Resource::builder_empty()
        .with_service_name(
            non_empty(&args.otel_service_name).map_or_else(|| service.to_owned(), str::to_owned),
        )
        .with_attribute(KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ))
        .with_attribute(KeyValue::new("telemetry.sdk.language", "rust"))
        .with_attribute(KeyValue::new("telemetry.sdk.name", "opentelemetry"))
        .with_attributes(settings.resource.iter().cloned());
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
    Ok(provider)
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
pub(super) fn register(registry: &mut Registry) {
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
