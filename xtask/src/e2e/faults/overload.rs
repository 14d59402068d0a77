//! The overload burst: 2,000 connections against Klaus at its default admission control, whose
//! goodput is held against Klaus's rate at 64 connections, and what its CPU and memory did.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use xshell::Shell;

use crate::e2e::containers::{Klaus, state};
use crate::e2e::{Project, STARTUP_DEADLINE, pass, wait_for};
use crate::http::get;
use crate::oha::{Oha, load_args};
use crate::procfs;

/// Connections in the overload burst.
const BURST_CONNECTIONS: u32 = 2000;

/// How long the burst lasts.
const BURST: Duration = Duration::from_secs(10);

/// How long Klaus may take to close the burst's connections once it has ended.
const SETTLE_DEADLINE: Duration = Duration::from_secs(10);

/// The reference run for the burst's goodput: as fast as Klaus answers, over this many
/// connections, for this long.
const REFERENCE_CONNECTIONS: u32 = 64;
const REFERENCE: Duration = Duration::from_secs(5);

/// The share of the reference rate of 200s that Klaus must keep answering during the burst.
/// Issue 12 asks for 0.7, which `cargo xtask bench` measures natively (0.67–0.77 in the
/// runs of 2026-12-01, BENCHMARKS.md "Placement"); here, in containers, the last runs kept 0.73 (before the read
/// gate) and 0.79 (RELIABILITY.md, "Overload"). 0.6 leaves room for a busy CI machine and still
/// fails a real regression: the limit that climbed to its ceiling kept 0.46 in the bench, the
/// fixed limit that refused instead of waiting a twelfth.
const GOODPUT_SHARE: f64 = 0.6;

/// The bound on the p99 latency of the burst's 200s, in ms.
const GOODPUT_P99_MS: f64 = 1000.0;

/// The calm runs before and after the burst, whose p99 latencies are compared: rate, length,
/// connections.
const CALM_RATE: u32 = 50;
const CALM: Duration = Duration::from_secs(5);
const CALM_CONNECTIONS: u32 = 10;

/// With Klaus at its default admission control (the 2,000 connections alone take about 45 MiB
/// of its 128 MiB `mem_limit`), measures p99 at a calm rate and Klaus's rate of 200s at
/// [`REFERENCE_CONNECTIONS`], sends the burst (oha, which ignores `Retry-After`), and checks that
/// the burst got only 200s and 503s, that Klaus kept answering 200 at [`GOODPUT_SHARE`] of the
/// reference rate with a p99 of those 200s under [`GOODPUT_P99_MS`] (goodput: admitted work
/// finishes first, refusing stays cheap), that it was neither OOM-killed nor restarted, and
/// that the calm p99 afterwards is back near the one before.
pub(super) fn run(sh: &Shell, project: &Project<'_>, oha: &Oha) -> anyhow::Result<()> {
    let klaus = Klaus::find(sh, project)?;
    let limit = klaus.env(sh, "MAX_CONCURRENT_REQUESTS")?;
    ensure!(
        limit.is_none(),
        "Klaus has MAX_CONCURRENT_REQUESTS={limit:?}; the scenario tests the default"
    );
    wait_for(STARTUP_DEADLINE, || {
        get(klaus.main, "/").ok().filter(|r| r.status == 200)
    })
    .context("Klaus did not answer 200 before the burst")?;
    let before = state(sh, &klaus.id)?;

    let calm = load_args(Some(CALM_RATE), CALM_CONNECTIONS, CALM);
    let baseline = oha
        .run(&klaus.url(), &calm)
        .context("the calm run before the burst")?;
    baseline.ensure_all_ok("the calm run before the burst")?;

    // Measured just before the burst, so that both see the same machine.
    let cpu = Cpu::sample(before.pid);
    let reference = oha
        .run(
            &klaus.url(),
            &load_args(None, REFERENCE_CONNECTIONS, REFERENCE),
        )
        .context("the reference run")?;
    reference.ensure_all_ok(&format!(
        "the reference run at {REFERENCE_CONNECTIONS} connections"
    ))?;
    let reference_rate = reference.ok_rate();
    let cpu = Cpu::sample(before.pid).since(&cpu, reference.count(200));

    let burst_cpu = Cpu::sample(before.pid);
    let burst = oha
        .run(&klaus.url(), &load_args(None, BURST_CONNECTIONS, BURST))
        .context("the burst")?;
    let burst_cpu = Cpu::sample(before.pid).since(&burst_cpu, burst.count(200));
    let after = state(sh, &klaus.id)?;
    let peak = PeakMemory::of(before.pid);
    ensure!(
        !after.oom_killed
            && after.restarts == 0
            && after.status == "running"
            && after.pid == before.pid,
        "Klaus did not survive the burst: status {}, OOM-killed {}, restarts {}, PID {} (was {})",
        after.status,
        after.oom_killed,
        after.restarts,
        after.pid,
        before.pid
    );
    let ok = burst.count(200);
    let shed = burst.count(503);
    ensure!(
        burst.errors.is_empty() && ok + shed == burst.total(),
        "the burst got other answers than 200 and 503, or errors: {}",
        burst.outcomes()
    );
    let goodput = burst.ok_rate();
    let p99_ok_ms = burst
        .p99_ok_ms
        .context("oha's report has no p99 of the 200s")?;
    let figures = format!(
        "{ok} × 200 in {:.1} s = {goodput:.0}/s, {:.2} × the {reference_rate:.0}/s at {REFERENCE_CONNECTIONS} connections \
         (bound {GOODPUT_SHARE}); p99 of the 200s {p99_ok_ms:.0} ms (bound {GOODPUT_P99_MS:.0} ms); {shed} × 503; \
         CPU at 64 connections: {cpu}; in the burst: {burst_cpu}",
        burst.seconds,
        goodput / reference_rate
    );
    ensure!(
        goodput >= GOODPUT_SHARE * reference_rate && p99_ok_ms < GOODPUT_P99_MS,
        "goodput under overload: {figures}"
    );
    // With a bounded wait before refusing, a 503 may come late; the share shows how refusing costs.
    let fast = if shed > 0 {
        format!(
            " ({:.0} % of Klaus's 503s answered within 1 ms)",
            klaus.share_within("503", "0.001")? * 100.0
        )
    } else {
        String::new()
    };

    // "After the burst" begins once its connections are gone: for a moment after oha stops,
    // Klaus is still closing 2,000 of them.
    let burst_over = Instant::now();
    wait_for(SETTLE_DEADLINE, || {
        klaus
            .metric("connections_open", &[])
            .ok()
            .filter(|&open| open == 0.0)
    })
    .with_context(|| {
        format!("Klaus still had connections of the burst open {SETTLE_DEADLINE:?} after it ended")
    })?;
    let settled = burst_over.elapsed();
    let recovered = oha
        .run(&klaus.url(), &calm)
        .context("the calm run after the burst")?;
    recovered.ensure_all_ok("the calm run after the burst")?;
    // The memory the burst took goes back to the system once its connections are gone (the
    // services trim glibc's heap every 2 s after a burst; without it Klaus stayed near its peak).
    let peak_kib = peak
        .hwm_kib
        .with_context(|| format!("cannot read VmHWM of Klaus (PID {})", before.pid))?;
    let resident_kib = wait_for(SETTLE_DEADLINE, || {
        resident_kib(before.pid).filter(|&kib| kib <= peak_kib / 2)
    })
    .with_context(|| {
        format!(
            "Klaus still held {} KiB resident {SETTLE_DEADLINE:?} after the burst (peak {peak_kib} KiB): the memory was not given back",
            resident_kib(before.pid).unwrap_or_default()
        )
    })?;
    let bound = 2.0 * baseline.p99_ms + 10.0;
    ensure!(
        recovered.p99_ms <= bound,
        "p99 after the burst is {:.1} ms, above 2 × {:.1} ms + 10 ms: latency did not come back",
        recovered.p99_ms,
        baseline.p99_ms
    );
    pass(&format!(
        "overload, {BURST_CONNECTIONS} connections for {:.1}s (default admission control): \
         {} requests, {ok} × 200, {shed} × 503{fast}, no errors, p99 {:.0} ms; \
         Klaus not OOM-killed, not restarted, peak memory {} of {} MiB",
        burst.seconds,
        burst.total(),
        burst.p99_ms,
        peak.describe(),
        after.memory_limit >> 20
    ));
    pass(&format!("goodput under overload: {figures}"));
    pass(&format!(
        "after the burst (its connections closed {:.1} s after it ended), p99 at {CALM_RATE} req/s is {:.1} ms (before: {:.1} ms, bound {bound:.1} ms); Klaus resident {:.1} MiB again (peak {:.1} MiB)",
        settled.as_secs_f64(),
        recovered.p99_ms,
        baseline.p99_ms,
        resident_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    ));
    Ok(())
}

/// Where the CPU went during a run: Klaus's own (from `/proc/PID/stat`) and the whole host's
/// (from `/proc/stat`), where oha, Petra and anything else running share the cores.
struct Cpu {
    /// Klaus's user and system time, in clock ticks.
    klaus_ticks: Option<u64>,
    /// The host's busy and total time over all cores, in clock ticks.
    host: Option<(u64, u64)>,
    at: Instant,
}

/// A [`Cpu`] difference, for printing.
struct CpuUse {
    /// Klaus's CPU seconds per second.
    klaus_cores: Option<f64>,
    /// Klaus's 200s per CPU millisecond.
    ok_per_cpu_ms: Option<f64>,
    /// The share of the host's cores that were busy.
    host_busy: Option<f64>,
}

/// Clock ticks per second in `/proc` (USER_HZ), 100 on Linux everywhere we run.
const USER_HZ: f64 = 100.0;

impl Cpu {
    fn sample(pid: u32) -> Self {
        Self {
            klaus_ticks: procfs::cpu_ticks(pid).ok(),
            host: procfs::host_ticks().ok().map(|t| (t.busy, t.total)),
            at: Instant::now(),
        }
    }

    fn since(&self, earlier: &Self, ok: u64) -> CpuUse {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64();
        let klaus_seconds = self
            .klaus_ticks
            .zip(earlier.klaus_ticks)
            .map(|(now, then)| now.saturating_sub(then) as f64 / USER_HZ);
        CpuUse {
            klaus_cores: klaus_seconds.map(|s| s / seconds),
            ok_per_cpu_ms: klaus_seconds
                .filter(|s| *s > 0.0)
                .map(|s| ok as f64 / (s * 1e3)),
            host_busy: self.host.zip(earlier.host).and_then(|(now, then)| {
                let total = now.1.saturating_sub(then.1);
                (total > 0).then(|| now.0.saturating_sub(then.0) as f64 / total as f64)
            }),
        }
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_unknown = |v: Option<f64>, fmt: &dyn Fn(f64) -> String| {
            v.map_or_else(|| "unknown".to_owned(), fmt)
        };
        write!(
            f,
            "Klaus {} cores, {} × 200 per CPU-ms; host {} busy",
            or_unknown(self.klaus_cores, &|v| format!("{v:.2}")),
            or_unknown(self.ok_per_cpu_ms, &|v| format!("{v:.1}")),
            or_unknown(self.host_busy, &|v| format!("{:.0} %", v * 100.0))
        )
    }
}

/// A process's resident memory now (VmRSS), in KiB.
fn resident_kib(pid: u32) -> Option<u64> {
    procfs::status_kib(pid, "VmRSS")
}

/// A process's peak memory: its resident high-water mark and, where the kernel keeps it, its
/// memory cgroup's.
struct PeakMemory {
    hwm_kib: Option<u64>,
    cgroup_bytes: Option<u64>,
}

impl PeakMemory {
    fn of(pid: u32) -> Self {
        Self {
            hwm_kib: procfs::status_kib(pid, "VmHWM"),
            cgroup_bytes: procfs::cgroup_memory_peak(pid),
        }
    }

    fn describe(&self) -> String {
        let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
        let hwm = self.hwm_kib.map_or("unknown".to_owned(), |kib| {
            format!("{:.1} MiB", mib(kib << 10))
        });
        match self.cgroup_bytes {
            Some(bytes) => format!(
                "{hwm} resident (VmHWM), {:.1} MiB in its cgroup",
                mib(bytes)
            ),
            None => format!("{hwm} resident (VmHWM)"),
        }
    }
}
