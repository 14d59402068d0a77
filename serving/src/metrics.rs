//! HTTP metrics by route template, method and status, in a `prometheus-client` registry that
//! the admin port serves.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds, from 100 µs to 10 s: fine where these services live, coarse
/// where only timeouts do.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The labels of one HTTP request: the route template (never the raw path, so that the number
/// of series stays bounded), the method and the status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template, or `unmatched` for paths no route serves.
    pub route: Cow<'static, str>,
    /// The request method; `OTHER` for methods outside the standard set.
    pub method: &'static str,
    /// The response status code.
    pub status: u16,
}

/// Request count and latency of the main listener.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    /// The series of the label sets seen so far (up to [`HOT_SERIES`]), found by comparing
    /// labels: a `Family` lookup hashes the label set with SipHash under a lock, and each
    /// request needed two.
    hot: Arc<Mutex<Vec<Series>>>,
}

/// How many label sets [`HttpMetrics`] keeps at hand; others are looked up in the families.
const HOT_SERIES: usize = 16;

/// The two series of one label set.
#[derive(Debug)]
struct Series {
    labels: HttpLabels,
    requests: Counter,
    duration: Histogram,
}

impl HttpMetrics {
    /// Registers the metrics as `http_requests_total` and `http_request_duration_seconds`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            hot: Arc::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests served, by route template, method and status",
            this.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method and status",
            this.duration.clone(),
        );
        this
    }

    /// Counts one request that took `seconds`.
    /// The route is borrowed: it is copied only the first time its label set is seen.
    pub fn record(&self, route: &str, method: &'static str, status: u16, seconds: f64) {
        let mut hot = self.hot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = hot.iter().find(|series| {
            let labels = &series.labels;
            labels.status == status && labels.method == method && labels.route == route
        }) {
            series.requests.inc();
            series.duration.observe(seconds);
            return;
        }
        let labels = HttpLabels {
            route: Cow::Owned(route.to_owned()),
            method,
            status,
        };
        let series = Series {
            requests: self.requests.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            labels,
        };
        series.requests.inc();
        series.duration.observe(seconds);
        if hot.len() < HOT_SERIES {
            hot.push(series);
        }
    }
}

/// The method as a label with a static lifetime, so that recording allocates nothing for it.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn each_label_set_counts_on_its_own_series() {
        let mut registry = Registry::default();
        let metrics = HttpMetrics::register(&mut registry);
        for _ in 0..3 {
            metrics.record("/", "GET", 200, 0.001);
        }
        metrics.record("/", "GET", 503, 0.001);
        // More label sets than are kept at hand still count.
        for status in 0..HOT_SERIES as u16 + 2 {
            metrics.record("unmatched", "GET", 400 + status, 0.001);
        }
        metrics.record("unmatched", "GET", 400 + HOT_SERIES as u16 + 1, 0.001);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        for (series, count) in [
            (r#"route="/",method="GET",status="200""#, 3),
            (r#"route="/",method="GET",status="503""#, 1),
            (r#"route="unmatched",method="GET",status="400""#, 1),
            (r#"route="unmatched",method="GET",status="417""#, 2),
        ] {
            assert!(
                text.contains(&format!("http_requests_total{{{series}}} {count}")),
                "{series} {count}: {text}"
            );
            assert!(
                text.contains(&format!(
                    "http_request_duration_seconds_count{{{series}}} {count}"
                )),
                "{series} {count}: {text}"
            );
        }
    }
}
