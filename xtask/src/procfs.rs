//! What the tasks read from Linux's `/proc` (and the cgroup files it points to): CPU ticks of a
//! process and of the machine, `stat` and `status` fields, child processes, the load average and
//! the open-files limit. Figures a process no longer has are `None` or an error, never a panic.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::Context;

/// The fields of `/proc/PID/stat` after the command name: state is `[0]`, ppid `[1]`, utime `[11]`,
/// stime `[12]`, cutime `[13]`, cstime `[14]`.
pub(crate) fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time of `pid` (all its threads), in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let fields = stat_fields(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat has no field {}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// CPU time of this task and of the children it has waited for, in ticks.
pub(crate) fn own_ticks() -> anyhow::Result<u64> {
    let fields = stat_fields(std::process::id()).context("reading /proc/self/stat")?;
    // utime, stime, cutime, cstime.
    Ok((11..=14)
        .filter_map(|i| fields.get(i)?.parse::<u64>().ok())
        .sum())
}

/// The whole machine's CPU time over all cores, in clock ticks, from the `cpu` line of
/// `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostTicks {
    /// Time not idle and not waiting for I/O.
    pub(crate) busy: u64,
    /// All of it.
    pub(crate) total: u64,
}

/// The machine's [`HostTicks`] now.
pub(crate) fn host_ticks() -> anyhow::Result<HostTicks> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    host_ticks_of(&stat)
}

fn host_ticks_of(stat: &str) -> anyhow::Result<HostTicks> {
    let times: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    let total: u64 = times.iter().take(8).sum();
    let idle: u64 = times.iter().skip(3).take(2).sum();
    Ok(HostTicks {
        busy: total - idle,
        total,
    })
}

/// The PIDs whose parent is `pid`.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// The command name of `pid` (`/proc/PID/comm`).
pub(crate) fn comm(pid: u32) -> Option<String> {
    Some(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// A figure in KiB from `/proc/PID/status`, by its key (`VmRSS`, `VmHWM`).
pub(crate) fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resets a process's peak resident memory (`VmHWM`) to what it holds now (Linux 4.0 and
/// later: `5` into `/proc/PID/clear_refs`), so that the next peak read is that of what follows.
pub(crate) fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak resident memory of process {pid}"))
}

/// Whether this task runs as root (real user ID 0).
pub(crate) fn is_root() -> anyhow::Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        == Some("0"))
}

/// The one-, five- and fifteen-minute load averages, as `/proc/loadavg` prints them.
pub(crate) fn load_average() -> anyhow::Result<String> {
    let loadavg = fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    Ok(loadavg
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

/// The CPU's model name from `/proc/cpuinfo`.
pub(crate) fn cpu_model() -> anyhow::Result<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    Ok(cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned()))
}

/// This task's open-files limits, soft and hard (`u64::MAX` for unlimited), when
/// `/proc/self/limits` says.
pub(crate) fn open_files_limits() -> anyhow::Result<Option<(u64, u64)>> {
    let limits = fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
        return Ok(None);
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let parse = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Ok(fields
        .get(3)
        .and_then(|s| parse(s))
        .zip(fields.get(4).and_then(|s| parse(s))))
}

/// For each thread of `pid`, the nanoseconds it spent on a core plus those it spent runnable and
/// waiting for one (`/proc/PID/task/TID/schedstat`); empty when the kernel keeps no schedstat.
pub(crate) fn thread_demand_ns(pid: u32) -> BTreeMap<u32, u64> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return BTreeMap::new();
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(task.path().join("schedstat")).ok()?;
            let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
            let (on_core, waiting) = (fields.next()??, fields.next()??);
            Some((tid, on_core + waiting))
        })
        .collect()
}

/// The memory cgroup's peak usage of `pid`: `memory.peak` (cgroup v2) or
/// `memory.max_usage_in_bytes` (v1).
pub(crate) fn cgroup_memory_peak(pid: u32) -> Option<u64> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let read =
        |path: PathBuf| -> Option<u64> { fs::read_to_string(path).ok()?.trim().parse().ok() };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peak_rss_reset_brings_the_peak_down_to_what_is_held_now() {
        let me = std::process::id();
        // 64 MiB touched and given back (glibc maps an allocation this large on its own and
        // unmaps it when freed): the peak stays up, the resident memory comes down.
        let block = vec![1u8; 64 << 20];
        assert_eq!(std::hint::black_box(&block)[12_345], 1);
        drop(block);
        let peak = status_kib(me, "VmHWM").expect("VmHWM");
        assert!(peak >= 64 << 10, "peak {peak} KiB after touching 64 MiB");
        reset_peak_rss(me).expect("clear_refs");
        let after = status_kib(me, "VmHWM").expect("VmHWM");
        assert!(
            after + (32 << 10) < peak,
            "peak {after} KiB after the reset, {peak} KiB before"
        );
    }

    #[test]
    fn host_ticks_leave_idle_and_iowait_out_of_busy() {
        let stat = "cpu  10 20 30 400 50 6 7 8 90 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n";
        let ticks = host_ticks_of(stat).expect("a cpu line");
        assert_eq!(ticks.total, 10 + 20 + 30 + 400 + 50 + 6 + 7 + 8);
        assert_eq!(ticks.busy, 10 + 20 + 30 + 6 + 7 + 8);
    }

    #[test]
    fn this_process_is_read() {
        let pid = std::process::id();
        assert!(stat_fields(pid).is_some_and(|f| f.len() > 14));
        assert!(status_kib(pid, "VmRSS").is_some_and(|kib| kib > 0));
        assert!(cpu_ticks(pid).is_ok());
        assert!(host_ticks().is_ok_and(|t| t.total >= t.busy));
    }
}
