//! The split topology at three distances: the link between Klaus and Petra (slowlink) at 0,
//! 50 ± 10 ms and 150 ± 30 ms of round trip, the two far ones also losing 0.5 % of segments.
//! At each, the placement checks must give the same answers and the same error codes, and a
//! silent link must end calls at Klaus's deadline, not later.
//!
//! A distance is set by recreating the link container alone (`up -d --no-deps link` with
//! `LINK_RTT_MS` and `LINK_JITTER_MS`); Petra and Klaus keep running. Loss is made below TCP,
//! since the proxy cannot drop single segments: an iptables rule with `-m statistic` in the
//! link's network namespace, taken out again by a guard.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use xshell::{Shell, cmd};

use super::containers::{Klaus, state};
use super::cut::Cut;
use super::faults::partition::{PARTITION_CALLS, answers_again, timeouts};
use super::{Placement, Project, STARTUP_DEADLINE, Topology, pass, placement, span, wait_for};
use crate::http::get;
use crate::oha::{Oha, load_args};

/// One distance between Klaus and Petra.
#[derive(Debug, Clone, Copy)]
pub(super) struct Distance {
    /// The round trip the link adds, in ms.
    rtt_ms: u64,
    /// How much it varies either way, in ms.
    jitter_ms: u64,
    /// The share of segments the link's network namespace drops.
    loss: Option<&'static str>,
}

/// The distances the checks run at: co-located, then as between two regions, then as between
/// two continents.
pub(super) const DISTANCES: [Distance; 3] = [
    Distance {
        rtt_ms: 0,
        jitter_ms: 0,
        loss: None,
    },
    Distance {
        rtt_ms: 50,
        jitter_ms: 10,
        loss: Some(LOSS_PROBABILITY),
    },
    Distance {
        rtt_ms: 150,
        jitter_ms: 30,
        loss: Some(LOSS_PROBABILITY),
    },
];

/// The probability that the link drops a segment, as iptables's statistic match reads it.
const LOSS_PROBABILITY: &str = "0.005";

/// Calls sent one after the other at each distance, to see that they are answered and that they
/// do cross the link.
const ANSWER_CALLS: usize = 10;

/// The load sent through the link at each distance, as fast as Klaus answers: connections and
/// length. It is what meets the loss: a few calls cross the link in a few dozen segments.
const LOAD_CONNECTIONS: u32 = 32;
const LOAD: Duration = Duration::from_secs(3);

/// How long after the silent link speaks again Klaus must answer 200: the calls on its pooled
/// connection wait for TCP's next retransmission, which backs off while the link is silent.
const LINK_RECOVERY_DEADLINE: Duration = Duration::from_secs(10);

impl std::fmt::Display for Distance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rtt_ms == 0 {
            write!(f, "co-located (link at 0 ms)")?;
        } else {
            write!(f, "{} ± {} ms round trip", self.rtt_ms, self.jitter_ms)?;
        }
        if let Some(loss) = self.loss {
            let percent = loss.parse::<f64>().unwrap_or(f64::NAN) * 100.0;
            write!(f, ", {percent:.1} % of segments dropped")?;
        }
        Ok(())
    }
}

/// Runs the checks at each of [`DISTANCES`] and checks that the outage's error code is the same
/// at all of them.
pub(super) fn run(
    sh: &Shell,
    project: &Project<'_>,
    oha: &Oha,
    topology: &Topology,
    link: &str,
    klaus: SocketAddr,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut seen = Vec::new();
    for distance in DISTANCES {
        println!("  at {distance}:");
        seen.push(
            at(sh, project, oha, topology, link, klaus, distance)
                .with_context(|| format!("at {distance}"))?,
        );
    }
    let codes: Vec<&str> = seen
        .iter()
        .map(|s| s.placement.outage_code.as_str())
        .collect();
    ensure!(
        codes.windows(2).all(|pair| pair[0] == pair[1]),
        "the outage's error code changed with the distance: {codes:?}"
    );
    pass(&format!(
        "the same answers and error codes at all {} distances ({:.0} s):",
        DISTANCES.len(),
        started.elapsed().as_secs_f64()
    ));
    for (distance, seen) in DISTANCES.iter().zip(&seen) {
        println!("      {distance}: {seen}");
    }
    Ok(())
}

/// What the checks saw at one distance.
#[derive(Debug)]
struct Seen {
    /// The placement checks' outcome.
    placement: Placement,
    /// The median and slowest of [`ANSWER_CALLS`] calls.
    median: Duration,
    slowest: Duration,
    /// The load's rate of 200s and their p99, in ms.
    load_rate: f64,
    load_p99_ms: f64,
    /// How long the 504s took while the link was silent.
    timeouts: String,
    /// How soon after the link returned Klaus answered 200.
    link_back: Duration,
    /// Segments the link dropped and received, when it was lossy.
    loss: Option<(u64, u64)>,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "answers median {:.0} ms, slowest {:.0} ms; {LOAD_CONNECTIONS} connections: {:.0} × 200/s, \
             p99 {:.0} ms; Petra stopped: 502 `{}` after {:.2} s, \
             200 {:.2} s after its start; link silent: 504 after {}, 200 {:.2} s after its return",
            ms(self.median),
            ms(self.slowest),
            self.load_rate,
            self.load_p99_ms,
            self.placement.outage_code,
            self.placement.outage_after.as_secs_f64(),
            self.placement.recovered_after.as_secs_f64(),
            self.timeouts,
            self.link_back.as_secs_f64()
        )?;
        if let Some((dropped, received)) = self.loss {
            write!(f, "; {dropped} of {received} segments dropped")?;
        }
        Ok(())
    }
}

/// Shapes the link, then runs the checks at that distance.
fn at(
    sh: &Shell,
    project: &Project<'_>,
    oha: &Oha,
    topology: &Topology,
    link: &str,
    klaus: SocketAddr,
    distance: Distance,
) -> anyhow::Result<Seen> {
    let reshaped = Instant::now();
    reshape(project, link, distance)?;
    // A recreated link may have a new address, which Klaus finds at its next resolution.
    wait_for(STARTUP_DEADLINE, || {
        get(klaus, "/").ok().filter(|r| r.status == 200)
    })
    .context("Klaus did not answer 200 through the reshaped link")?;
    pass(&format!(
        "link recreated at {} ms ± {} ms; Klaus answers 200 {:.1} s later",
        distance.rtt_ms,
        distance.jitter_ms,
        reshaped.elapsed().as_secs_f64()
    ));
    let link_pid = link_pid(sh, project, link)?;
    let loss = distance
        .loss
        .map(|probability| Loss::new(sh, link_pid, probability))
        .transpose()?;

    let (median, slowest) = answers(klaus, distance)?;
    let (load_rate, load_p99_ms) = load(sh, project, oha)?;
    let placement = placement(sh, project, topology, klaus)?;
    let (timeouts, link_back) = deadline(sh, project, klaus, link_pid)?;
    let loss = loss.map(|loss| loss.counts()).transpose()?;
    if let Some((dropped, received)) = loss {
        pass(&format!(
            "the link dropped {dropped} of the {received} segments it received (SYN excepted)"
        ));
    }
    Ok(Seen {
        placement,
        median,
        slowest,
        load_rate,
        load_p99_ms,
        timeouts,
        link_back,
        loss,
    })
}

/// Recreates the link alone with `distance`'s round trip and jitter (compose recreates it only if
/// they changed).
fn reshape(project: &Project<'_>, link: &str, distance: Distance) -> anyhow::Result<()> {
    project
        .command(&[], &["up", "-d", "--no-deps", link])
        .env("LINK_RTT_MS", distance.rtt_ms.to_string())
        .env("LINK_JITTER_MS", distance.jitter_ms.to_string())
        .run()
        .with_context(|| format!("recreating {link} at {distance} failed"))
}

/// The PID of the link's process on the host, whose network namespace the rules go into.
fn link_pid(sh: &Shell, project: &Project<'_>, link: &str) -> anyhow::Result<u32> {
    let ids = project.containers(link)?;
    let [id] = ids.as_slice() else {
        anyhow::bail!("expected one {link} container, found {}", ids.len());
    };
    let link = state(sh, id)?;
    ensure!(
        link.status == "running",
        "the link container is {}",
        link.status
    );
    Ok(link.pid)
}

/// [`ANSWER_CALLS`] calls one after the other: each must be `hello world`, and none may take
/// less than the link's shortest round trip (or it did not cross the link). Returns the median
/// and the slowest.
fn answers(klaus: SocketAddr, distance: Distance) -> anyhow::Result<(Duration, Duration)> {
    let shortest = Duration::from_millis(distance.rtt_ms.saturating_sub(distance.jitter_ms));
    let mut took = Vec::new();
    for _ in 0..ANSWER_CALLS {
        let started = Instant::now();
        let reply = get(klaus, "/")?;
        let elapsed = started.elapsed();
        ensure!(
            reply.status == 200 && reply.body == "hello world",
            "a call got {} {:?}, not 200 `hello world`",
            reply.status,
            reply.body
        );
        ensure!(
            elapsed >= shortest,
            "a call was answered in {elapsed:.2?}, less than the link's shortest round trip {shortest:?}: it did not cross the link"
        );
        took.push(elapsed);
    }
    took.sort();
    let (median, slowest) = (took[took.len() / 2], took[took.len() - 1]);
    pass(&format!(
        "{ANSWER_CALLS} calls one after the other: all `hello world`, median {:.0} ms, slowest {:.0} ms",
        ms(median),
        ms(slowest)
    ));
    Ok((median, slowest))
}

/// [`LOAD_CONNECTIONS`] connections from oha for [`LOAD`], to Klaus's address on its network:
/// every answer must be 200. Returns the rate of 200s and their p99 in ms.
fn load(sh: &Shell, project: &Project<'_>, oha: &Oha) -> anyhow::Result<(f64, f64)> {
    let klaus = Klaus::find(sh, project)?;
    let report = oha
        .run(&klaus.url(), &load_args(None, LOAD_CONNECTIONS, LOAD))
        .context("the load through the link")?;
    report.ensure_all_ok(&format!("{LOAD_CONNECTIONS} connections for {LOAD:?}"))?;
    let rate = report.ok_rate();
    pass(&format!(
        "{LOAD_CONNECTIONS} connections for {:.1} s: {} × 200 ({rate:.0}/s), no error, p99 {:.0} ms",
        report.seconds,
        report.count(200),
        report.p99_ms
    ));
    Ok((rate, report.p99_ms))
}

/// Silences the link (every segment in or out of its network namespace dropped) and checks that
/// calls end in 504 `petra_timeout` by Klaus's deadline, then that Klaus answers again once the
/// link speaks. Returns how long the 504s took, and how soon Klaus answered 200 again.
fn deadline(
    sh: &Shell,
    project: &Project<'_>,
    klaus: SocketAddr,
    link_pid: u32,
) -> anyhow::Result<(String, Duration)> {
    let deadline = Klaus::find(sh, project)?.petra_timeout(sh)?;
    let mut cut = Cut::new(sh, vec![link_pid])?;
    let took = timeouts(klaus, deadline).context("while the link was silent")?;
    cut.restore()?;
    let restored = Instant::now();
    answers_again(klaus, LINK_RECOVERY_DEADLINE)?;
    let link_back = restored.elapsed();
    let took = span(&took);
    pass(&format!(
        "link silent: {PARTITION_CALLS} calls at once get 504 `petra_timeout` after {took} \
         (PETRA_TIMEOUT_MS={} ms); 200 again {:.2} s after the link returned",
        deadline.as_millis(),
        link_back.as_secs_f64()
    ));
    Ok((took, link_back))
}

/// Milliseconds, for printing.
fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The rules that make the link lossy, in its network namespace's INPUT chain: every segment
/// either way between Klaus and Petra enters the link once (Klaus's requests from Klaus, Petra's
/// answers from the host), so each direction loses the given share. The first rule only counts.
///
/// SYN segments are spared: a lost SYN costs Linux's 1 s initial retransmission timeout, which is
/// all of Klaus's connect share at its default deadline (half of 2 s), so one lost SYN would turn
/// a check's answer into a `petra_timeout` by chance. Every other segment, handshakes' data
/// included, can be lost.
struct Loss<'a> {
    sh: &'a Shell,
    pid: String,
    rules: [Vec<String>; 2],
    active: bool,
}

impl<'a> Loss<'a> {
    fn new(sh: &'a Shell, pid: u32, probability: &str) -> anyhow::Result<Self> {
        let segments = [
            "INPUT",
            "!",
            "-i",
            "lo",
            "-p",
            "tcp",
            "--tcp-flags",
            "SYN",
            "NONE",
        ];
        let counted: Vec<String> = segments.iter().map(|s| (*s).to_owned()).collect();
        let mut dropped = counted.clone();
        dropped.extend(
            [
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                probability,
                "-j",
                "DROP",
            ]
            .map(str::to_owned),
        );
        // Active from the start, so that a rule that went in is taken out even if the next one
        // fails.
        let loss = Self {
            sh,
            pid: pid.to_string(),
            rules: [counted, dropped],
            active: true,
        };
        for rule in &loss.rules {
            loss.iptables("-A", rule)?;
        }
        Ok(loss)
    }

    /// How many segments the link dropped, and how many it received (SYN excepted).
    fn counts(&self) -> anyhow::Result<(u64, u64)> {
        let pid = &self.pid;
        let listing = cmd!(self.sh, "nsenter -t {pid} -n iptables -w -L INPUT -v -x -n")
            .quiet()
            .read()
            .context("listing the link's INPUT chain failed")?;
        loss_counts(&listing).with_context(|| {
            format!("the loss rules are not in the link's INPUT chain:\n{listing}")
        })
    }

    fn iptables(&self, op: &str, rule: &[String]) -> anyhow::Result<()> {
        let pid = &self.pid;
        cmd!(self.sh, "nsenter -t {pid} -n iptables -w {op} {rule...}")
            .quiet()
            .run()
            .with_context(|| {
                format!("iptables {op} in the link's network namespace (PID {pid}) failed (needs root, nsenter and iptables)")
            })?;
        Ok(())
    }
}

impl Drop for Loss<'_> {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        for rule in &self.rules {
            if let Err(err) = self.iptables("-D", rule) {
                eprintln!("warning: taking the link's loss rule out failed: {err:#}");
            }
        }
    }
}

/// The packet counts of the loss rules in `iptables -L INPUT -v -x -n`: (dropped, received).
fn loss_counts(listing: &str) -> Option<(u64, u64)> {
    let packets = |line: &str| {
        line.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
    };
    // Both rules match segments without SYN; the dropping one also has the statistic match.
    let ours = || {
        listing
            .lines()
            .filter(|line| line.contains("flags:0x02/0x00"))
    };
    let dropped = ours()
        .filter(|line| line.contains("statistic"))
        .find_map(packets)?;
    let received = ours()
        .filter(|line| !line.contains("statistic"))
        .find_map(packets)?;
    Some((dropped, received))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_counts_reads_both_rules() {
        // As iptables 1.8.9 (nf_tables) lists them.
        let listing = "\
Chain INPUT (policy ACCEPT 0 packets, 0 bytes)
    pkts      bytes target     prot opt in     out     source               destination
    1234    98765            6    --  !lo    *       0.0.0.0/0            0.0.0.0/0            tcp flags:0x02/0x00
       7      364 DROP       6    --  !lo    *       0.0.0.0/0            0.0.0.0/0            tcp flags:0x02/0x00 statistic mode random probability 0.00499999989
";
        assert_eq!(loss_counts(listing), Some((7, 1234)));
    }

    #[test]
    fn loss_counts_needs_both_rules() {
        let listing = "\
Chain INPUT (policy ACCEPT 0 packets, 0 bytes)
    pkts      bytes target     prot opt in     out     source               destination
    1234    98765            6    --  !lo    *       0.0.0.0/0            0.0.0.0/0            tcp flags:0x02/0x00
";
        assert_eq!(loss_counts(listing), None);
    }

    #[test]
    fn distances_grow_and_only_the_far_ones_lose() {
        assert_eq!(DISTANCES[0].rtt_ms, 0);
        assert!(DISTANCES[0].loss.is_none());
        for pair in DISTANCES.windows(2) {
            assert!(pair[0].rtt_ms < pair[1].rtt_ms);
        }
        for distance in &DISTANCES[1..] {
            assert_eq!(distance.loss, Some("0.005"));
            // slowlink refuses a jitter larger than the round trip.
            assert!(distance.jitter_ms <= distance.rtt_ms);
        }
        assert_eq!(
            DISTANCES[2].to_string(),
            "150 ± 30 ms round trip, 0.5 % of segments dropped"
        );
    }
}
