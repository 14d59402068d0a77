//! Sampling of the request log lines with an error status, which a client can multiply at will.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// Request log lines (target `http`) with an error status that are logged each second, per
/// status; the rest are counted and summarised.
pub const SAMPLED_LINES_PER_SECOND: u32 = 20;

/// The `status` label of `log_lines_suppressed_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StatusLabel {
    status: u16,
}

/// Samples the request log lines a client can multiply at will: one line per 404, 431 or 503
/// (any status from 400) would let a flood of bad requests multiply the log volume, fill the
/// log pipeline and hide what matters. Per status, the first [`SAMPLED_LINES_PER_SECOND`] lines
/// of each second are logged; the rest are left out, counted in
/// `log_lines_suppressed_total{status}`, and summarised once a second in one warning,
/// `suppressed similar request lines`, with the status and the count. Successful requests
/// are all logged.
#[derive(Debug, Default)]
pub(super) struct Sampler {
    /// Per status: the current second's window. A handful of statuses at most.
    windows: Mutex<Vec<Window>>,
    pub(super) suppressed: Family<StatusLabel, Counter>,
    /// Whether the summarising thread runs.
    summarising: AtomicBool,
}

#[derive(Debug)]
struct Window {
    status: u16,
    started: Instant,
    logged: u32,
    /// Left out since the last summary.
    suppressed: u64,
}

impl Sampler {
    pub(super) fn global() -> &'static Self {
        static SAMPLER: LazyLock<Sampler> = LazyLock::new(Sampler::default);
        &SAMPLER
    }

    /// Whether a request line with `status` is logged at `now`.
    pub(super) fn admit(&self, status: u16, now: Instant) -> bool {
        if status < 400 {
            return true;
        }
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let at = match windows.iter().position(|w| w.status == status) {
            Some(at) => at,
            None => {
                windows.push(Window {
                    status,
                    started: now,
                    logged: 0,
                    suppressed: 0,
                });
                windows.len() - 1
            }
        };
        let window = &mut windows[at];
        if now.saturating_duration_since(window.started) >= Duration::from_secs(1) {
            window.started = now;
            window.logged = 0;
        }
        if window.logged < SAMPLED_LINES_PER_SECOND {
            window.logged += 1;
            return true;
        }
        window.suppressed += 1;
        drop(windows);
        self.suppressed.get_or_create(&StatusLabel { status }).inc();
        false
    }

    /// The lines left out since the last call, per status.
    fn take_suppressed(&self) -> Vec<(u16, u64)> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        windows
            .iter_mut()
            .filter(|w| w.suppressed > 0)
            .map(|w| (w.status, std::mem::take(&mut w.suppressed)))
            .collect()
    }

    /// Starts the thread that logs one summary a second while lines are left out.
    pub(super) fn start_summaries(&'static self) {
        if self.summarising.swap(true, Ordering::AcqRel) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("log-sampling".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    self.summarise();
                }
            });
        if let Err(err) = spawned {
            eprintln!("warning: cannot start the log sampling thread ({err}); no summaries");
        }
    }

    fn summarise(&self) {
        for (status, suppressed) in self.take_suppressed() {
            tracing::warn!(
                target: "log_sampling",
                status,
                suppressed,
                per_second = SAMPLED_LINES_PER_SECOND,
                "suppressed similar request lines"
            );
        }
    }
}

impl<S: Subscriber> Layer<S> for &'static Sampler {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        if event.metadata().target() != "http" {
            return true;
        }
        let mut status = StatusField(None);
        event.record(&mut status);
        match status.0 {
            Some(status) => self.admit(status, Instant::now()),
            None => true,
        }
    }
}

/// Finds an event's `status` field.
struct StatusField(Option<u16>);

impl Visit for StatusField {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "status" {
            self.0 = u16::try_from(value).ok();
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "status" {
            self.0 = u16::try_from(value).ok();
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn fmt::Debug) {}
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn error_request_lines_are_sampled_per_status_and_second() {
        let sampler = Sampler::default();
        let start = Instant::now();
        let logged = |status, at: Duration, n: u32| {
            (0..n).filter(|_| sampler.admit(status, start + at)).count() as u32
        };
        assert_eq!(
            logged(200, Duration::ZERO, 500),
            500,
            "successes are all logged"
        );
        assert_eq!(logged(404, Duration::ZERO, 500), SAMPLED_LINES_PER_SECOND);
        assert_eq!(
            logged(431, Duration::from_millis(10), 30),
            SAMPLED_LINES_PER_SECOND
        );
        assert_eq!(logged(404, Duration::from_millis(999), 5), 0);
        // A new second, a new allowance.
        assert_eq!(
            logged(404, Duration::from_secs(1), 500),
            SAMPLED_LINES_PER_SECOND
        );
        let mut suppressed = sampler.take_suppressed();
        suppressed.sort_unstable();
        assert_eq!(suppressed, [(404, 965), (431, 10)]);
        assert!(
            sampler.take_suppressed().is_empty(),
            "each summary counts anew"
        );
        assert_eq!(
            sampler
                .suppressed
                .get_or_create(&StatusLabel { status: 404 })
                .get(),
            965
        );
    }
}
