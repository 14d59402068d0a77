//! How much CPU the process asked for: the time its threads were on a CPU or ready and waiting
//! for one. The CPU time alone says how much the process got; on a machine it shares (a busy
//! node, a load generator on the same cores) a thread that wants the CPU all the time gets
//! less than all of it, and CPU time alone would call it idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The time the process's threads ran or waited to run so far: its CPU time, plus the time its
/// threads waited in a run queue from the scheduler's per-thread accounting
/// (`/proc/self/task/*/schedstat`). Where that is not available (a kernel without
/// `CONFIG_SCHED_INFO`, no `/proc`), the CPU time alone: the demand the process got, a floor
/// under the one it had. Never less than an earlier reading: a thread that ends takes its
/// waiting with it, and a failed read (out of file descriptors under overload) keeps the last
/// sum instead of dropping to the CPU time, which would read as a burst of demand when the next
/// read succeeds.
pub(crate) fn cpu_demand() -> Duration {
    static WAITED_NS: AtomicU64 = AtomicU64::new(0);
    let waited = match waited_ns() {
        Some(now) => WAITED_NS.fetch_max(now, Ordering::Relaxed).max(now),
        None => WAITED_NS.load(Ordering::Relaxed),
    };
    super::process_cpu() + Duration::from_nanos(waited)
}

/// The run-queue time of the threads alive now, in nanoseconds.
fn waited_ns() -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that ended since the listing has no file any more.
        let Ok(stat) = std::fs::read_to_string(path) else {
            continue;
        };
        total = total.saturating_add(parse(&stat)?);
    }
    Some(total)
}

/// The run-queue nanoseconds of one `schedstat` line (`<on cpu> <waiting> <slices>`).
fn parse(stat: &str) -> Option<u64> {
    let mut fields = stat.split_ascii_whitespace();
    let _running: u64 = fields.next()?.parse().ok()?;
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedstat_line_gives_the_time_waiting() {
        assert_eq!(parse("459233 421399 7\n"), Some(421_399));
        assert_eq!(parse("12 x 7"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn demand_grows_with_work() {
        let before = cpu_demand();
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let after = cpu_demand();
        // The scheduler accounts a running thread's time at each tick, so a few milliseconds of
        // the spin may not show yet.
        assert!(
            after >= before + Duration::from_millis(10),
            "{before:?} -> {after:?}"
        );
    }
}
