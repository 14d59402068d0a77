//! `cargo xtask e2e monitoring`: a real Prometheus (Debian's, unpacked on the host) scrapes both
//! services of docker-compose.yml every second with the shipped rules, their `for:` shortened to
//! [`FOR`] here only, while oha calls Klaus at a steady rate. Stopping Petra must fire
//! PetraUnreachable and ServiceDown, and every query of the dashboard (monitoring/dashboard.json)
//! must return data. The run's queries are drawn into `target/e2e-monitoring/dashboard.svg`, the
//! picture in docs/RUNBOOK.md.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use xshell::Shell;

use super::containers::{Klaus, container_ip};
use super::{KLAUS_PORT, Project, ensure_port_free, pass, wait_for};
use crate::http::get;
use crate::oha::{Oha, load_args};
use crate::util::root;

/// The compose file: the one-host topology.
const FILE: &str = "docker-compose.yml";

/// The `for:` of every alert in this test (the shipped rules wait minutes).
const FOR: &str = "5s";

/// The steady load on Klaus while Prometheus watches: requests per second, connections, and the
/// longest it may run (it is stopped when the checks end).
const LOAD_RATE: u32 = 50;
const LOAD_CONNECTIONS: u32 = 4;
const LOAD_LIMIT: Duration = Duration::from_secs(240);

/// How long Prometheus may take to start, to see both targets up, and to fire an alert.
const READY_DEADLINE: Duration = Duration::from_secs(30);
const ALERT_DEADLINE: Duration = Duration::from_secs(60);

/// The dashboard whose queries must all return data.
const DASHBOARD: &str = "monitoring/dashboard.json";

/// Brings the topology up, starts Prometheus and the load, and runs the checks.
pub(super) fn run(sh: &Shell, compose: &[String], oha: &Oha) -> anyhow::Result<()> {
    ensure_port_free(KLAUS_PORT)?;
    let prometheus_bin = crate::alerts::ensure_prometheus(sh, "prometheus")?;
    let project = Project {
        sh,
        compose,
        name: format!("pk-e2e-{}-monitoring", std::process::id()),
        file: FILE,
    };
    project.run(&["up", "-d"])?;
    let result = checks(sh, &project, oha, &prometheus_bin);
    if result.is_err() {
        let _ = project.run(&["logs", "--no-color", "--tail", "40"]);
    }
    result
}

fn checks(
    sh: &Shell,
    project: &Project<'_>,
    oha: &Oha,
    prometheus_bin: &std::path::Path,
) -> anyhow::Result<()> {
    let klaus = Klaus::answering(sh, project)?;
    let petra = match project.containers("petra")?.as_slice() {
        [id] => SocketAddr::new(container_ip(sh, id)?, klaus.admin.port()),
        other => bail!("expected one Petra container, found {}", other.len()),
    };
    let prometheus = Prometheus::start(prometheus_bin, klaus.admin, petra)?;
    let started = unix_now();
    let _load = oha.start(
        &klaus.url(),
        &load_args(Some(LOAD_RATE), LOAD_CONNECTIONS, LOAD_LIMIT),
    )?;

    wait_for(READY_DEADLINE, || {
        let up = prometheus.query("sum(up)").ok()?;
        (scalar(&up) == Some(2.0)).then_some(())
    })
    .context("Prometheus did not see both admin ports up")?;
    wait_for(READY_DEADLINE, || {
        let ok = prometheus
            .query(r#"sum(rate(petra_calls_total{outcome="ok"}[1m]))"#)
            .ok()?;
        scalar(&ok).filter(|rate| *rate > 0.0)
    })
    .context("Prometheus saw no successful call to Petra")?;
    let firing = prometheus.firing()?;
    ensure!(
        firing.is_empty(),
        "alerts fire while everything works: {firing:?}"
    );
    pass("Prometheus scrapes both admin ports with the shipped rules; no alert fires");

    project.run(&["stop", "petra"])?;
    let stopped = Instant::now();
    let fired = wait_for(ALERT_DEADLINE, || {
        let firing = prometheus.firing().ok()?;
        let has = |name: &str| firing.iter().any(|(alert, _)| alert == name);
        (has("PetraUnreachable") && has("ServiceDown")).then_some(firing)
    })
    .context("PetraUnreachable and ServiceDown did not both fire after Petra stopped")?;
    pass(&format!(
        "Petra stopped: PetraUnreachable and ServiceDown fire after {:.1}s (for: {FOR}); firing: {}",
        stopped.elapsed().as_secs_f64(),
        fired
            .iter()
            .map(|(alert, labels)| format!("{alert}{{{labels}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    project.run(&["start", "petra"])?;
    wait_for(READY_DEADLINE, || {
        get(klaus.main, "/")
            .ok()
            .filter(|reply| reply.status == 200)
    })
    .context("Klaus did not answer 200 again after Petra started")?;
    // One more scrape of the new Petra, so that the dashboard shows its recovery.
    wait_for(READY_DEADLINE, || {
        let up = prometheus.query("sum(up)").ok()?;
        (scalar(&up) == Some(2.0)).then_some(())
    })
    .context("Prometheus did not see Petra up again")?;

    let queries = dashboard_queries()?;
    let mut empty = Vec::new();
    for (panel, expr) in &queries {
        let result = prometheus.query(&instant(expr))?;
        if result.as_array().is_none_or(Vec::is_empty) {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    ensure!(
        empty.is_empty(),
        "dashboard queries without data:\n  {}",
        empty.join("\n  ")
    );
    pass(&format!(
        "all {} queries of {DASHBOARD} return data",
        queries.len()
    ));

    let svg = super::picture::svg(&prometheus.panels(started, unix_now())?)?;
    let out = root()
        .join("target")
        .join("e2e-monitoring")
        .join("dashboard.svg");
    std::fs::write(&out, svg).with_context(|| out.display().to_string())?;
    pass(&format!("the run drawn in {}", out.display()));
    Ok(())
}

/// Debian's Prometheus, on the host, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    /// Writes its configuration and the shortened rules into `target/e2e-monitoring`, starts it
    /// on a free loopback port and waits until it is ready.
    fn start(bin: &std::path::Path, klaus: SocketAddr, petra: SocketAddr) -> anyhow::Result<Self> {
        let dir = root().join("target").join("e2e-monitoring");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
        }
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let rules = dir.join("rules.yml");
        crate::alerts::write_rules(&root().join(crate::alerts::RULES), &rules)?;
        let shipped = std::fs::read_to_string(&rules)?;
        let shortened = shorten_for(&shipped);
        ensure!(shortened != shipped, "the rules have no `for:` to shorten");
        std::fs::write(&rules, shortened)?;
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [rules.yml]\n\
                 scrape_configs:\n\
                 \x20 - job_name: klaus\n\
                 \x20   static_configs: [{{targets: ['{klaus}'], labels: {{placement: together}}}}]\n\
                 \x20 - job_name: petra\n\
                 \x20   static_configs: [{{targets: ['{petra}'], labels: {{placement: together}}}}]\n"
            ),
        )?;
        let addr = free_loopback_port()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let this = Self { child, addr };
        wait_for(READY_DEADLINE, || {
            get(addr, "/-/ready").ok().filter(|r| r.status == 200)
        })
        .with_context(|| {
            format!(
                "Prometheus at {addr} was not ready (its log: {})",
                dir.join("prometheus.log").display()
            )
        })?;
        Ok(this)
    }

    /// The `data` of an API call, after checking its status.
    fn api(&self, path: &str) -> anyhow::Result<Value> {
        let reply = get(self.addr, path)?;
        let json: Value = serde_json::from_str(&reply.body)
            .with_context(|| format!("{path}: not JSON: {}", reply.body))?;
        ensure!(
            json["status"] == "success",
            "{path}: {}",
            json["error"].as_str().unwrap_or(&reply.body)
        );
        Ok(json["data"].clone())
    }

    /// The result of an instant query (a vector).
    fn query(&self, expr: &str) -> anyhow::Result<Value> {
        Ok(self.api(&format!("/api/v1/query?query={}", encode(expr)))?["result"].clone())
    }

    /// The result of a range query over `[start, end]` at 1 s steps (a matrix).
    fn query_range(&self, expr: &str, start: f64, end: f64) -> anyhow::Result<Value> {
        Ok(self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            encode(expr)
        ))?["result"]
            .clone())
    }

    /// The alerts firing now, by name, with their labels (alertname and severity left out).
    fn firing(&self) -> anyhow::Result<Vec<(String, String)>> {
        let alerts = self.api("/api/v1/alerts")?;
        Ok(alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|alert| alert["state"] == "firing")
            .map(|alert| {
                let labels = &alert["labels"];
                let name = labels["alertname"].as_str().unwrap_or("?").to_owned();
                let rest = labels
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(key, _)| !matches!(key.as_str(), "alertname" | "severity"))
                    .map(|(key, value)| format!("{key}={}", value.as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(",");
                (name, rest)
            })
            .collect())
    }

    /// The dashboard's time-series panels with their series over `[start, end]`.
    fn panels(&self, start: f64, end: f64) -> anyhow::Result<Vec<super::picture::Panel>> {
        let dashboard = read_dashboard()?;
        let mut panels = Vec::new();
        let timeseries = |panel: &&Value| panel["type"] == "timeseries";
        for panel in dashboard["panels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(timeseries)
        {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            let mut lines = Vec::new();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default();
                let legend = target["legendFormat"].as_str().unwrap_or_default();
                for series in self
                    .query_range(&instant(expr), start, end)?
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let points = series["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|point| {
                            let time = point[0].as_f64()?;
                            let value: f64 = point[1].as_str()?.parse().ok()?;
                            value.is_finite().then_some((time - start, value))
                        })
                        .collect();
                    lines.push((fill_legend(legend, &series["metric"]), points));
                }
            }
            panels.push(super::picture::Panel {
                title,
                unit: panel["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                lines,
            });
        }
        Ok(panels)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `for:` of a rules file set to [`FOR`].
fn shorten_for(rules: &str) -> String {
    rules
        .lines()
        .map(|line| match line.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: {FOR}"),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn read_dashboard() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(root().join(DASHBOARD)).context(DASHBOARD)?;
    serde_json::from_str(&text).context(DASHBOARD)
}

/// Each panel's title with each of its queries.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let dashboard = read_dashboard()?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"]
            .as_array()
            .context("a panel without targets")?
        {
            let expr = target["expr"].as_str().context("a target without expr")?;
            queries.push((title.to_owned(), expr.to_owned()));
        }
    }
    ensure!(!queries.is_empty(), "{DASHBOARD} has no queries");
    Ok(queries)
}

/// A dashboard query with Grafana's variables replaced: every placement, a 1-minute rate window.
fn instant(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$placement", ".*")
}

/// A Grafana legend format (`{{label}}`) filled from a series' labels.
fn fill_legend(format: &str, metric: &Value) -> String {
    let mut out = format.to_owned();
    if let Some(labels) = metric.as_object() {
        for (key, value) in labels {
            out = out.replace(
                &format!("{{{{{key}}}}}"),
                value.as_str().unwrap_or_default(),
            );
        }
    }
    out
}

/// The single value of an instant query's result, if it has exactly one sample.
fn scalar(result: &Value) -> Option<f64> {
    match result.as_array()?.as_slice() {
        [sample] => sample["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

/// `text` percent-encoded for a URL's query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_for_is_shortened_and_nothing_else_changes() {
        let rules = "groups:\n  - rules:\n      - alert: A\n        expr: up == 0\n        for: 2m\n      - record: b\n        expr: \"for: 3m\"\n";
        let short = shorten_for(rules);
        assert!(short.contains("        for: 5s\n"), "{short}");
        assert!(short.contains("expr: \"for: 3m\""), "{short}");
        assert!(!short.contains("for: 2m"), "{short}");
    }

    #[test]
    fn queries_are_encoded_and_legends_filled() {
        assert_eq!(encode("sum(up{a=\"b\"})"), "sum%28up%7Ba%3D%22b%22%7D%29");
        let metric = serde_json::json!({"status": "502", "job": "klaus"});
        assert_eq!(fill_legend("{{job}} {{status}}", &metric), "klaus 502");
        let queries = dashboard_queries().expect("the dashboard's queries");
        assert!(queries.len() >= 10, "{queries:?}");
        assert!(queries.iter().all(|(_, expr)| !instant(expr).contains('$')));
    }
}
