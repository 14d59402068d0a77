//! How much CPU the process asked for: the time its threads were on a CPU or ready and waiting
//! for one. The CPU time alone says how much the process got; on a machine it shares (a busy
//! node, a load generator on the same cores) a thread that wants the CPU all the time gets
//! less than all of it, and CPU time alone would call it idle.

use std::time::Duration;

/// The time the process's threads ran or waited to run so far, from the scheduler's per-thread
/// accounting (`/proc/self/task/*/schedstat`: time on a CPU, time waiting in a run queue).
/// Where that is not available (a kernel without `CONFIG_SCHED_INFO`, or no `/proc`), the
/// process's CPU time: the demand it got, a floor under the one it had.
pub(crate) fn cpu_demand() -> Duration {
    scheduled().unwrap_or_else(super::process_cpu)
}

fn scheduled() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that ended since the listing has no file any more; its time is lost either
        // way, as it is from the CPU time of a process once the thread is reaped.
        let Ok(stat) = std::fs::read_to_string(path) else {
            continue;
        };
        total = total.saturating_add(parse(&stat)?);
    }
    (total > 0).then(|| Duration::from_nanos(total))
}

/// On-CPU plus run-queue nanoseconds from one `schedstat` line (`<on cpu> <waiting> <slices>`).
fn parse(stat: &str) -> Option<u64> {
    let mut fields = stat.split_ascii_whitespace();
    let running: u64 = fields.next()?.parse().ok()?;
    let waiting: u64 = fields.next()?.parse().ok()?;
    Some(running.saturating_add(waiting))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedstat_line_gives_running_plus_waiting() {
        assert_eq!(parse("459233 421399 7\n"), Some(880_632));
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
