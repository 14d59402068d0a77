//! The performance budget (see BENCHMARKS.md) and a run's checks against it: each line's figure,
//! limit and result, as a markdown table. The report and the A/B and placement cases make
//! their checks from here; nothing here knows a case.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// Server CPU per Klaus request, Klaus and Petra together, at 64 connections, on the
/// machine the issue was written on.
pub(super) const CPU_US_PER_KLAUS_REQUEST: f64 = 45.0;
/// What the nginx pair spent per request on that machine. The budget line scales 45 µs
/// by the nginx pair's figure in the same run over this one, so that it means the same
/// on a slower or faster machine: at most 45/53 = 0.85 of the nginx pair's CPU time.
pub(super) const NGINX_CPU_US_AT_BUDGET: f64 = 53.0;
/// Klaus p99 at most this many times Petra-direct p99, at 64 connections.
pub(super) const P99_RATIO: f64 = 2.0;
/// Resident memory of an idle service.
pub(super) const IDLE_RSS_MB: f64 = 10.0;
/// CPU per Klaus request at most this many times a baseline revision's, A/B medians of
/// one run (`--baseline`).
pub(super) const AB_CPU_RATIO: f64 = 1.10;
/// Resident memory of a service at 512 connections.
pub(super) const LOADED_RSS_MB: f64 = 64.0;
/// Process start to the first 200 from `/readyz`.
pub(super) const STARTUP_MS: f64 = 50.0;

/// The median of sorted values: the middle one, or the mean of the two middle ones.
pub(super) fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Appends the budget lines `checks` to `md` as a markdown table.
pub(super) fn budget_table(md: &mut String, checks: &[Check]) {
    md.push_str("\n| budget | figure | limit | result |\n|---|---|---|---|\n");
    for c in checks {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            c.line,
            c.figure,
            c.limit,
            c.result()
        );
    }
}

/// One line of the budget and how the run did against it.
#[derive(Debug)]
pub(super) struct Check {
    pub(super) line: String,
    pub(super) figure: String,
    pub(super) limit: String,
    /// `None` when the run did not measure it (`--only`).
    pub(super) pass: Option<bool>,
}

impl Check {
    pub(super) fn result(&self) -> &'static str {
        match self.pass {
            Some(true) => "pass",
            Some(false) => "**MISS**",
            None => "not measured",
        }
    }

    pub(super) fn json(&self) -> Value {
        json!({ "line": self.line, "figure": self.figure, "limit": self.limit, "pass": self.pass })
    }
}
