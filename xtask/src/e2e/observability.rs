//! `cargo xtask e2e observability`: docker-compose.yml with docker-compose.observability.yml, as
//! the README tells a person to run it. Klaus must answer; a request's trace must reach tracesink
//! with the spans of both services in one tree; Prometheus (the image built from Debian's
//! package) must scrape both admin ports, hold every shipped alerting rule, fire none, and see
//! the spans the services exported.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use xshell::{Shell, cmd};

use super::{KLAUS_PORT, Project, ensure_port_free, pass, wait_for};
use crate::http::get;

const FILE: &str = "docker-compose.yml";
const OVERRIDE: &str = "docker-compose.observability.yml";

/// Where the override publishes tracesink and Prometheus on the host's loopback.
const TRACESINK_PORT: u16 = 4318;
const PROMETHEUS_PORT: u16 = 9099;

/// How long the stack may take to answer (the Prometheus image may be built first), and to show
/// what it was sent.
const STARTUP_DEADLINE: Duration = Duration::from_secs(300);
const SEEN_DEADLINE: Duration = Duration::from_secs(30);

pub(super) fn run(sh: &Shell, compose: &[String]) -> anyhow::Result<()> {
    for port in [KLAUS_PORT, TRACESINK_PORT, PROMETHEUS_PORT] {
        ensure_port_free(port)?;
    }
    let project = Project {
        sh,
        compose,
        name: format!("pk-e2e-{}-observability", std::process::id()),
        file: FILE,
    };
    let extra = [Path::new(OVERRIDE)];
    // Torn down with the override too, before the project's own teardown, so that its volume
    // and containers go as well.
    let _down = Down {
        project: &project,
        extra: &extra,
    };
    project.run_with(&extra, &["up", "-d"])?;
    let result = checks(sh);
    if result.is_err() {
        let _ = project.run_with(&extra, &["logs", "--no-color", "--tail", "40"]);
    }
    result
}

struct Down<'a, 'b> {
    project: &'a Project<'b>,
    extra: &'a [&'a Path],
}

impl Drop for Down<'_, '_> {
    fn drop(&mut self) {
        if let Err(err) = self.project.run_with(
            self.extra,
            &["down", "-v", "--remove-orphans", "--timeout", "10"],
        ) {
            eprintln!(
                "warning: tearing down {} failed: {err:#}",
                self.project.name
            );
        }
    }
}

fn checks(sh: &Shell) -> anyhow::Result<()> {
    let klaus = SocketAddr::from(([127, 0, 0, 1], KLAUS_PORT));
    wait_for(STARTUP_DEADLINE, || {
        get(klaus, "/")
            .ok()
            .filter(|reply| reply.status == 200 && reply.body == "hello world")
    })
    .context("Klaus did not answer hello world")?;
    pass("Klaus answers hello world with the observability override");

    // A sampled request with a trace id of its own: its spans must reach tracesink.
    let trace_id = format!("{:032x}", u128::from(std::process::id()) << 64 | 0x5eed);
    let traceparent = format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01");
    let url = format!("http://127.0.0.1:{KLAUS_PORT}/");
    let body = cmd!(sh, "curl -sS --max-time 5 -H {traceparent} {url}").read()?;
    ensure!(body == "hello world", "Klaus answered {body:?}");
    let spans = wait_for(SEEN_DEADLINE, || {
        let spans = tracesink(sh, &format!("/api/traces/{trace_id}")).ok()?;
        let spans = spans.as_array()?.clone();
        (spans.len() >= 4).then_some(spans)
    })
    .with_context(|| format!("tracesink did not receive the four spans of trace {trace_id}"))?;
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s["service"] == service && s["name"] == name)
            .cloned()
            .with_context(|| format!("no {service} span {name:?} in {spans:#?}"))
    };
    let klaus_server = find("klaus", "GET /")?;
    let attempt = find("klaus", "GET")?;
    let petra_server = find("petra", "GET /")?;
    ensure!(
        klaus_server["parent_span_id"] == "00f067aa0ba902b7",
        "Klaus's span is not the caller's child: {klaus_server}"
    );
    ensure!(
        petra_server["parent_span_id"] == attempt["span_id"],
        "Petra's span is not the attempt's child: {petra_server} / {attempt}"
    );
    let waterfall_url = format!("http://127.0.0.1:{TRACESINK_PORT}/traces/{trace_id}");
    let waterfall = cmd!(sh, "curl -sS --max-time 5 {waterfall_url}").read()?;
    ensure!(
        waterfall.contains("petra GET /"),
        "the waterfall lacks Petra: {waterfall}"
    );
    pass(&format!(
        "trace {trace_id}: {} spans in tracesink, Klaus > call > attempt > Petra\n{waterfall}",
        spans.len()
    ));

    wait_for(SEEN_DEADLINE, || {
        let up = prometheus(sh, "sum(up)").ok()?;
        (scalar(&up) == Some(2.0)).then_some(())
    })
    .context("Prometheus did not see both admin ports up")?;
    wait_for(SEEN_DEADLINE, || {
        let sent = prometheus(sh, r#"sum(trace_spans_exported_total{outcome="ok"})"#).ok()?;
        scalar(&sent).filter(|n| *n >= 4.0)
    })
    .context("Prometheus did not see the spans exported")?;
    let rules = query_api(sh, "/api/v1/rules?type=alert")?;
    let loaded: usize = rules["data"]["groups"]
        .as_array()
        .context("no rule groups")?
        .iter()
        .map(|group| group["rules"].as_array().map_or(0, Vec::len))
        .sum();
    let shipped = crate::alerts::write_rules(
        &crate::util::root().join(crate::alerts::RULES),
        &crate::util::root()
            .join("target")
            .join("e2e-observability-rules.yml"),
    )?
    .values()
    .sum::<usize>();
    ensure!(
        loaded == shipped,
        "Prometheus loaded {loaded} alerting rules, the PrometheusRule has {shipped}"
    );
    let firing = query_api(sh, "/api/v1/alerts")?;
    let firing: Vec<&Value> = firing["data"]["alerts"]
        .as_array()
        .context("no alerts list")?
        .iter()
        .filter(|alert| alert["state"] == "firing")
        .collect();
    ensure!(
        firing.is_empty(),
        "alerts fire while everything works: {firing:?}"
    );
    pass(&format!(
        "Prometheus scrapes both admin ports, holds the {shipped} shipped alerts (none firing) and counts the exported spans"
    ));
    Ok(())
}

fn tracesink(sh: &Shell, path: &str) -> anyhow::Result<Value> {
    let url = format!("http://127.0.0.1:{TRACESINK_PORT}{path}");
    let text = cmd!(sh, "curl -sS --fail --max-time 5 {url}")
        .quiet()
        .read()?;
    Ok(serde_json::from_str(&text)?)
}

fn query_api(sh: &Shell, path: &str) -> anyhow::Result<Value> {
    let url = format!("http://127.0.0.1:{PROMETHEUS_PORT}{path}");
    let text = cmd!(sh, "curl -sS --fail --max-time 5 {url}")
        .quiet()
        .read()?;
    let value: Value = serde_json::from_str(&text)?;
    if value["status"] != "success" {
        bail!("Prometheus answered {text}");
    }
    Ok(value)
}

fn prometheus(sh: &Shell, query: &str) -> anyhow::Result<Value> {
    let url = format!("http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query");
    let query = format!("query={query}");
    let text = cmd!(
        sh,
        "curl -sS --fail --max-time 5 --get --data-urlencode {query} {url}"
    )
    .quiet()
    .read()?;
    let value: Value = serde_json::from_str(&text)?;
    Ok(value["data"]["result"].clone())
}

/// The value of a one-series result, if it has exactly one.
fn scalar(result: &Value) -> Option<f64> {
    match result.as_array()?.as_slice() {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}
