//! The failover scenario of `cargo xtask e2e`, in the two-cloud topology (docker-compose.clouds.yml):
//! under a steady load through Klaus, every Petra of cloud A is stopped, kept down until cloud B has
//! served a stretch of the load, and started again. No request may fail, cloud B must serve while
//! A is down, and the traffic must come back to A.
//!
//! Who served is read on both sides: Klaus's attempts by priority (`petra_attempts_total`) and each
//! Petra container's own `http_requests_total`, from its admin port at the container's address, as
//! the host reaches it. A sampler reads them every 100 ms while the load runs, which dates the
//! failures and the moves between the clouds. Every wait polls a condition under a deadline; the
//! only fixed duration is oha's load run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, ensure};
use xshell::{Shell, cmd};

mod log;

use self::log::{LOGGED_SEQUENCE, in_order, print_klaus_upstream_log};
use super::containers::{ADMIN_PORT, HEALTHY_DEADLINE, Klaus, container_ip, short, state};
use super::{KLAUS_PORT, Project, ensure_port_free, pass, wait_for};
use crate::oha::{Oha, load_args};
use crate::prometheus::{scrape, sum_samples};

/// The compose file the scenario runs on.
const FILE: &str = "docker-compose.clouds.yml";

/// Cloud A's Petra service, priority 0 in Klaus's PETRA_URL, and its replicas.
const CLOUD_A: &str = "petra-a";
const REPLICAS_A: usize = 2;

/// Cloud B's Petra service, priority 1, and the host port it is published on.
const CLOUD_B: &str = "petra-b";
const CLOUD_B_PORT: u16 = 8444;

/// The steady load through Klaus, in requests per second, and the connections oha spreads it over.
const RATE: u32 = 200;
const CONNECTIONS: u32 = 20;

/// How long the load runs: a second or two before the stop, the hold, the start, the failback
/// (at most [`FAILBACK_DEADLINE`]) and some load on A again, with room to spare.
const LOAD: Duration = Duration::from_secs(40);

/// Cloud A stays down until cloud B has served this many seconds' worth of the load, by its own
/// count.
const HOLD_SECONDS: u32 = 8;

/// How long cloud B may take to serve those calls once A is stopped.
const HOLD_DEADLINE: Duration = Duration::from_secs(20);

/// How soon after `docker start` the traffic must be back on A: two of Klaus's DNS
/// re-resolutions (PETRA_RESOLVE_INTERVAL_SECONDS, 5 s) and the replicas' start.
const FAILBACK_DEADLINE: Duration = Duration::from_secs(15);

/// The traffic counts as back on A once B has had no call for this long and both A replicas
/// serve.
const QUIET: Duration = Duration::from_secs(1);

/// How often the sampler reads the metrics.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Brings docker-compose.clouds.yml up under a project name of its own, runs the scenario,
/// prints the logs if it fails, and tears it down.
pub(super) fn run(sh: &Shell, compose: &[String], oha: &Oha) -> anyhow::Result<()> {
    ensure_port_free(KLAUS_PORT)?;
    ensure_port_free(CLOUD_B_PORT)?;
    let project = Project {
        sh,
        compose,
        name: format!("pk-e2e-{}-failover", std::process::id()),
        file: FILE,
    };
    project.run(&["up", "-d"])?;
    let result = failover(sh, &project, oha);
    if result.is_err() {
        let _ = project.run(&["logs", "--no-color", "--tail", "40"]);
    }
    result
}

/// One Petra container and its admin port, at its address on its cloud's network.
#[derive(Debug, Clone)]
struct Petra {
    id: String,
    admin: SocketAddr,
}

impl Petra {
    /// The running containers of `service`, once each is healthy.
    fn all(sh: &Shell, project: &Project<'_>, service: &str) -> anyhow::Result<Vec<Self>> {
        project
            .containers(service)?
            .into_iter()
            .map(|id| {
                wait_healthy(sh, &id)?;
                Self::at(sh, id)
            })
            .collect()
    }

    /// `id`'s admin address now: a container started again may have another.
    fn at(sh: &Shell, id: String) -> anyhow::Result<Self> {
        let ip = container_ip(sh, &id)?;
        Ok(Self {
            id,
            admin: SocketAddr::new(ip, ADMIN_PORT),
        })
    }

    /// The calls this Petra answered 200 since it last started, by its own count.
    fn served(&self) -> anyhow::Result<f64> {
        Ok(sum_samples(
            &scrape(self.admin)?,
            "http_requests_total",
            &["status=\"200\""],
        ))
    }
}

/// Waits until a container's health check passes.
fn wait_healthy(sh: &Shell, id: &str) -> anyhow::Result<()> {
    wait_for(HEALTHY_DEADLINE, || {
        state(sh, id).ok().filter(|s| s.health == "healthy")
    })
    .with_context(|| format!("Petra container {} never became healthy", short(id)))?;
    Ok(())
}

/// What the sampler reads, once per [`SAMPLE_INTERVAL`].
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Since the load began.
    at: Duration,
    /// Klaus's answers that were not 200.
    failed: f64,
    /// Klaus's successful attempts at priority 0 (cloud A) and 1 (cloud B).
    a_ok: f64,
    b_ok: f64,
    /// Cloud B's own count of calls it answered 200, when its admin port answered.
    b_served: Option<f64>,
}

impl Sample {
    fn read(at: Duration, klaus: SocketAddr, b: SocketAddr) -> Option<Self> {
        let text = scrape(klaus).ok()?;
        let attempts = |priority: &str| {
            sum_samples(
                &text,
                "petra_attempts_total",
                &[&format!("priority=\"{priority}\""), "outcome=\"ok\""],
            )
        };
        let answered = sum_samples(&text, "http_requests_total", &[]);
        Some(Self {
            at,
            failed: answered - sum_samples(&text, "http_requests_total", &["status=\"200\""]),
            a_ok: attempts("0"),
            b_ok: attempts("1"),
            b_served: sum_samples_of(b),
        })
    }
}

/// Cloud B's own count, or `None` when it cannot be read.
fn sum_samples_of(admin: SocketAddr) -> Option<f64> {
    scrape(admin)
        .ok()
        .map(|text| sum_samples(&text, "http_requests_total", &["status=\"200\""]))
}

/// When the scenario's steps happened, since the load began.
#[derive(Debug)]
struct Moments {
    stop: Duration,
    /// The wall-clock time of the stop, to place Klaus's log lines.
    stop_wall: SystemTime,
    stopped: Duration,
    start: Duration,
    healthy: Duration,
    back: Duration,
}

/// What the steps counted on the Petra side, by the containers' own counts.
#[derive(Debug, Default)]
struct Served {
    /// Each A replica before the stop (since the scenario's project came up), and B.
    a_before: Vec<f64>,
    b_before: f64,
    /// Cloud B while A was down, and after the traffic was back on A.
    b_while_down: f64,
    b_after_back: f64,
    /// Each A replica from its restart to the end of the load.
    a_after: Vec<f64>,
}

/// Runs the scenario on a project that is up.
fn failover(sh: &Shell, project: &Project<'_>, oha: &Oha) -> anyhow::Result<()> {
    let started = Instant::now();
    let a = Petra::all(sh, project, CLOUD_A)?;
    ensure!(
        a.len() == REPLICAS_A,
        "cloud A has {} Petra containers, not the {REPLICAS_A} of `deploy.replicas`",
        a.len()
    );
    let b = Petra::all(sh, project, CLOUD_B)?;
    let [b] = <[Petra; 1]>::try_from(b)
        .map_err(|b| anyhow::anyhow!("cloud B has {} Petra containers, not 1", b.len()))?;
    let klaus = Klaus::answering(sh, project)?;
    pass(&format!(
        "{REPLICAS_A} Petra replicas in cloud A and 1 in cloud B healthy, Klaus answers 200 at {} ({:.1}s after up)",
        klaus.main,
        started.elapsed().as_secs_f64()
    ));

    let stop_sampling = AtomicBool::new(false);
    let load = oha.start(&klaus.url(), &load_args(Some(RATE), CONNECTIONS, LOAD))?;
    let t0 = Instant::now();
    let t0_wall = SystemTime::now();
    let (steps, samples) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while !stop_sampling.load(Ordering::Relaxed) {
                samples.extend(Sample::read(t0.elapsed(), klaus.admin, b.admin));
                std::thread::sleep(SAMPLE_INTERVAL);
            }
            samples
        });
        let steps = steps(sh, &klaus, &a, &b, t0);
        // The load runs to its end in any case, so that oha's report covers it all.
        let report = load.finish();
        stop_sampling.store(true, Ordering::Relaxed);
        let samples = sampler.join().unwrap_or_default();
        (steps.and_then(|s| Ok((s, report?))), samples)
    });
    // Klaus's own account, printed whether the scenario passes or not.
    let logged = match &steps {
        Ok(((moments, ..), _)) => {
            print_klaus_upstream_log(sh, &klaus, moments.stop_wall, "after `docker stop` of A")
        }
        Err(_) => print_klaus_upstream_log(sh, &klaus, t0_wall, "after the load began"),
    };
    let ((moments, mut served, a), report) = steps?;
    // The log lines the README promises, in the order the scenario makes them.
    ensure!(
        in_order(&logged, &LOGGED_SEQUENCE),
        "Klaus's log about its endpoints (above) lacks, in this order: {LOGGED_SEQUENCE:?}"
    );
    after_load(&klaus, &a, &b, &mut served)?;
    ensure!(
        moments.back + Duration::from_secs(2) <= LOAD,
        "the traffic came back to A {:.1?} after the load began, too near its end ({LOAD:?})",
        moments.back
    );

    // Requests that failed: none may. A stopped replica first refuses connections (it drains
    // for a second), which Klaus's attempts leave at once for another endpoint, up to cloud B,
    // which answers throughout; Klaus's own test of the failover asserts no failed call too.
    report.ensure_rate_kept(RATE, "failover")?;
    let failures = failure_window(&samples, moments.stop);
    ensure!(
        report.failures() == 0,
        "failover: {} of {} requests failed ({}){}; none may, cloud B answered throughout (Klaus's log above says when it moved)",
        report.failures(),
        report.total(),
        report.outcomes(),
        failures
    );
    pass(&format!(
        "cloud A stopped for {:.1}s under {RATE} req/s: {} requests in {:.1}s, {} failed{} ({}), p99 {:.1} ms, slowest {:.0} ms",
        (moments.start - moments.stop).as_secs_f64(),
        report.total(),
        report.seconds,
        report.failures(),
        failures,
        report.outcomes(),
        report.p99_ms,
        report.slowest_ms
    ));

    // Cloud B served while A was down: by its own count (the hold waited for that) and by
    // Klaus's, which must agree.
    let window = |from: Duration, to: Duration, field: fn(&Sample) -> f64| {
        let at = |t: Duration| {
            samples
                .iter()
                .take_while(|s| s.at <= t)
                .last()
                .map_or(0.0, field)
        };
        at(to) - at(from)
    };
    let klaus_b = window(moments.stop, moments.back, |s| s.b_ok);
    ensure!(
        klaus_b >= served.b_while_down * 0.9,
        "cloud B counted {} calls while A was down, Klaus only {klaus_b} successful attempts at priority 1",
        served.b_while_down
    );
    let failover_at = first_rise(&samples, moments.stop, b_own);
    pass(&format!(
        "A's replicas exited {:.1}s after `docker stop`; cloud B served from {} after it: {} calls by its own count, \
         {klaus_b} by Klaus's (priority 1), while A was down",
        (moments.stopped - moments.stop).as_secs_f64(),
        after(failover_at, moments.stop),
        served.b_while_down
    ));

    // The traffic came back to A and stayed there.
    let failback_at = first_rise(&samples, moments.start, |s| s.a_ok);
    let b_last = samples
        .windows(2)
        .rfind(|w| b_own(&w[1]) > b_own(&w[0]))
        .map(|w| w[1].at);
    pass(&format!(
        "`docker start` of A: healthy after {:.1}s; Klaus's first call to A {} after the start; \
         B's last call {} after it; traffic on A (B quiet for {QUIET:?}) {:.1}s after the start; \
         then A's replicas served {} by their own counts, B {} (before the stop: A {})",
        (moments.healthy - moments.start).as_secs_f64(),
        after(failback_at, moments.start),
        after(b_last, moments.start),
        (moments.back - moments.start).as_secs_f64(),
        list(&served.a_after),
        served.b_after_back,
        list(&served.a_before)
    ));
    Ok(())
}

/// The scenario's steps while the load runs: A serves, A stopped, B serves for a while, A started,
/// the traffic back on A. Returns when each happened and what the containers counted.
fn steps(
    sh: &Shell,
    klaus: &Klaus,
    a: &[Petra],
    b: &Petra,
    t0: Instant,
) -> anyhow::Result<(Moments, Served, Vec<Petra>)> {
    let mut moments = Moments {
        stop: Duration::ZERO,
        stop_wall: SystemTime::now(),
        stopped: Duration::ZERO,
        start: Duration::ZERO,
        healthy: Duration::ZERO,
        back: Duration::ZERO,
    };
    let mut served = Served::default();
    let b_count = || b.served().context("reading cloud B's /metrics");
    let b_at_load = b_count()?;
    let a_ok = || {
        klaus.metric(
            "petra_attempts_total",
            &["priority=\"0\"", "outcome=\"ok\""],
        )
    };
    let a_ok_at_load = a_ok()?;
    // Cloud A serves a second's worth of the load before it is stopped.
    wait_for(Duration::from_secs(10), || {
        a_ok()
            .ok()
            .filter(|ok| *ok >= a_ok_at_load + f64::from(RATE))
    })
    .context("Klaus did not call cloud A (priority 0) under the load")?;
    served.a_before = a.iter().map(Petra::served).collect::<anyhow::Result<_>>()?;
    let b_before = b_count()?;
    served.b_before = b_before;
    ensure!(
        served.a_before.iter().all(|n| *n > 0.0),
        "before the stop, not every A replica served: {} (Klaus should balance over both addresses of `petra-a`)",
        list(&served.a_before)
    );
    ensure!(
        b_before == b_at_load,
        "cloud B served {} calls while A was up; priority 1 should get none",
        b_before - b_at_load
    );

    moments.stop = t0.elapsed();
    moments.stop_wall = SystemTime::now();
    let ids: Vec<&str> = a.iter().map(|p| p.id.as_str()).collect();
    let ids = ids.as_slice();
    cmd!(sh, "docker stop {ids...}")
        .quiet()
        .ignore_stdout()
        .run()
        .context("docker stop of cloud A failed")?;
    moments.stopped = t0.elapsed();

    // A stays down until B has served HOLD_SECONDS of the load by its own count.
    let hold = f64::from(HOLD_SECONDS * RATE);
    served.b_while_down = wait_for(HOLD_DEADLINE, || {
        b_count()
            .ok()
            .map(|n| n - b_before)
            .filter(|n| *n >= hold)
    })
    .with_context(|| {
        format!(
            "cloud B did not serve {hold} calls within {HOLD_DEADLINE:?} of A stopping (it served {})",
            b_count().map_or(f64::NAN, |n| n - b_before)
        )
    })?;

    moments.start = t0.elapsed();
    cmd!(sh, "docker start {ids...}")
        .quiet()
        .ignore_stdout()
        .run()
        .context("docker start of cloud A failed")?;
    for id in ids {
        wait_healthy(sh, id)?;
    }
    moments.healthy = t0.elapsed();
    let a = a
        .iter()
        .map(|p| Petra::at(sh, p.id.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;

    // Back on A: B's count has not moved for QUIET, and every A replica has served.
    let mut last_b = (b_count()?, Instant::now());
    let b_down_end = wait_for(FAILBACK_DEADLINE.saturating_sub(t0.elapsed() - moments.start), || {
        let now = b_count().ok()?;
        if now != last_b.0 {
            last_b = (now, Instant::now());
            return None;
        }
        let a_serve = a.iter().all(|p| p.served().is_ok_and(|n| n > 0.0));
        (a_serve && last_b.1.elapsed() >= QUIET).then_some(now)
    })
    .with_context(|| {
        let a_counts: Vec<f64> = a.iter().map(|p| p.served().unwrap_or(f64::NAN)).collect();
        format!(
            "the traffic was not back on A within {FAILBACK_DEADLINE:?} of `docker start`: A's replicas served {}, \
             B's count last moved {:.1?} ago",
            list(&a_counts),
            last_b.1.elapsed()
        )
    })?;
    moments.back = t0.elapsed();
    served.b_while_down = b_down_end - b_before;
    Ok((moments, served, a))
}

/// Once the load has ended: what B served after the traffic was back on A (it should be
/// nothing), what A's replicas served since their restart, and that Klaus still uses priority 0.
fn after_load(klaus: &Klaus, a: &[Petra], b: &Petra, served: &mut Served) -> anyhow::Result<()> {
    served.b_after_back = b.served()? - served.b_before - served.b_while_down;
    served.a_after = a.iter().map(Petra::served).collect::<anyhow::Result<_>>()?;
    let in_use = klaus.metric("petra_priority_in_use", &[])?;
    ensure!(
        in_use == 0.0,
        "after the failback Klaus's petra_priority_in_use is {in_use}, not 0"
    );
    Ok(())
}

/// The failures the sampler saw in Klaus's answers: how many, and from when to when after `stop`.
fn failure_window(samples: &[Sample], stop: Duration) -> String {
    let rises: Vec<(Duration, Duration, f64)> = samples
        .windows(2)
        .filter(|w| w[1].failed > w[0].failed)
        .map(|w| (w[0].at, w[1].at, w[1].failed - w[0].failed))
        .collect();
    match (rises.first(), rises.last()) {
        (Some(first), Some(last)) => format!(
            ", {} of them answered by Klaus with an error between {} and {} after `docker stop` (sampled every {} ms)",
            rises.iter().map(|r| r.2).sum::<f64>(),
            signed(first.0, stop),
            signed(last.1, stop),
            SAMPLE_INTERVAL.as_millis()
        ),
        _ => String::new(),
    }
}

/// Cloud B's own count in a sample (NaN, which compares false, when it could not be read).
fn b_own(sample: &Sample) -> f64 {
    sample.b_served.unwrap_or(f64::NAN)
}

/// When `field` first rose in a sample taken after `from`.
fn first_rise(samples: &[Sample], from: Duration, field: fn(&Sample) -> f64) -> Option<Duration> {
    samples
        .windows(2)
        .filter(|w| w[0].at >= from)
        .find(|w| field(&w[1]) > field(&w[0]))
        .map(|w| w[1].at)
}

/// "1.2s" for a moment after `from`, or "never".
fn after(moment: Option<Duration>, from: Duration) -> String {
    moment.map_or("never".to_owned(), |m| signed(m, from))
}

/// `moment - from` in seconds, with a sign.
fn signed(moment: Duration, from: Duration) -> String {
    format!("{:.1}s", moment.as_secs_f64() - from.as_secs_f64())
}

/// Counts as "a + b".
fn list(counts: &[f64]) -> String {
    counts
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}
