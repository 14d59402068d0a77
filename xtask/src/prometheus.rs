//! Reading the Prometheus text exposition that the services' admin ports serve at `/metrics`.

use std::net::SocketAddr;

use anyhow::ensure;

/// The metrics text an admin port serves at `/metrics`.
pub(crate) fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let reply = crate::http::get(admin, "/metrics")?;
    ensure!(
        reply.status == 200,
        "/metrics at {admin} answered {}",
        reply.status
    );
    Ok(reply.body)
}

/// Sums the samples of the metric `name` that carry every one of `labels` (`key="value"`) in a
/// Prometheus text exposition.
pub(crate) fn sum_samples(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let ours = (rest.is_empty() || rest.starts_with('{'))
                && labels.iter().all(|label| rest.contains(label));
            ours.then(|| value.parse::<f64>().ok()).flatten()
        })
        .fold(0.0, |sum, value| sum + value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP petra_retries_total Retries.
# TYPE petra_retries_total counter
petra_retries_total{result=\"attempted\"} 3
petra_retries_total{result=\"skipped\"} 1
petra_retries_total_extra 100
http_requests_total{status=\"200\",route=\"/\"} 10
http_requests_total{status=\"503\",route=\"/\"} 2
connections_open 0
";

    #[test]
    fn samples_are_summed_by_name_and_labels() {
        assert_eq!(sum_samples(TEXT, "petra_retries_total", &[]), 4.0);
        assert_eq!(
            sum_samples(TEXT, "petra_retries_total", &["result=\"skipped\""]),
            1.0
        );
        assert_eq!(
            sum_samples(TEXT, "http_requests_total", &["status=\"200\""]),
            10.0
        );
        assert_eq!(sum_samples(TEXT, "connections_open", &[]), 0.0);
        assert_eq!(sum_samples(TEXT, "missing", &[]), 0.0);
    }
}
