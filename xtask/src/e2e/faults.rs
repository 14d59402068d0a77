//! The fault scenarios of `cargo xtask e2e`, in the single-network topology (docker-compose.yml)
//! with two Petra replicas behind the one name `petra`: a rolling restart under steady load, a
//! partition between Klaus and Petra, and an overload burst of 2,000 connections whose goodput
//! is held against Klaus's rate at 64 connections.
//!
//! The load comes from oha on the host and goes to Klaus's address on the project's own network,
//! so that docker-proxy is not in the path; Klaus's metrics are read from its admin port at the
//! same address. Every wait polls a condition under a deadline; the only fixed durations are the
//! load runs themselves.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::Value;
use xshell::{Shell, cmd};

use super::{KLAUS_PORT, Project, Reply, STARTUP_DEADLINE, ensure_port_free, get, pass, wait_for};
use crate::util::{find_oha, nofile_to_raise, status_kib, with_nofile};

/// The compose file the scenarios run on.
const FILE: &str = "docker-compose.yml";

/// Petra replicas behind the name `petra`.
const REPLICAS: usize = 2;

/// The admin port (/metrics) inside Klaus's and Petra's containers.
pub(super) const ADMIN_PORT: u16 = 9090;

/// The rolling restart's steady load through Klaus, in requests per second.
const ROLLING_RATE: u32 = 200;

/// How long the rolling restart's load runs; the restarts must end within it.
const ROLLING_LOAD: Duration = Duration::from_secs(30);

/// The connections oha spreads the steady load over.
const ROLLING_CONNECTIONS: u32 = 20;

/// How long a replica may take to exit after SIGTERM: Petra's delay (SHUTDOWN_DELAY_SECONDS=1)
/// and its drain; `docker stop` sends SIGKILL after 10 s, which the exit code would show.
pub(super) const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// How long a started replica may take to be healthy; compose checks every 2 s.
pub(super) const HEALTHY_DEADLINE: Duration = Duration::from_secs(30);

/// Klaus's PETRA_TIMEOUT_MS when its container does not set it, as docker-compose.yml does not
/// (the default in klaus/src/upstream/config.rs).
const DEFAULT_PETRA_TIMEOUT_MS: u64 = 2000;

/// How long after Klaus's deadline its 504 may reach the host: timers, scheduling and the bridge.
const DEADLINE_SLACK: Duration = Duration::from_millis(200);

/// Calls sent to Klaus at once during the partition.
pub(super) const PARTITION_CALLS: usize = 8;

/// The rules the partition inserts in each Petra replica's network namespace: every packet in
/// or out is dropped, as on a dead link, and nothing is refused or reset. Loopback stays open,
/// so Petra's health check keeps passing.
const CUT_RULES: [[&str; 6]; 2] = [
    ["INPUT", "!", "-i", "lo", "-j", "DROP"],
    ["OUTPUT", "!", "-o", "lo", "-j", "DROP"],
];

/// How long into a cut Klaus may keep its dead pooled connection: its HTTP/2 ping interval
/// (5 s) and ping timeout (3 s), with room for a call in flight.
const DEAD_CONNECTION_DEADLINE: Duration = Duration::from_secs(15);

/// How soon after the link returns Klaus must answer 200 again, once it has dropped the dead
/// connection.
const LINK_RECOVERY_DEADLINE: Duration = Duration::from_secs(1);

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
/// Issue 12 asks for 0.7, and `cargo xtask bench` holds that line; it is not met yet (0.53–0.55
/// in the last runs, BENCHMARKS.md and RELIABILITY.md): what remains is Klaus's CPU per request
/// at 2,000 connections, 1.9 times that at 64 with every request admitted and no 503 at all,
/// not refusals. This bound is the regression guard until then: the fixed limit that refused
/// instead of waiting kept a twelfth of the rate, and 0.4 fails anything near that.
const GOODPUT_SHARE: f64 = 0.4;

/// The bound on the p99 latency of the burst's 200s, in ms.
const GOODPUT_P99_MS: f64 = 1000.0;

/// The calm runs before and after the burst, whose p99 latencies are compared: rate, length,
/// connections.
const CALM_RATE: u32 = 50;
const CALM: Duration = Duration::from_secs(5);
const CALM_CONNECTIONS: u32 = 10;

/// Brings docker-compose.yml up with two Petra replicas under a project name of its own, runs
/// the three scenarios, prints the logs if one fails, and tears it down.
pub(super) fn run(sh: &Shell, compose: &[String], oha: &Oha) -> anyhow::Result<()> {
    ensure_port_free(KLAUS_PORT)?;
    let project = Project {
        sh,
        compose,
        name: format!("pk-e2e-{}-faults", std::process::id()),
        file: FILE,
    };
    project.run(&["up", "-d", "--scale", &format!("petra={REPLICAS}")])?;
    let result = scenarios(sh, &project, oha);
    if result.is_err() {
        let _ = project.run(&["logs", "--no-color", "--tail", "40"]);
    }
    result
}

/// Waits for the replicas and Klaus, then runs the scenarios; the overload comes last because
/// it recreates Klaus with a lower concurrency limit.
fn scenarios(sh: &Shell, project: &Project<'_>, oha: &Oha) -> anyhow::Result<()> {
    let started = Instant::now();
    let replicas = project.containers("petra")?;
    ensure!(
        replicas.len() == REPLICAS,
        "`up --scale petra={REPLICAS}` made {} Petra containers",
        replicas.len()
    );
    for id in &replicas {
        wait_for(HEALTHY_DEADLINE, || {
            state(sh, id).ok().filter(|s| s.health == "healthy")
        })
        .with_context(|| format!("Petra replica {} never became healthy", short(id)))?;
    }
    let klaus = Klaus::answering(sh, project)?;
    pass(&format!(
        "{REPLICAS} Petra replicas healthy, Klaus answers 200 at {} ({:.1}s after up)",
        klaus.main,
        started.elapsed().as_secs_f64()
    ));

    rolling_restart(sh, project, oha, &klaus)?;
    partition(sh, project, &klaus)?;
    overload(sh, project, oha)
}

// -------------------------------------------------------------------------------------------------
// Rolling restart

/// Restarts the replicas one after the other (SIGTERM, exited, started, healthy), round after
/// round while a steady load runs through Klaus, and checks that no request failed.
fn rolling_restart(
    sh: &Shell,
    project: &Project<'_>,
    oha: &Oha,
    klaus: &Klaus,
) -> anyhow::Result<()> {
    let replicas = project.containers("petra")?;
    let retries =
        |result: &str| klaus.metric("petra_retries_total", &[&format!("result=\"{result}\"")]);
    let (attempted_before, skipped_before) = (retries("attempted")?, retries("skipped")?);
    let served_before = klaus.metric("http_requests_total", &[])?;

    let load = oha.start(
        &klaus.url(),
        &load_args(Some(ROLLING_RATE), ROLLING_CONNECTIONS, ROLLING_LOAD),
    )?;
    let started = Instant::now();
    // The restarts begin once a second's worth of the load has reached Klaus.
    wait_for(Duration::from_secs(10), || {
        klaus
            .metric("http_requests_total", &[])
            .ok()
            .filter(|served| *served >= served_before + f64::from(ROLLING_RATE))
    })
    .context("oha's load did not reach Klaus")?;
    let mut restarts = Vec::new();
    loop {
        let round = Instant::now();
        for id in &replicas {
            restarts.push(restart_replica(sh, id)?);
        }
        // Another round only when it would end before the load does, with two seconds to spare.
        if started.elapsed() + round.elapsed() + Duration::from_secs(2) > ROLLING_LOAD {
            break;
        }
    }
    let restarted_in = started.elapsed();
    ensure!(
        restarted_in < ROLLING_LOAD,
        "the restarts ended {restarted_in:.1?} after the load began, after its {ROLLING_LOAD:?}: part of them ran without traffic"
    );
    let report = load.finish()?;
    let attempted = retries("attempted")? - attempted_before;
    let skipped = retries("skipped")? - skipped_before;

    ensure!(
        report.failures() == 0,
        "rolling restart: {} of {} requests failed ({})",
        report.failures(),
        report.total(),
        report.outcomes()
    );
    // A load far below its rate would make "nothing failed" mean little.
    let planned = f64::from(ROLLING_RATE) * report.seconds;
    ensure!(
        report.total() as f64 >= planned / 2.0,
        "rolling restart: oha sent {} requests in {:.1}s, under half the {ROLLING_RATE}/s planned",
        report.total(),
        report.seconds
    );
    let (stops, starts): (Vec<Duration>, Vec<Duration>) = restarts.into_iter().unzip();
    pass(&format!(
        "rolling restart, {} restarts of {REPLICAS} replicas (exit 0 after SIGTERM in {}, healthy {} after start) \
         under {ROLLING_RATE} req/s: {} requests in {:.1}s, all 200, no errors, p99 {:.1} ms, \
         Klaus retried {attempted} calls on a fresh connection ({skipped} retries skipped)",
        stops.len(),
        span(&stops),
        span(&starts),
        report.total(),
        report.seconds,
        report.p99_ms
    ));
    Ok(())
}

/// Stops one replica with SIGTERM, checks that it exited 0 (drained, not killed), starts it and
/// waits until it is healthy. Returns how long each half took.
fn restart_replica(sh: &Shell, id: &str) -> anyhow::Result<(Duration, Duration)> {
    let stopping = Instant::now();
    cmd!(sh, "docker stop {id}")
        .quiet()
        .ignore_stdout()
        .run()
        .with_context(|| format!("docker stop {} failed", short(id)))?;
    let stopped = wait_for(STOP_DEADLINE, || {
        state(sh, id).ok().filter(|s| s.status == "exited")
    })
    .with_context(|| format!("Petra replica {} did not exit after SIGTERM", short(id)))?;
    ensure!(
        stopped.exit_code == 0,
        "Petra replica {} exited with status {} after SIGTERM, not 0 (137 is docker stop's SIGKILL: no drain in time)",
        short(id),
        stopped.exit_code
    );
    let stop_took = stopping.elapsed();

    let starting = Instant::now();
    cmd!(sh, "docker start {id}")
        .quiet()
        .ignore_stdout()
        .run()
        .with_context(|| format!("docker start {} failed", short(id)))?;
    wait_for(HEALTHY_DEADLINE, || {
        state(sh, id).ok().filter(|s| s.health == "healthy")
    })
    .with_context(|| {
        format!(
            "Petra replica {} was not healthy after docker start",
            short(id)
        )
    })?;
    Ok((stop_took, starting.elapsed()))
}

// -------------------------------------------------------------------------------------------------
// Partition

/// Drops every packet to and from the Petra replicas while Docker's DNS still
/// resolves them, and checks that Klaus answers 504 by its deadline, on pooled connections and on
/// new ones, and 200 again soon after the link returns.
fn partition(sh: &Shell, project: &Project<'_>, klaus: &Klaus) -> anyhow::Result<()> {
    let deadline = klaus.petra_timeout(sh)?;
    // Calls at once leave several connections in Klaus's pool, so that calls during the cut go
    // out on pooled connections (they wait for an answer until the deadline) as well as on new
    // ones (they wait for the handshake until the connect timeout, half the deadline).
    for (_, reply) in calls_at_once(klaus.main, PARTITION_CALLS) {
        let reply = reply.context("a call before the partition failed")?;
        ensure!(
            reply.status == 200,
            "a call before the partition got {}",
            reply.status
        );
    }
    let pids = project
        .containers("petra")?
        .iter()
        .map(|id| state(sh, id).map(|s| s.pid))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let mut cut = Cut::new(sh, pids)?;
    let cut_at = Instant::now();
    let first = timeouts(klaus.main, deadline).context("during the partition, first calls")?;
    let next = timeouts(klaus.main, deadline).context("during the partition, next calls")?;
    // Hold the cut until Klaus has given up its silent pooled connection (an HTTP/2 ping not
    // answered in time): a call's first attempt then ends at the connect timeout, half the
    // deadline, instead of riding the dead connection into the full deadline. Kept, that
    // connection would also carry calls for seconds after the link returns, while TCP's
    // retransmission backs off. Either sign counts: a 504 well before the deadline, or a retry
    // (Klaus retries only with time left, so the first attempt ended early; the retry, on the
    // other replica's new connection, may then take the call to its deadline).
    let retries = |klaus: &Klaus| klaus.metric("petra_retries_total", &["result=\"attempted\""]);
    let retried_before = retries(klaus)?;
    wait_for(DEAD_CONNECTION_DEADLINE, || {
        let started = Instant::now();
        let reply = get(klaus.main, "/").ok()?;
        let early = reply.status == 504 && started.elapsed() < deadline * 3 / 4;
        let retried = retries(klaus).is_ok_and(|now| now > retried_before);
        (early || (reply.status == 504 && retried)).then_some(())
    })
    .with_context(|| {
        format!(
            "Klaus still sent calls on its dead pooled connection {DEAD_CONNECTION_DEADLINE:?} into the cut"
        )
    })?;
    let dropped = cut_at.elapsed();
    cut.restore()?;

    let restored = Instant::now();
    answers_again(klaus.main, LINK_RECOVERY_DEADLINE)?;
    pass(&format!(
        "partition (Petra's replicas drop every packet in and out, DNS still resolves them): \
         {PARTITION_CALLS} calls at once get 504 problem+json `petra_timeout` after {}, the next {PARTITION_CALLS} \
         after {} (deadline PETRA_TIMEOUT_MS={} ms); the dead pooled connection dropped {:.1} s into \
         the cut; 200 again {} ms after the link returned",
        span(&first),
        span(&next),
        deadline.as_millis(),
        dropped.as_secs_f64(),
        restored.elapsed().as_millis()
    ));
    Ok(())
}

/// Waits up to `deadline` for Klaus to answer `hello world` again once a cut link is back.
pub(super) fn answers_again(klaus: SocketAddr, deadline: Duration) -> anyhow::Result<()> {
    wait_for(deadline, || {
        get(klaus, "/")
            .ok()
            .filter(|r| r.status == 200 && r.body == "hello world")
    })
    .with_context(|| {
        format!("Klaus did not answer `hello world` within {deadline:?} of the link's return")
    })?;
    Ok(())
}

/// Sends [`PARTITION_CALLS`] calls at once and checks that each is a 504 problem with the code
/// `petra_timeout`, answered no later than `deadline` (plus [`DEADLINE_SLACK`]); returns how long
/// each took. A call that hangs fails on `get`'s own read timeout.
pub(super) fn timeouts(klaus: SocketAddr, deadline: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut took = Vec::new();
    for (elapsed, reply) in calls_at_once(klaus, PARTITION_CALLS) {
        let reply = reply.with_context(|| format!("a call got no answer after {elapsed:.2?}"))?;
        ensure!(
            reply.status == 504
                && reply.content_type == "application/problem+json"
                && reply.body.contains("\"petra_timeout\""),
            "a call got {} {:?} {:?}, not a 504 problem `petra_timeout`",
            reply.status,
            reply.content_type,
            reply.body
        );
        ensure!(
            elapsed <= deadline + DEADLINE_SLACK,
            "a 504 came after {elapsed:.2?}, later than the deadline {deadline:?} (+ {DEADLINE_SLACK:?})"
        );
        took.push(elapsed);
    }
    Ok(took)
}

/// `n` calls to Klaus at once, each with the time it took.
fn calls_at_once(klaus: SocketAddr, n: usize) -> Vec<(Duration, anyhow::Result<Reply>)> {
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(move || {
                    let started = Instant::now();
                    let reply = get(klaus, "/");
                    (started.elapsed(), reply)
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|call| {
                call.join().unwrap_or_else(|_| {
                    (Duration::ZERO, Err(anyhow!("the calling thread panicked")))
                })
            })
            .collect()
    })
}

/// [`CUT_RULES`] inserted in the network namespace of each process in `pids` (run on the host
/// with nsenter and iptables); taken out by [`Cut::restore`], or on drop.
pub(super) struct Cut<'a> {
    sh: &'a Shell,
    pids: Vec<u32>,
    active: bool,
}

impl<'a> Cut<'a> {
    pub(super) fn new(sh: &'a Shell, pids: Vec<u32>) -> anyhow::Result<Self> {
        let mut cut = Self {
            sh,
            pids: Vec::new(),
            active: true,
        };
        for pid in pids {
            iptables(sh, pid, "-I")?;
            cut.pids.push(pid);
        }
        Ok(cut)
    }

    pub(super) fn restore(&mut self) -> anyhow::Result<()> {
        self.active = false;
        for &pid in &self.pids {
            iptables(self.sh, pid, "-D")?;
        }
        Ok(())
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        if self.active
            && let Err(err) = self.restore()
        {
            eprintln!("warning: taking the partition's DROP rule out failed: {err:#}");
        }
    }
}

/// Inserts (`-I`) or deletes (`-D`) [`CUT_RULES`] in the network namespace of `pid`.
fn iptables(sh: &Shell, pid: u32, op: &str) -> anyhow::Result<()> {
    let pid = pid.to_string();
    for rule in CUT_RULES {
        cmd!(sh, "nsenter -t {pid} -n iptables -w {op} {rule...}")
            .quiet()
            .run()
            .with_context(|| {
                format!("iptables {op} in the network namespace of PID {pid} failed (needs root, nsenter and iptables)")
            })?;
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// Overload

/// With Klaus at its default admission control (the 2,000 connections alone take about 45 MiB
/// of its 128 MiB `mem_limit`), measures p99 at a calm rate and Klaus's rate of 200s at
/// [`REFERENCE_CONNECTIONS`], sends the burst (oha, which ignores `Retry-After`), and checks that
/// the burst got only 200s and 503s, that Klaus kept answering 200 at [`GOODPUT_SHARE`] of the
/// reference rate with a p99 of those 200s under [`GOODPUT_P99_MS`] (goodput: admitted work
/// finishes first, refusing stays cheap), that it was neither OOM-killed nor restarted, and
/// that the calm p99 afterwards is back near the one before.
fn overload(sh: &Shell, project: &Project<'_>, oha: &Oha) -> anyhow::Result<()> {
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
    ensure!(
        baseline.failures() == 0,
        "the calm run before the burst had failures: {}",
        baseline.outcomes()
    );

    // Measured just before the burst, so that both see the same machine.
    let cpu = Cpu::sample(before.pid);
    let reference = oha
        .run(
            &klaus.url(),
            &load_args(None, REFERENCE_CONNECTIONS, REFERENCE),
        )
        .context("the reference run")?;
    ensure!(
        reference.failures() == 0,
        "the reference run at {REFERENCE_CONNECTIONS} connections had failures: {}",
        reference.outcomes()
    );
    let reference_rate = reference.count(200) as f64 / reference.seconds;
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
    let goodput = ok as f64 / burst.seconds;
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
    ensure!(
        recovered.failures() == 0,
        "the calm run after the burst had failures: {}",
        recovered.outcomes()
    );
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
        let klaus_ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // After the command name in parentheses: state is the first field, utime the 12th,
                // stime the 13th.
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
            });
        let host = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
            let times: Vec<u64> = stat
                .lines()
                .next()?
                .strip_prefix("cpu ")?
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
            let total: u64 = times.iter().take(8).sum();
            let idle = times.get(3)? + times.get(4)?;
            Some((total - idle, total))
        });
        Self {
            klaus_ticks,
            host,
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
    status_kib(pid, "VmRSS")
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
            hwm_kib: status_kib(pid, "VmHWM"),
            cgroup_bytes: cgroup_peak(pid),
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

/// The memory cgroup's peak usage of `pid`: `memory.peak` (cgroup v2) or
/// `memory.max_usage_in_bytes` (v1).
fn cgroup_peak(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let read =
        |path: PathBuf| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let base = PathBuf::from("/sys/fs/cgroup");
    cgroups.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            read(
                base.join("memory")
                    .join(path)
                    .join("memory.max_usage_in_bytes"),
            )
        } else if controllers.is_empty() {
            read(base.join(path).join("memory.peak"))
        } else {
            None
        }
    })
}

// -------------------------------------------------------------------------------------------------
// Klaus, containers, oha

/// Klaus's container and its two listeners, at its address on the project's network.
pub(super) struct Klaus {
    pub(super) id: String,
    pub(super) main: SocketAddr,
    pub(super) admin: SocketAddr,
}

impl Klaus {
    pub(super) fn find(sh: &Shell, project: &Project<'_>) -> anyhow::Result<Self> {
        let ids = project.containers("klaus")?;
        let [id] = ids.as_slice() else {
            bail!("expected one Klaus container, found {}", ids.len());
        };
        let ip = container_ip(sh, id)?;
        Ok(Self {
            id: id.clone(),
            main: SocketAddr::new(ip, KLAUS_PORT),
            admin: SocketAddr::new(ip, ADMIN_PORT),
        })
    }

    /// [`Klaus::find`], then waits until Klaus answers `GET /` with 200 (within
    /// [`STARTUP_DEADLINE`] of `up -d`).
    pub(super) fn answering(sh: &Shell, project: &Project<'_>) -> anyhow::Result<Self> {
        let klaus = Self::find(sh, project)?;
        wait_for(STARTUP_DEADLINE, || {
            get(klaus.main, "/").ok().filter(|r| r.status == 200)
        })
        .with_context(|| format!("Klaus at {} did not answer 200 after `up -d`", klaus.main))?;
        Ok(klaus)
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}/", self.main)
    }

    /// The value of `name` in Klaus's container environment, if it is set.
    pub(super) fn env(&self, sh: &Shell, name: &str) -> anyhow::Result<Option<String>> {
        let id = &self.id;
        let format = "{{json .Config.Env}}";
        let json = cmd!(sh, "docker inspect -f {format} {id}").quiet().read()?;
        let vars: Vec<String> = serde_json::from_str(&json).context("parsing Config.Env")?;
        Ok(vars.iter().find_map(|var| {
            var.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }))
    }

    /// Klaus's deadline for calls to Petra.
    pub(super) fn petra_timeout(&self, sh: &Shell) -> anyhow::Result<Duration> {
        let ms = match self.env(sh, "PETRA_TIMEOUT_MS")? {
            Some(ms) => ms
                .parse()
                .context("Klaus's PETRA_TIMEOUT_MS is not a number")?,
            None => DEFAULT_PETRA_TIMEOUT_MS,
        };
        Ok(Duration::from_millis(ms))
    }

    /// The sum of the samples of `name` that carry every one of `labels` (`key="value"`), from
    /// Klaus's /metrics.
    pub(super) fn metric(&self, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
        Ok(sum_samples(&scrape(self.admin)?, name, labels))
    }

    /// The share of Klaus's answers with `status` that took at most `le` seconds, from its
    /// latency histogram.
    fn share_within(&self, status: &str, le: &str) -> anyhow::Result<f64> {
        let status = format!("status=\"{status}\"");
        let total = self.metric("http_request_duration_seconds_count", &[&status])?;
        let within = self.metric(
            "http_request_duration_seconds_bucket",
            &[&status, &format!("le=\"{le}\"")],
        )?;
        Ok(if total > 0.0 { within / total } else { 0.0 })
    }
}

/// The address of a container on its (first) network, as the host reaches it.
pub(super) fn container_ip(sh: &Shell, id: &str) -> anyhow::Result<IpAddr> {
    let format = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}";
    let addresses = cmd!(sh, "docker inspect -f {format} {id}").quiet().read()?;
    addresses
        .split_whitespace()
        .find_map(|ip| ip.parse().ok())
        .with_context(|| format!("container {} has no IP address ({addresses:?})", short(id)))
}

/// The metrics text an admin port serves at `/metrics`.
pub(super) fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let reply = get(admin, "/metrics")?;
    ensure!(
        reply.status == 200,
        "/metrics at {admin} answered {}",
        reply.status
    );
    Ok(reply.body)
}

/// Sums the samples of the metric `name` that carry every one of `labels` in a Prometheus text
/// exposition.
pub(super) fn sum_samples(text: &str, name: &str, labels: &[&str]) -> f64 {
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

/// What `docker inspect` says about a container.
#[derive(Debug)]
pub(super) struct State {
    pub(super) status: String,
    pub(super) exit_code: i64,
    oom_killed: bool,
    restarts: u64,
    pub(super) pid: u32,
    pub(super) health: String,
    memory_limit: u64,
}

/// Reads a container's [`State`].
pub(super) fn state(sh: &Shell, id: &str) -> anyhow::Result<State> {
    let format = "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}} {{.RestartCount}} \
                  {{.State.Pid}} {{.HostConfig.Memory}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}";
    let line = cmd!(sh, "docker inspect -f {format} {id}").quiet().read()?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [
        status,
        exit_code,
        oom_killed,
        restarts,
        pid,
        memory_limit,
        health,
    ] = fields[..]
    else {
        bail!("unexpected docker inspect output {line:?}");
    };
    Ok(State {
        status: status.to_owned(),
        exit_code: exit_code.parse()?,
        oom_killed: oom_killed == "true",
        restarts: restarts.parse()?,
        pid: pid.parse()?,
        health: health.to_owned(),
        memory_limit: memory_limit.parse()?,
    })
}

/// The first 12 characters of a container ID, as docker prints it.
pub(super) fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// "a–b s" over some durations, or "a s" when they are all alike.
pub(super) fn span(durations: &[Duration]) -> String {
    let secs = |d: &Duration| d.as_secs_f64();
    let min = durations.iter().map(secs).fold(f64::INFINITY, f64::min);
    let max = durations.iter().map(secs).fold(0.0, f64::max);
    if format!("{min:.2}") == format!("{max:.2}") {
        format!("{max:.2}s")
    } else {
        format!("{min:.2}–{max:.2}s")
    }
}

/// The arguments of an oha run: a rate (none for as fast as it goes), connections, duration.
pub(super) fn load_args(rate: Option<u32>, connections: u32, duration: Duration) -> Vec<String> {
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
pub(super) struct Oha {
    path: PathBuf,
    nofile: Option<u64>,
}

impl Oha {
    /// Finds oha, installing it when missing.
    pub(super) fn find(sh: &Shell) -> anyhow::Result<Self> {
        Ok(Self {
            path: find_oha(sh)?,
            nofile: nofile_to_raise()?,
        })
    }

    /// Starts oha against `url` in the background; requests still running at the end are waited
    /// for (`-w`), so that none is counted as an error.
    pub(super) fn start(&self, url: &str, args: &[String]) -> anyhow::Result<Load> {
        let child = with_nofile(&self.path, self.nofile)
            .args([
                "--no-tui",
                "--output-format",
                "json",
                "--stats-success-breakdown",
                "-w",
            ])
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting oha")?;
        Ok(Load { child: Some(child) })
    }

    /// Runs oha against `url` and returns its report.
    pub(super) fn run(&self, url: &str, args: &[String]) -> anyhow::Result<Report> {
        self.start(url, args)?.finish()
    }
}

/// An oha run in the background, killed if it is dropped before it finished.
pub(super) struct Load {
    child: Option<Child>,
}

impl Load {
    /// Waits for oha to end and reads its report.
    pub(super) fn finish(mut self) -> anyhow::Result<Report> {
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

/// What an oha run reports: answers by status, errors by message, length, p99 and slowest latency.
#[derive(Debug)]
pub(super) struct Report {
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    pub(super) seconds: f64,
    pub(super) p99_ms: f64,
    /// The p99 latency of the 2xx answers alone.
    pub(super) p99_ok_ms: Option<f64>,
    pub(super) slowest_ms: f64,
}

impl Report {
    fn parse(json: &Value) -> anyhow::Result<Self> {
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
        })
    }

    pub(super) fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Every request: answered, or failed with an error.
    pub(super) fn total(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }

    /// Requests that did not end in 200.
    pub(super) fn failures(&self) -> u64 {
        self.total() - self.count(200)
    }

    /// The answers by status and the errors, on one line.
    pub(super) fn outcomes(&self) -> String {
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
