//! The partition: every packet to and from the Petra replicas dropped while Docker's DNS still
//! resolves them; Klaus must answer 504 by its deadline, drop its dead pooled connection, and
//! answer 200 again soon after the link returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use xshell::Shell;

use crate::e2e::containers::{Klaus, state};
use crate::e2e::cut::Cut;
use crate::e2e::{Project, pass, span, wait_for};
use crate::http::{Reply, get};

/// How long after Klaus's deadline its 504 may reach the host: timers, scheduling and the bridge.
const DEADLINE_SLACK: Duration = Duration::from_millis(200);

/// Calls sent to Klaus at once during the partition.
pub(in crate::e2e) const PARTITION_CALLS: usize = 8;

/// How long into a cut Klaus may keep its dead pooled connection: its HTTP/2 ping interval
/// (5 s) and ping timeout (3 s), with room for a call in flight.
const DEAD_CONNECTION_DEADLINE: Duration = Duration::from_secs(15);

/// How soon after the link returns Klaus must answer 200 again, once it has dropped the dead
/// connection.
const LINK_RECOVERY_DEADLINE: Duration = Duration::from_secs(1);

/// Drops every packet to and from the Petra replicas while Docker's DNS still
/// resolves them, and checks that Klaus answers 504 by its deadline, on pooled connections and on
/// new ones, and 200 again soon after the link returns.
pub(super) fn run(sh: &Shell, project: &Project<'_>, klaus: &Klaus) -> anyhow::Result<()> {
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
pub(in crate::e2e) fn answers_again(klaus: SocketAddr, deadline: Duration) -> anyhow::Result<()> {
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
pub(in crate::e2e) fn timeouts(
    klaus: SocketAddr,
    deadline: Duration,
) -> anyhow::Result<Vec<Duration>> {
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
