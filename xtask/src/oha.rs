//! The HTTP load generator, oha: found or installed, started with the open-files limit that
//! thousands of connections need, and its JSON report read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use xshell::Shell;

use crate::tools;
use crate::util::{nofile_to_raise, with_nofile};

/// The arguments of an oha run: a rate (none for as fast as it goes), connections, duration.
pub(crate) fn load_args(rate: Option<u32>, connections: u32, duration: Duration) -> Vec<String> {
    let mut args = vec![
        "-c".to_owned(),
        connections.to_string(),
        "-z".to_owned(),
        format!("{}ms", duration.as_millis()),
    ];
    if let Some(rate) = rate {
        args.extend(["-q".to_owned(), rate.to_string()]);
    }
    args
}

/// The load generator, and the open-files limit it needs for thousands of connections.
#[derive(Debug)]
pub(crate) struct Oha {
    path: PathBuf,
    nofile: Option<u64>,
}

impl Oha {
    /// Finds oha, installing it when missing.
    pub(crate) fn find(sh: &Shell) -> anyhow::Result<Self> {
        Ok(Self {
            path: tools::oha(sh)?,
            nofile: nofile_to_raise()?,
        })
    }

    /// The oha binary.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The open-files limit oha (and the servers it loads) run with, when the inherited one is too
    /// low for thousands of connections.
    pub(crate) fn nofile(&self) -> Option<u64> {
        self.nofile
    }

    /// oha with the raised open-files limit and no arguments yet.
    pub(crate) fn command(&self) -> Command {
        with_nofile(&self.path, self.nofile)
    }

    /// oha against `url`, writing its JSON report to stdout: no terminal UI, the latency of the 2xx
    /// answers apart, and requests still running at the end waited for (`-w`), so that none is
    /// counted as an error.
    fn load(&self, url: &str, args: &[String]) -> Command {
        let mut command = self.command();
        command
            .args([
                "--no-tui",
                "--output-format",
                "json",
                "--stats-success-breakdown",
                "-w",
            ])
            .args(args)
            .arg(url)
            .stdin(Stdio::null());
        command
    }

    /// Starts oha against `url` in the background.
    pub(crate) fn start(&self, url: &str, args: &[String]) -> anyhow::Result<Load> {
        let child = self
            .load(url, args)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting oha")?;
        Ok(Load { child: Some(child) })
    }

    /// Runs oha against `url` and returns its JSON report as it wrote it, to be kept as a file.
    pub(crate) fn output(&self, url: &str, args: &[String]) -> anyhow::Result<String> {
        let output = self.load(url, args).output().context("running oha")?;
        ensure!(
            output.status.success(),
            "oha failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        String::from_utf8(output.stdout).context("oha's output is not UTF-8")
    }

    /// Runs oha against `url` and returns its report.
    pub(crate) fn run(&self, url: &str, args: &[String]) -> anyhow::Result<Report> {
        self.start(url, args)?.finish()
    }
}

/// An oha run in the background, killed if it is dropped before it finished.
pub(crate) struct Load {
    child: Option<Child>,
}

impl Load {
    /// Waits for oha to end and reads its report.
    pub(crate) fn finish(mut self) -> anyhow::Result<Report> {
        let child = self.child.take().context("oha was already waited for")?;
        let output = child.wait_with_output().context("waiting for oha")?;
        ensure!(output.status.success(), "oha failed ({})", output.status);
        let json: Value = serde_json::from_slice(&output.stdout).context("parsing oha's JSON")?;
        Report::parse(&json)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What an oha run reports: answers by status, errors by message, length, latency percentiles
/// (of every answer, and of the 2xx answers alone) and the slowest latency.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) statuses: BTreeMap<u16, u64>,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) seconds: f64,
    pub(crate) p99_ms: f64,
    /// The p99 latency of the 2xx answers alone.
    pub(crate) p99_ok_ms: Option<f64>,
    pub(crate) slowest_ms: f64,
    /// `latencyPercentiles` and `latencyPercentilesSuccessful`, by key (`p50`, `p99.9`), in ms.
    percentiles_ms: BTreeMap<String, f64>,
    ok_percentiles_ms: BTreeMap<String, f64>,
}

impl Report {
    /// Reads oha's JSON output (`--output-format json`).
    pub(crate) fn parse_text(text: &str) -> anyhow::Result<Self> {
        Self::parse(&serde_json::from_str(text).context("parsing oha's JSON output")?)
    }

    pub(crate) fn parse(json: &Value) -> anyhow::Result<Self> {
        let percentiles = |key: &str| -> BTreeMap<String, f64> {
            json[key]
                .as_object()
                .map(|map| {
                    map.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? * 1e3)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let counts = |key: &str| -> BTreeMap<String, u64> {
            json[key]
                .as_object()
                .map(|map| {
                    map.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let statuses = counts("statusCodeDistribution")
            .into_iter()
            .map(|(code, n)| Ok((code.parse()?, n)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            statuses,
            errors: counts("errorDistribution"),
            seconds: json["summary"]["total"]
                .as_f64()
                .context("oha's report has no summary.total")?,
            p99_ms: json["latencyPercentiles"]["p99"]
                .as_f64()
                .unwrap_or(f64::NAN)
                * 1e3,
            p99_ok_ms: json["latencyPercentilesSuccessful"]["p99"]
                .as_f64()
                .map(|seconds| seconds * 1e3),
            slowest_ms: json["summary"]["slowest"].as_f64().unwrap_or(f64::NAN) * 1e3,
            percentiles_ms: percentiles("latencyPercentiles"),
            ok_percentiles_ms: percentiles("latencyPercentilesSuccessful"),
        })
    }

    /// A latency percentile of every answer (`p50`, `p99`, `p99.9`) in ms; NaN when oha gave none.
    pub(crate) fn percentile_ms(&self, key: &str) -> f64 {
        self.percentiles_ms.get(key).copied().unwrap_or(f64::NAN)
    }

    /// A latency percentile of the 2xx answers alone, in ms; NaN when oha gave none.
    pub(crate) fn ok_percentile_ms(&self, key: &str) -> f64 {
        self.ok_percentiles_ms.get(key).copied().unwrap_or(f64::NAN)
    }

    /// Every answer, whatever its status.
    pub(crate) fn responses(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// The answers outside 2xx.
    pub(crate) fn non_2xx(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(_, n)| n)
            .sum()
    }

    pub(crate) fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Every request: answered, or failed with an error.
    pub(crate) fn total(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }

    /// Requests that did not end in 200.
    pub(crate) fn failures(&self) -> u64 {
        self.total() - self.count(200)
    }

    /// The 200s per second of the run.
    pub(crate) fn ok_rate(&self) -> f64 {
        self.count(200) as f64 / self.seconds
    }

    /// Fails unless every request ended in 200; `what` names the run in the message.
    pub(crate) fn ensure_all_ok(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.failures() == 0,
            "{what}: {} of {} requests did not end in 200 ({})",
            self.failures(),
            self.total(),
            self.outcomes()
        );
        Ok(())
    }

    /// Fails unless oha sent at least half the requests `rate` per second would have: a load far
    /// below its rate would make "nothing failed" mean little.
    pub(crate) fn ensure_rate_kept(&self, rate: u32, what: &str) -> anyhow::Result<()> {
        let planned = f64::from(rate) * self.seconds;
        anyhow::ensure!(
            self.total() as f64 >= planned / 2.0,
            "{what}: oha sent {} requests in {:.1}s, under half the {rate}/s planned",
            self.total(),
            self.seconds
        );
        Ok(())
    }

    /// The answers by status and the errors, on one line.
    pub(crate) fn outcomes(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{n} × {status}"))
            .collect();
        parts.extend(
            self.errors
                .iter()
                .map(|(error, n)| format!("{n} × error {error:?}")),
        );
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_the_p99_of_the_successes_apart() {
        // The shape of oha 1.16's JSON with --stats-success-breakdown, trimmed.
        let json = serde_json::json!({
            "summary": { "total": 10.0, "slowest": 1.5 },
            "latencyPercentiles": { "p99": 0.9 },
            "latencyPercentilesSuccessful": { "p99": 0.25 },
            "latencyPercentilesNotSuccessful": { "p99": 1.2 },
            "statusCodeDistribution": { "200": 900, "503": 100 },
            "errorDistribution": {}
        });
        let report = Report::parse(&json).expect("a valid report");
        assert_eq!(report.count(200), 900);
        assert_eq!(report.failures(), 100);
        assert_eq!(report.p99_ms, 900.0);
        assert_eq!(report.p99_ok_ms, Some(250.0));
        assert_eq!(report.ok_percentile_ms("p99"), 250.0);
        assert!(report.percentile_ms("p50").is_nan());
        assert_eq!((report.responses(), report.non_2xx()), (1000, 100));
    }

    #[test]
    fn report_without_the_breakdown_has_no_p99_of_the_successes() {
        let json = serde_json::json!({
            "summary": { "total": 1.0 },
            "statusCodeDistribution": { "200": 1 }
        });
        assert_eq!(
            Report::parse(&json).expect("a valid report").p99_ok_ms,
            None
        );
    }
}
