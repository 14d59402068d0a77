//! What Klaus's calls to Petra look like from outside: calls and their latency, retries, each
//! endpoint's attempts and ejections, how many endpoints each priority has, the priority in
//! use, and client-side certificate reloads.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serving::tls::ReloadMetrics;

/// Every outcome an attempt or a call can have.
pub(crate) const OUTCOMES: [&str; 7] = [
    "ok",
    "timeout",
    "tls_error",
    "unreachable",
    "overloaded",
    "bad_status",
    "bad_body",
];

/// Klaus's metrics of its calls to Petra.
#[derive(Debug, Clone)]
pub struct PetraMetrics {
    calls: Family<OutcomeLabel, Counter>,
    retries: Family<RetryLabel, Counter>,
    duration: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    /// The series of successful calls, looked up once: nearly every call is one, and a
    /// `Family` lookup hashes the label set (SipHash) under a lock, twice per call.
    ok: (Counter, Histogram),
    pub(crate) attempts: Family<AttemptLabel, Counter>,
    pub(crate) endpoints: Family<StateLabel, Gauge>,
    pub(crate) ejections: Family<EndpointLabel, Counter>,
    pub(crate) priority_in_use: Gauge,
    pub(crate) tls_reloads: ReloadMetrics,
    pub(crate) cert_expiry: serving::expiry::CertificateExpiry,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// One endpoint: its priority (its URL's position in PETRA_URL, 0 first) and address.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EndpointLabel {
    pub(crate) priority: String,
    pub(crate) endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AttemptLabel {
    pub(crate) priority: String,
    pub(crate) endpoint: String,
    pub(crate) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    pub(crate) priority: String,
    pub(crate) state: &'static str,
}

impl PetraMetrics {
    /// Registers every metric of the calls to Petra.
    pub fn register(registry: &mut Registry) -> Self {
        let calls = Family::<OutcomeLabel, Counter>::default();
        let duration: Family<OutcomeLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(serving::metrics::latency_histogram);
        let ok = OutcomeLabel { outcome: "ok" };
        let ok = (
            calls.get_or_create(&ok).clone(),
            duration.get_or_create(&ok).clone(),
        );
        let this = Self {
            calls,
            retries: Family::default(),
            duration,
            ok,
            attempts: Family::default(),
            endpoints: Family::default(),
            ejections: Family::default(),
            priority_in_use: Gauge::default(),
            tls_reloads: super::tls::register_reloads(registry),
            cert_expiry: serving::expiry::CertificateExpiry::register(
                registry,
                "petra_tls_certificate_not_after_timestamp_seconds",
            ),
        };
        registry.register(
            "petra_calls",
            "Calls from Klaus to Petra, by outcome",
            this.calls.clone(),
        );
        registry.register(
            "petra_retries",
            "Retries of failed calls, on another endpoint or a fresh connection: attempted, or skipped (budget spent or deadline passed)",
            this.retries.clone(),
        );
        registry.register(
            "petra_call_duration_seconds",
            "Duration of calls from Klaus to Petra, retries included, by outcome",
            this.duration.clone(),
        );
        registry.register(
            "petra_attempts",
            "Attempts of calls to Petra, by endpoint (priority = position of its URL in PETRA_URL, 0 first; endpoint = address) and outcome",
            this.attempts.clone(),
        );
        registry.register(
            "petra_endpoints",
            "Petra endpoints known, by priority and state (active, ejected)",
            this.endpoints.clone(),
        );
        registry.register(
            "petra_ejections",
            "Times an endpoint was ejected after consecutive failures, by priority and endpoint",
            this.ejections.clone(),
        );
        registry.register(
            "petra_priority_in_use",
            "The priority new calls go to (position of the URL in PETRA_URL, 0 first); -1 while no endpoint is known",
            this.priority_in_use.clone(),
        );
        this.priority_in_use.set(-1);
        // Every outcome and retry result from the start, at 0, so that their rates have data
        // before the first failure (dashboards and alerts see 0, not "no data").
        for outcome in OUTCOMES {
            let _ = this.calls.get_or_create(&OutcomeLabel { outcome });
        }
        for result in ["attempted", "skipped"] {
            let _ = this.retries.get_or_create(&RetryLabel { result });
        }
        this
    }

    pub(crate) fn retry(&self, result: &'static str) {
        self.retries.get_or_create(&RetryLabel { result }).inc();
    }

    pub(crate) fn record(&self, outcome: &'static str, elapsed: Duration) {
        if outcome == "ok" {
            self.ok.0.inc();
            self.ok.1.observe(elapsed.as_secs_f64());
            return;
        }
        let label = OutcomeLabel { outcome };
        self.calls.get_or_create(&label).inc();
        self.duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }
}
