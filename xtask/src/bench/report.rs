//! The report of a run: the performance budget and the run's checks against it, the markdown
//! table and `summary.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use super::budget::{self, Check, budget_table, median};
use super::cases::{BUDGET_CONNECTIONS, Mode, describe};
use super::machine::Machine;
use super::measure::Measured;
use super::options::Options;
use super::services::Startup;
use super::stack::{
    KLAUS_HTTP, KLAUS_HTTPS, KLAUS_WARN, NGINX_KLAUS, NGINX_KLAUS_HTTPS, NGINX_PETRA, PETRA,
    PETRA_WARN,
};
use super::{ab, placement};

/// Everything a run found.
#[derive(Debug)]
pub(super) struct Report {
    pub(super) machine: Machine,
    pub(super) options: Options,
    pub(super) startup: Startup,
    pub(super) idle: BTreeMap<&'static str, f64>,
    pub(super) peak: BTreeMap<&'static str, f64>,
    pub(super) results: Vec<Measured>,
    /// The A/B comparison with `--baseline`.
    pub(super) ab: Option<ab::Ab>,
    /// The distance and overload cases.
    pub(super) placement: Option<placement::Placement>,
    pub(super) wall: Duration,
}

impl Report {
    pub(super) fn find(&self, target: &str, conns: usize, mode: Mode) -> Option<&Measured> {
        self.results
            .iter()
            .find(|m| m.case.target.key == target && m.case.conns == conns && m.case.mode == mode)
    }

    /// The peak RSS of a group over the 512-connection cases.
    pub(super) fn rss_at_512(&self, group: &str) -> Option<f64> {
        self.results
            .iter()
            .filter(|m| m.case.conns == 512)
            .filter_map(|m| m.peak_rss_mb.get(group).copied())
            .reduce(f64::max)
    }

    pub(super) fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let klaus = self.find(KLAUS_HTTPS, BUDGET_CONNECTIONS, Mode::KeepAlive);
        let nginx = self.find(NGINX_KLAUS_HTTPS, BUDGET_CONNECTIONS, Mode::KeepAlive);
        let petra = self.find(PETRA, BUDGET_CONNECTIONS, Mode::KeepAlive);

        // 45 µs where the nginx pair needed 53 µs: scaled by this machine's nginx figure.
        let cpu_limit = nginx.map(|n| {
            budget::CPU_US_PER_KLAUS_REQUEST * n.cpu_us_per_request / budget::NGINX_CPU_US_AT_BUDGET
        });
        checks.push(Check {
            line: "CPU per Klaus request (Klaus + Petra), 64 conns".into(),
            figure: klaus.map_or("not measured".into(), |k| {
                format!(
                    "{:.1} µs (nginx pair {})",
                    k.cpu_us_per_request,
                    nginx.map_or("–".into(), |n| format!("{:.1} µs", n.cpu_us_per_request))
                )
            }),
            limit: cpu_limit.map_or_else(
                || format!("≤ {:.0} µs", budget::CPU_US_PER_KLAUS_REQUEST),
                |limit| {
                    format!(
                        "≤ {limit:.1} µs (45 µs × nginx pair / 53 µs; absolute 45 µs: {})",
                        if klaus.is_some_and(
                            |k| k.cpu_us_per_request <= budget::CPU_US_PER_KLAUS_REQUEST
                        ) {
                            "met"
                        } else {
                            "missed"
                        }
                    )
                },
            ),
            pass: klaus
                .zip(cpu_limit)
                .map(|(k, limit)| k.cpu_us_per_request <= limit),
        });
        // Ahead of the nginx pair when requests are batched, and at one request at a time too.
        for conns in [BUDGET_CONNECTIONS, 1] {
            let klaus = self.find(KLAUS_HTTPS, conns, Mode::KeepAlive);
            let nginx = self.find(NGINX_KLAUS_HTTPS, conns, Mode::KeepAlive);
            checks.push(Check {
                line: format!(
                    "Klaus throughput vs nginx pair, {conns} conn{}",
                    if conns == 1 { "" } else { "s" }
                ),
                figure: match (klaus, nginx) {
                    (Some(k), Some(n)) => format!(
                        "{:.0} vs {:.0} req/s ({:+.0} %)",
                        k.rps,
                        n.rps,
                        (k.rps / n.rps - 1.0) * 100.0
                    ),
                    _ => "not measured".into(),
                },
                limit: "≥ nginx pair".into(),
                pass: klaus.zip(nginx).map(|(k, n)| k.rps >= n.rps),
            });
        }
        checks.push(Check {
            line: "Klaus p99 vs Petra-direct p99, 64 conns".into(),
            figure: match (klaus, petra) {
                (Some(k), Some(p)) => format!(
                    "{:.3} vs {:.3} ms ({:.2}×)",
                    k.p99_ms,
                    p.p99_ms,
                    k.p99_ms / p.p99_ms
                ),
                _ => "not measured".into(),
            },
            limit: format!("≤ {:.0}×", budget::P99_RATIO),
            pass: klaus
                .zip(petra)
                .map(|(k, p)| k.p99_ms <= budget::P99_RATIO * p.p99_ms),
        });
        for (service, group) in [("Petra", PETRA), ("Klaus", KLAUS_HTTPS)] {
            let idle = self.idle.get(group).copied();
            checks.push(Check {
                line: format!("{service} idle RSS"),
                figure: idle.map_or("–".into(), |mb| format!("{mb:.1} MB")),
                limit: format!("≤ {:.0} MB", budget::IDLE_RSS_MB),
                pass: idle.map(|mb| mb <= budget::IDLE_RSS_MB),
            });
        }
        for (service, groups) in [
            ("Petra", &[PETRA][..]),
            ("Klaus", &[KLAUS_HTTPS, KLAUS_HTTP]),
        ] {
            let rss = groups
                .iter()
                .filter_map(|g| self.rss_at_512(g))
                .reduce(f64::max);
            checks.push(Check {
                line: format!("{service} RSS at 512 conns"),
                figure: rss.map_or("not measured".into(), |mb| format!("{mb:.1} MB")),
                limit: format!("≤ {:.0} MB", budget::LOADED_RSS_MB),
                pass: rss.map(|mb| mb <= budget::LOADED_RSS_MB),
            });
        }
        for (service, key) in [("Petra", "petra"), ("Klaus", "klaus")] {
            let ms = self.startup.get(key).map(|runs| median(runs));
            checks.push(Check {
                line: format!("{service} startup to ready (median)"),
                figure: ms.map_or("–".into(), |ms| format!("{ms:.1} ms")),
                limit: format!("≤ {:.0} ms", budget::STARTUP_MS),
                pass: ms.map(|ms| ms <= budget::STARTUP_MS),
            });
        }
        if let Some(ab) = &self.ab {
            checks.push(ab.check());
        }
        if let Some(placement) = &self.placement {
            checks.extend(placement.checks());
        }
        let ours: Vec<&Measured> = self
            .results
            .iter()
            .filter(|m| m.case.target.ours)
            .chain(self.ab.iter().flat_map(|ab| ab.current()))
            .collect();
        let failed: u64 = ours.iter().map(|m| m.errors + m.non_2xx).sum();
        let total: u64 = ours.iter().map(|m| m.responses + m.errors).sum();
        checks.push(Check {
            line: "Errors and non-2xx, Petra and Klaus, every case".into(),
            figure: format!("{failed} of {total}"),
            limit: "0".into(),
            pass: (!ours.is_empty()).then_some(failed == 0),
        });
        checks
    }

    pub(super) fn markdown(&self, checks: &[Check]) -> String {
        let m = &self.machine;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Run {} on {} cores ({}), {}; load average {} before, {} after; \
             {} s per case after a {} s warm-up; {}, nginx {}. Wall time {:.0} s.\n",
            m.date,
            m.cores,
            m.cpu,
            m.kernel,
            m.load_before,
            m.load_after,
            self.options.duration.as_secs_f64(),
            self.options.warmup.as_secs_f64(),
            m.oha,
            m.nginx,
            self.wall.as_secs_f64()
        );
        md.push_str(
            "| case | conns | req/s | p50 ms | p99 ms | p99.9 ms | errors | non-2xx | server CPU µs/req | other load |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for r in &self.results {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {:.1} | {:.0} % |",
                describe(&r.case),
                r.case.conns,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.errors,
                r.non_2xx,
                r.cpu_us_per_request,
                r.background_pct
            );
        }
        md.push_str(
            "\n| process | startup to ready, median (min–max) | idle RSS MB | RSS at 512 conns MB | peak RSS MB |\n\
             |---|--:|--:|--:|--:|\n",
        );
        for (name, startup) in [
            (PETRA, Some("petra")),
            (KLAUS_HTTPS, Some("klaus")),
            (KLAUS_HTTP, None),
            (PETRA_WARN, None),
            (KLAUS_WARN, None),
            (NGINX_PETRA, None),
            (NGINX_KLAUS, None),
        ] {
            let startup = startup
                .and_then(|s| self.startup.get(s))
                .map_or("–".into(), |runs| {
                    format!(
                        "{:.1} ms ({:.1}–{:.1})",
                        median(runs),
                        runs.first().copied().unwrap_or(f64::NAN),
                        runs.last().copied().unwrap_or(f64::NAN)
                    )
                });
            let mb = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
            let _ = writeln!(
                md,
                "| {name} | {startup} | {} | {} | {} |",
                mb(self.idle.get(name).copied()),
                mb(self.rss_at_512(name)),
                mb(self.peak.get(name).copied()),
            );
        }
        if let Some(ab) = &self.ab {
            ab.markdown(&mut md);
        }
        if let Some(placement) = &self.placement {
            placement.markdown(&mut md);
        }
        budget_table(&mut md, checks);
        md
    }

    pub(super) fn json(&self, checks: &[Check]) -> Value {
        let m = &self.machine;
        json!({
            "machine": {
                "cores": m.cores, "cpu": m.cpu, "kernel": m.kernel, "date": m.date,
                "load_before": m.load_before, "load_after": m.load_after,
                "oha": m.oha, "nginx": m.nginx, "clk_tck": m.clk_tck,
            },
            "duration_s": self.options.duration.as_secs_f64(),
            "warmup_s": self.options.warmup.as_secs_f64(),
            "wall_s": self.wall.as_secs_f64(),
            "startup_ms": self.startup,
            "idle_rss_mb": self.idle,
            "peak_rss_mb": self.peak,
            "cases": self.results.iter().map(Measured::json).collect::<Vec<_>>(),
            "baseline": self.ab.as_ref().map(ab::Ab::json),
            "placement": self.placement.as_ref().map(placement::Placement::json),
            "budget": checks.iter().map(Check::json).collect::<Vec<_>>(),
        })
    }
}
