//! What an operator asks of any process: which build runs (`build_info`), and its memory, CPU
//! time, open files and start time under the names other Prometheus clients use (`process_*`),
//! read from `/proc` at each scrape.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The version of the workspace, the git revision it was built from (`GIT_REVISION` at build
/// time, else `git rev-parse`, else `unknown`) and the compiler.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("SERVING_GIT_REVISION");
pub const RUSTC: &str = env!("SERVING_RUSTC_VERSION");

/// Registers `build_info{version,revision,rustc} 1` and the `process_*` metrics.
pub fn register(registry: &mut Registry) {
    registry.register(
        "build",
        "The build that runs: workspace version, git revision, compiler",
        Info::new(vec![
            ("version", VERSION),
            ("revision", REVISION),
            ("rustc", RUSTC),
        ]),
    );
    registry.register_collector(Box::new(Process {
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64()),
    }));
}

/// Reads `/proc/self` when scraped.
#[derive(Debug)]
struct Process {
    /// When the service started, in seconds since the epoch.
    started: f64,
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64| {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            self.started,
        )?;
        if let Some(resident) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| resident_bytes(&status))
        {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                resident,
            )?;
        }
        let cpu = ConstCounter::new(crate::admission::process_cpu().as_secs_f64());
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds.count() as f64,
            )?;
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| max_open_files(&limits))
        {
            gauge(
                &mut encoder,
                "process_max_fds",
                "The limit on open file descriptors",
                max,
            )?;
        }
        Ok(())
    }
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes.
fn resident_bytes(status: &str) -> Option<f64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// The soft limit of `Max open files` in a `/proc/PID/limits` text (none when unlimited).
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn proc_texts_give_resident_memory_and_the_file_limit() {
        let status = "Name:\tpetra\nVmPeak:\t  20000 kB\nVmRSS:\t   9876 kB\nThreads:\t2\n";
        assert_eq!(resident_bytes(status), Some(9876.0 * 1024.0));
        assert_eq!(resident_bytes("Name:\tpetra\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(max_open_files(limits), Some(1_048_576.0));
        assert_eq!(
            max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
    }

    #[test]
    fn the_registry_exports_the_build_and_this_process() {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(&format!(
                "build_info{{version=\"{VERSION}\",revision=\"{REVISION}\",rustc=\"{RUSTC}\"}} 1"
            )),
            "{text}"
        );
        assert!(RUSTC.starts_with("rustc "), "{RUSTC}");
        for name in [
            "process_start_time_seconds",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            let value: f64 = text
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name} ")))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing: {text}"));
            assert!(value > 0.0, "{name} = {value}");
        }
    }
}
