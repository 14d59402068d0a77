//! One case measured: a warm-up, then oha for the window while the servers' CPU time (from
//! `/proc`) and memory are read; and the wait for other processes' load to pass first.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::cases::{Case, Mode, describe};
use super::machine::{Machine, Tools};
use super::options::Options;
use super::stack::{Group, Stack};
use crate::oha;
use crate::procfs::{self, own_ticks, stat_fields};

/// What one case measured.
#[derive(Debug, Clone)]
pub(super) struct Measured {
    pub(super) case: Case,
    pub(super) responses: u64,
    pub(super) seconds: f64,
    pub(super) rps: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) p999_ms: f64,
    pub(super) errors: u64,
    pub(super) non_2xx: u64,
    pub(super) error_kinds: BTreeMap<String, u64>,
    pub(super) cpu_us_per_request: f64,
    pub(super) cpu_seconds: BTreeMap<&'static str, f64>,
    pub(super) peak_rss_mb: BTreeMap<&'static str, f64>,
    /// CPU used by other processes during the window, in % of all cores.
    pub(super) background_pct: f64,
}

impl Measured {
    /// This case in `summary.json`.
    pub(super) fn json(&self) -> Value {
        json!({
            "id": self.case.id,
            "what": describe(&self.case),
            "target": self.case.target.key,
            "ours": self.case.target.ours,
            "connections": self.case.conns,
            "mode": format!("{:?}", self.case.mode),
            "responses": self.responses,
            "seconds": self.seconds,
            "requests_per_second": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "p99_9_ms": self.p999_ms,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "non_2xx": self.non_2xx,
            "cpu_us_per_request": self.cpu_us_per_request,
            "cpu_seconds": self.cpu_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "other_load_percent": self.background_pct,
        })
    }
}

impl Measured {
    pub(super) fn one_line(&self) -> String {
        format!(
            "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {} errors, {} non-2xx, \
             {:.1} µs CPU/req, other load {:.0} %",
            self.rps,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.errors,
            self.non_2xx,
            self.cpu_us_per_request,
            self.background_pct
        )
    }
}

/// Samples the resident memory of some groups until stopped; returns each one's peak in MiB.
pub(super) struct RssSampler {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) handle: thread::JoinHandle<BTreeMap<&'static str, f64>>,
}

impl RssSampler {
    pub(super) fn start(groups: Vec<(&'static str, Group)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak: BTreeMap<&'static str, f64> = BTreeMap::new();
            loop {
                for (name, group) in &groups {
                    let mb = group.rss_kib("VmRSS") as f64 / 1024.0;
                    let entry = peak.entry(name).or_insert(0.0);
                    *entry = entry.max(mb);
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        Self { stop, handle }
    }

    pub(super) fn finish(self) -> BTreeMap<&'static str, f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// Warms up, then runs oha for the measured window while reading the servers' CPU time and
/// memory.
pub(super) fn measure(
    stack: &Stack,
    tools: &Tools,
    certs: &Path,
    out: &Path,
    case: &Case,
    options: &Options,
    machine: &Machine,
) -> anyhow::Result<Measured> {
    let (clk_tck, cores) = (machine.clk_tck, machine.cores);
    let url = stack
        .urls
        .get(case.target.key)
        .with_context(|| format!("no URL for {}", case.target.key))?;
    for proc in &stack.procs {
        // A service that died would show as errors; say which one.
        if stat_fields(proc.pid()).is_none_or(|f| f.first().map(String::as_str) == Some("Z")) {
            bail!("{} is no longer running", proc.name);
        }
    }
    run_oha(tools, certs, case, url, options.warmup).context("warm-up")?;

    let groups: Vec<(&'static str, Group)> = case
        .target
        .cpu
        .iter()
        .map(|&name| Ok((name, stack.group(name)?.clone())))
        .collect::<anyhow::Result<_>>()?;
    let before: Vec<u64> = groups
        .iter()
        .map(|(_, g)| g.cpu_ticks())
        .collect::<anyhow::Result<_>>()?;
    let ours_before = stack.all_cpu_ticks()? + own_ticks()?;
    let busy_before = machine_busy_ticks()?;
    let window = Instant::now();
    let sampler = RssSampler::start(groups.clone());
    let raw = run_oha(tools, certs, case, url, options.duration);
    let peak_rss_mb = sampler.finish();
    let raw = raw?;
    let after: Vec<u64> = groups
        .iter()
        .map(|(_, g)| g.cpu_ticks())
        .collect::<anyhow::Result<_>>()?;
    // Whatever else kept the cores busy in the window: the machine's busy time minus the
    // servers', oha's and this task's own. Anything well above zero skews the figures.
    let busy = machine_busy_ticks()?.saturating_sub(busy_before);
    let ours = (stack.all_cpu_ticks()? + own_ticks()?).saturating_sub(ours_before);
    let capacity = window.elapsed().as_secs_f64() * clk_tck as f64 * cores as f64;
    let background_pct = busy.saturating_sub(ours) as f64 / capacity * 100.0;
    let file = raw_path(out, case);
    fs::write(&file, &raw).with_context(|| format!("writing {}", file.display()))?;

    let report = oha::Report::parse_text(&raw)?;
    let (seconds, responses) = (report.seconds, report.responses());
    let clk_tck = clk_tck as f64;
    let mut cpu_seconds = BTreeMap::new();
    let mut total_ticks = 0;
    for (((name, _), b), a) in groups.iter().zip(&before).zip(&after) {
        let ticks = a.saturating_sub(*b);
        total_ticks += ticks;
        cpu_seconds.insert(*name, ticks as f64 / clk_tck);
    }
    let cpu_us_per_request = if responses > 0 {
        total_ticks as f64 / clk_tck * 1e6 / responses as f64
    } else {
        f64::NAN
    };
    Ok(Measured {
        case: case.clone(),
        responses,
        seconds,
        rps: responses as f64 / seconds,
        p50_ms: report.percentile_ms("p50"),
        p99_ms: report.percentile_ms("p99"),
        p999_ms: report.percentile_ms("p99.9"),
        errors: report.errors.values().sum(),
        non_2xx: report.non_2xx(),
        error_kinds: report.errors,
        cpu_us_per_request,
        cpu_seconds,
        peak_rss_mb,
        background_pct,
    })
}

/// Where oha's own report of a case is kept.
pub(super) fn raw_path(out: &Path, case: &Case) -> PathBuf {
    out.join(format!("raw/{}.json", case.id.replace('/', "-")))
}

/// Waits up to `max` for other processes to leave the cores alone (under 10 % of them, over
/// one second), so that a burst of someone else's work does not land in a measured window.
pub(super) fn wait_for_quiet(
    stack: &Stack,
    machine: &Machine,
    max: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let (busy, ours) = (machine_busy_ticks()?, stack.all_cpu_ticks()? + own_ticks()?);
        let window = Instant::now();
        thread::sleep(Duration::from_secs(1));
        let busy = machine_busy_ticks()?.saturating_sub(busy);
        let ours = (stack.all_cpu_ticks()? + own_ticks()?).saturating_sub(ours);
        let capacity = window.elapsed().as_secs_f64() * (machine.clk_tck * machine.cores) as f64;
        let other = busy.saturating_sub(ours) as f64 / capacity * 100.0;
        if other < 10.0 {
            return Ok(());
        }
        if started.elapsed() >= max {
            println!("    the machine is still busy (other load {other:.0} %); measuring anyway");
            return Ok(());
        }
        if !said {
            println!("    waiting up to {max:?} for other load ({other:.0} %) to pass");
            said = true;
        }
    }
}

/// Runs oha for `duration` and returns its JSON report, as oha wrote it.
fn run_oha(
    tools: &Tools,
    certs: &Path,
    case: &Case,
    url: &str,
    duration: Duration,
) -> anyhow::Result<String> {
    let path = |p: &str| certs.join(p).display().to_string();
    let mut args = vec![
        "-z".to_owned(),
        format!("{}ms", duration.as_millis()),
        "-c".to_owned(),
        case.conns.to_string(),
        "--cacert".to_owned(),
        path("ca.crt"),
    ];
    match case.mode {
        Mode::KeepAlive => {}
        Mode::Churn => args.push("--disable-keepalive".to_owned()),
        Mode::Http2 => args.push("--http2".to_owned()),
    }
    if case.target.key.contains("petra") {
        args.extend([
            "--cert".to_owned(),
            path("klaus/tls.crt"),
            "--key".to_owned(),
            path("klaus/tls.key"),
        ]);
    }
    tools.oha.output(url, &args)
}

/// Busy time of the whole machine, all cores, in clock ticks (`/proc/stat` minus idle and
/// iowait).
pub(super) fn machine_busy_ticks() -> anyhow::Result<u64> {
    Ok(procfs::host_ticks()?.busy)
}
