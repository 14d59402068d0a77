//! The rolling restart: the Petra replicas stopped with SIGTERM and started again, one after the
//! other, round after round, under a steady load through Klaus that must see no failure.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use xshell::{Shell, cmd};

use super::REPLICAS;
use crate::e2e::containers::{HEALTHY_DEADLINE, Klaus, short, state};
use crate::e2e::{Project, pass, span, wait_for};
use crate::oha::{Oha, load_args};

/// The rolling restart's steady load through Klaus, in requests per second.
const ROLLING_RATE: u32 = 200;

/// How long the rolling restart's load runs; the restarts must end within it.
const ROLLING_LOAD: Duration = Duration::from_secs(30);

/// The connections oha spreads the steady load over.
const ROLLING_CONNECTIONS: u32 = 20;

/// How long a replica may take to exit after SIGTERM: Petra's delay (SHUTDOWN_DELAY_SECONDS=1)
/// and its drain; `docker stop` sends SIGKILL after 10 s, which the exit code would show.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// Restarts the replicas one after the other (SIGTERM, exited, started, healthy), round after
/// round while a steady load runs through Klaus, and checks that no request failed.
pub(super) fn run(
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

    report.ensure_all_ok("rolling restart")?;
    report.ensure_rate_kept(ROLLING_RATE, "rolling restart")?;
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
