//! The placement cases: Klaus calling Petra across a link at three distances, and Klaus beside
//! Petra under an overload of clients that ignore `Retry-After`; their table, JSON and budget.
//!
//! Each distance gets a fresh Petra, a fresh link and a fresh Klaus (plain-HTTP front), so that
//! Klaus's peak memory is that of one distance. The link is `slowlink` from the release build, a
//! process of its own: its CPU time is neither Klaus's nor Petra's, and CPU per request counts
//! those two only, as in every other case. The link runs at every distance, the co-located one
//! included (round trip 0), so that the three differ by the distance alone. The overload cases
//! run without a link, on a fresh pair: [`OVERLOAD_ROUNDS`] rounds of 64 connections and 2,000
//! on the same processes, the order alternating, and the goodput line reads the median of the
//! rounds' ratios: one pair of windows moved by a quarter between runs of one build on these
//! machines (BENCHMARKS.md), as the two cores' sharing among oha, Klaus and Petra moves.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::Binaries;
use super::cases::{Case, Mode, Target, target};
use super::machine::{Machine, Tools};
use super::measure::{Measured, machine_busy_ticks, measure, raw_path, wait_for_quiet};
use super::options::Options;
use super::process::{Proc, free_ports, loopback};
use super::services::{klaus_env, petra_env};
use super::stack::{Group, Stack};
use crate::oha;
use crate::procfs::{reset_peak_rss, thread_demand_ns};
use crate::util::{root, step};

mod report;

/// Client connections of the distance cases: enough for a 50 ms link to carry the co-located
/// rate (Little's law: in flight = rate × latency; 2,000 in flight over 55 ms is about 36,000
/// requests per second, above what the pair serves on this machine).
const LINK_CONNECTIONS: usize = 2_000;

/// Client connections of the overload case (oha ignores `Retry-After`: a 503 is followed at once
/// by the next request on the same connection).
const OVERLOAD_CONNECTIONS: usize = 2_000;

/// Client connections of the rate the overload case is compared with.
const OVERLOAD_BASE_CONNECTIONS: usize = 64;

/// Rounds of the overload cases, each one window at 64 connections and one at 2,000; the
/// rounds alternate which goes first, so that a drift in the machine's pace does not always
/// land on the same side.
const OVERLOAD_ROUNDS: usize = 3;

/// The placement lines of the budget (see BENCHMARKS.md, "Placement").
mod budget {
    /// Klaus over a 50 ms link: at least this share of its co-located 200s per second.
    pub(super) const DISTANCE_RATIO: f64 = 0.7;
    /// Saturated: Klaus's busiest thread (the one that serves) was on a core or waiting for one
    /// at least this share of the time. That is Klaus at 90 % of a core, or Klaus wanting a core
    /// that the load generator, the link and Petra held. Below it, Klaus was waiting on the
    /// network with CPU to spare, and a 503 is a setting's doing, not a lack of CPU.
    pub(super) const SATURATED: f64 = 0.9;
    /// Under overload: 200s per second at 2,000 connections over those at 64.
    pub(super) const GOODPUT_RATIO: f64 = 0.7;
    /// Under overload: the p99 of the 200s.
    pub(super) const OVERLOAD_P99_MS: f64 = 1000.0;
    /// The manifests' memory limit for Klaus (`k8s/base/klaus/deployment.yaml`), in MiB.
    pub(super) const RSS_LIMIT_MB: f64 = 128.0;
}

/// The process groups of a pair. Klaus's is also its URL's key, which must not hold "petra": the
/// stack checks that URL for "hello world", and oha calls it without a client certificate.
const PETRA: &str = "placement-petra";
const KLAUS: &str = "placement-klaus";
const LINK: &str = "placement-link";

/// Klaus's plain-HTTP front; a request costs Klaus and Petra, not the link.
const KLAUS_FRONT: Target = target(KLAUS, "klaus", true, &[KLAUS, PETRA]);

/// A link between Klaus and Petra: the round trip it adds and how much that varies either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Distance {
    /// Short name, for case ids and files.
    id: &'static str,
    /// The distance in words, for the table and the plot.
    pub(super) label: &'static str,
    /// Round trip added by the link, in milliseconds.
    pub(super) rtt_ms: u64,
    /// Jitter of that round trip, either way, in milliseconds.
    jitter_ms: u64,
}

/// The three distances: co-located (through the link, with no delay), and two cloud-to-cloud
/// links.
const DISTANCES: [Distance; 3] = [
    Distance {
        id: "colocated",
        label: "co-located",
        rtt_ms: 0,
        jitter_ms: 0,
    },
    Distance {
        id: "50ms",
        label: "50 ms ± 10 ms",
        rtt_ms: 50,
        jitter_ms: 10,
    },
    Distance {
        id: "150ms",
        label: "150 ms ± 30 ms",
        rtt_ms: 150,
        jitter_ms: 30,
    },
];

/// One placement case as measured, with what oha saw of the 200s alone.
#[derive(Debug, Clone)]
pub(super) struct Point {
    measured: Measured,
    /// 200 answers per second.
    pub(super) ok_rps: f64,
    /// Latency percentiles of the 200s alone (oha's `--stats-success-breakdown`), in ms.
    pub(super) ok_p50_ms: f64,
    pub(super) ok_p99_ms: f64,
    /// 503 answers.
    status_503: u64,
    /// Answers other than 200, plus requests that got no answer.
    not_ok: u64,
    /// Answers by status other than 200.
    other_statuses: BTreeMap<String, u64>,
    /// Klaus's CPU use over the window, in % of one core.
    klaus_cpu_pct: f64,
    /// How long Klaus's busiest thread was on a core or waiting for one, over warm-up and
    /// window, in % of the time ([`budget::SATURATED`]).
    klaus_demand_pct: f64,
    /// The machine's busy time over warm-up and window, in % of all its cores.
    machine_busy_pct: f64,
    /// Klaus's peak resident memory since it started (VmHWM), in MiB.
    klaus_peak_mb: f64,
}

impl Point {
    /// Whether Klaus had no more CPU to take: see [`budget::SATURATED`].
    fn saturated(&self) -> bool {
        self.klaus_demand_pct >= budget::SATURATED * 100.0
    }

    fn cpu_figure(&self) -> String {
        format!(
            "Klaus's thread on a core or waiting for one {:.0} % of the time, \
             {:.0} % on a core: {}",
            self.klaus_demand_pct,
            self.klaus_cpu_pct,
            if self.saturated() {
                "saturated"
            } else {
                "not saturated"
            }
        )
    }

    fn json(&self) -> Value {
        let m = &self.measured;
        json!({
            "id": m.case.id,
            "connections": m.case.conns,
            "seconds": m.seconds,
            "responses": m.responses,
            "ok_per_second": self.ok_rps,
            "ok_p50_ms": self.ok_p50_ms,
            "ok_p99_ms": self.ok_p99_ms,
            "all_p50_ms": m.p50_ms,
            "all_p99_ms": m.p99_ms,
            "status_503": self.status_503,
            "not_ok": self.not_ok,
            "errors": m.errors,
            "error_kinds": m.error_kinds,
            "cpu_us_per_request": m.cpu_us_per_request,
            "cpu_seconds": m.cpu_seconds,
            "other_statuses": self.other_statuses,
            "klaus_cpu_percent_of_a_core": self.klaus_cpu_pct,
            "klaus_thread_on_or_waiting_for_a_core_percent": self.klaus_demand_pct,
            "machine_busy_percent": self.machine_busy_pct,
            "saturated": self.saturated(),
            "klaus_peak_rss_mb": self.klaus_peak_mb,
            "other_load_percent": m.background_pct,
        })
    }

    /// The answers that were not 200, by status, and the requests that got none.
    fn not_ok_figure(&self) -> String {
        let mut parts: Vec<String> = self
            .other_statuses
            .iter()
            .map(|(status, n)| format!("{n} × {status}"))
            .collect();
        if self.measured.errors > 0 {
            parts.push(format!("{} without an answer", self.measured.errors));
        }
        match parts.as_slice() {
            [] => "0".into(),
            [_] => parts.concat(),
            _ => format!("{} ({})", self.not_ok, parts.join(", ")),
        }
    }

    /// One table row.
    fn row(&self, md: &mut String, what: &str) {
        let m = &self.measured;
        let _ = writeln!(
            md,
            "| {what} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {:.1} | {:.0} % | {:.0} % | {:.1} | {:.0} % |",
            m.case.conns,
            self.ok_rps,
            self.ok_p50_ms,
            self.ok_p99_ms,
            self.status_503,
            self.not_ok_figure(),
            m.cpu_us_per_request,
            self.klaus_cpu_pct,
            self.klaus_demand_pct,
            self.klaus_peak_mb,
            m.background_pct,
        );
    }
}

/// What the placement cases found.
#[derive(Debug)]
pub(super) struct Placement {
    /// Klaus → link → Petra, one per distance, nearest first.
    pub(super) distances: Vec<(Distance, Point)>,
    /// Klaus beside Petra, no link: each round at 64 connections and at 2,000, in the order
    /// they ran.
    rounds: Vec<Round>,
}

/// One round of the overload cases, on the same processes as the others.
#[derive(Debug, Clone)]
pub(super) struct Round {
    /// At 64 connections.
    base: Point,
    /// At 2,000 connections that ignore `Retry-After`.
    storm: Point,
}

impl Round {
    /// The 200s per second at 2,000 connections over those at 64.
    fn goodput(&self) -> f64 {
        self.storm.ok_rps / self.base.ok_rps
    }
}

/// Starts a pair for each distance and for the overload, and measures them.
pub(super) fn run(
    bins: &Binaries,
    tools: &Tools,
    certs: &Path,
    out: &Path,
    options: &Options,
    machine: &Machine,
) -> anyhow::Result<Placement> {
    let slowlink = root().join("target/release/slowlink");
    let total = DISTANCES.len() + 2 * OVERLOAD_ROUNDS;
    let mut distances = Vec::new();
    for (i, distance) in DISTANCES.into_iter().enumerate() {
        let stack = step(
            &format!("start Petra, a link ({}), Klaus", distance.label),
            || start_pair(bins, tools, certs, out, Some((&slowlink, distance))),
        )?;
        let case = case(&format!("placement-{}", distance.id), LINK_CONNECTIONS);
        let label = format!("[placement {}/{total}] {}", i + 1, case.id);
        let point = measure_point(&stack, tools, certs, out, &case, options, machine, &label)?;
        distances.push((distance, point));
    }
    let stack = step("start Petra and Klaus side by side (no link)", || {
        start_pair(bins, tools, certs, out, None)
    })?;
    let mut rounds = Vec::new();
    for round in 1..=OVERLOAD_ROUNDS {
        let case = |conns| case(&format!("overload-r{round}"), conns);
        let (base, storm) = (case(OVERLOAD_BASE_CONNECTIONS), case(OVERLOAD_CONNECTIONS));
        let first = DISTANCES.len() + 2 * (round - 1) + 1;
        let measure = |case: &Case, n: usize| {
            let label = format!("[placement {n}/{total}] {}", case.id);
            measure_point(&stack, tools, certs, out, case, options, machine, &label)
        };
        let round = if round % 2 == 1 {
            let base = measure(&base, first)?;
            Round {
                base,
                storm: measure(&storm, first + 1)?,
            }
        } else {
            let storm = measure(&storm, first)?;
            Round {
                base: measure(&base, first + 1)?,
                storm,
            }
        };
        rounds.push(round);
    }
    Ok(Placement { distances, rounds })
}

fn case(name: &str, conns: usize) -> Case {
    Case {
        id: format!("{name}/c{conns}"),
        target: KLAUS_FRONT,
        conns,
        mode: Mode::KeepAlive,
    }
}

/// Petra, then the link when there is one, then Klaus's plain-HTTP front calling Petra through
/// it; each checked once like the main stack.
fn start_pair(
    bins: &Binaries,
    tools: &Tools,
    certs: &Path,
    out: &Path,
    link: Option<(&Path, Distance)>,
) -> anyhow::Result<Stack> {
    let mut stack = Stack {
        groups: BTreeMap::new(),
        urls: BTreeMap::new(),
        procs: Vec::new(),
    };
    let (petra, petra_port) = petra_env(PETRA, certs, "info")?;
    stack.start_service(&bins.petra, &petra, out, tools)?;
    let upstream = match link {
        Some((slowlink, distance)) => {
            start_link(&mut stack, slowlink, tools, out, petra_port, distance)?
        }
        None => petra_port,
    };
    let (klaus, port) = klaus_env(KLAUS, certs, upstream, false, "info")?;
    stack.start_service(&bins.klaus, &klaus, out, tools)?;
    stack
        .urls
        .insert(KLAUS, format!("http://127.0.0.1:{port}/"));
    stack.sanity_check(tools, certs)?;
    Ok(stack)
}

/// Starts `slowlink` from a free port to Petra's; returns the port once it accepts.
fn start_link(
    stack: &mut Stack,
    slowlink: &Path,
    tools: &Tools,
    out: &Path,
    petra_port: u16,
    distance: Distance,
) -> anyhow::Result<u16> {
    let port = free_ports(1)?[0];
    let stderr = out.join(format!("logs/{LINK}.stderr"));
    let child = tools
        .command(slowlink)
        .arg("--listen")
        .arg(loopback(port).to_string())
        .arg("--upstream")
        .arg(loopback(petra_port).to_string())
        .arg("--rtt-ms")
        .arg(distance.rtt_ms.to_string())
        .arg("--jitter-ms")
        .arg(distance.jitter_ms.to_string())
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).context("creating a log file")?)
        .spawn()
        .with_context(|| format!("starting {}", slowlink.display()))?;
    let mut proc = Proc {
        name: LINK,
        child,
        nginx: false,
        stderr,
    };
    // Accepting is all the link has to show for being ready; the probe's connection to Petra
    // ends before its handshake, which Petra logs and forgets.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&loopback(port), Duration::from_millis(200)).is_err() {
        proc.check_running()?;
        if Instant::now() > deadline {
            bail!("{LINK} did not listen within 10 s");
        }
        thread::sleep(Duration::from_millis(5));
    }
    stack.groups.insert(
        LINK,
        Group {
            pids: vec![proc.pid()],
        },
    );
    stack.procs.push(proc);
    Ok(port)
}

/// Measures one case like every other (quiet-wait, warm-up, window), then reads the 200s apart
/// from oha's report, the machine's busy time and Klaus's peak memory.
#[allow(clippy::too_many_arguments)]
fn measure_point(
    stack: &Stack,
    tools: &Tools,
    certs: &Path,
    out: &Path,
    case: &Case,
    options: &Options,
    machine: &Machine,
    label: &str,
) -> anyhow::Result<Point> {
    wait_for_quiet(stack, machine, options.quiet_wait)?;
    let klaus = *stack
        .group(KLAUS)?
        .pids
        .first()
        .context("Klaus has no process")?;
    // The overload rounds share one Klaus: each case's peak is its own, warm-up included.
    reset_peak_rss(klaus)?;
    let demand_before = thread_demand_ns(klaus);
    let (busy_before, since) = (machine_busy_ticks()?, Instant::now());
    let measured = step(label, || {
        measure(stack, tools, certs, out, case, options, machine)
    })?;
    let busy = machine_busy_ticks()?.saturating_sub(busy_before) as f64;
    let elapsed = since.elapsed();
    let capacity = elapsed.as_secs_f64() * (machine.clk_tck * machine.cores) as f64;
    let busiest_thread = thread_demand_ns(klaus)
        .into_iter()
        .map(|(tid, ns)| ns.saturating_sub(demand_before.get(&tid).copied().unwrap_or(0)))
        .max()
        .unwrap_or(0);
    let raw = raw_path(out, case);
    let report = oha::Report::parse_text(
        &fs::read_to_string(&raw).with_context(|| format!("reading {}", raw.display()))?,
    )?;
    let ok = report.count(200);
    let other_statuses = report
        .statuses
        .iter()
        .filter(|(status, _)| **status != 200)
        .map(|(status, n)| (status.to_string(), *n))
        .collect();
    let ok_ms = |key: &str| report.ok_percentile_ms(key);
    let klaus_cpu = measured.cpu_seconds.get(KLAUS).copied().unwrap_or(0.0);
    let point = Point {
        ok_rps: ok as f64 / measured.seconds,
        ok_p50_ms: ok_ms("p50"),
        ok_p99_ms: ok_ms("p99"),
        status_503: report.count(503),
        not_ok: measured.responses.saturating_sub(ok) + measured.errors,
        other_statuses,
        klaus_cpu_pct: klaus_cpu / measured.seconds * 100.0,
        klaus_demand_pct: busiest_thread as f64 / elapsed.as_nanos() as f64 * 100.0,
        machine_busy_pct: busy / capacity * 100.0,
        klaus_peak_mb: stack.peak_rss()?.get(KLAUS).copied().unwrap_or(f64::NAN),
        measured,
    };
    println!(
        "    {:.0} × 200/s, 200s' p50 {:.1} ms, p99 {:.1} ms, not 200: {}, {}, \
         Klaus peak RSS {:.1} MiB",
        point.ok_rps,
        point.ok_p50_ms,
        point.ok_p99_ms,
        point.not_ok_figure(),
        point.cpu_figure(),
        point.klaus_peak_mb
    );
    Ok(point)
}
