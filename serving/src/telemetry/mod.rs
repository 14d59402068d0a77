//! Logging: `tracing` to stdout, JSON or text, filtered by `RUST_LOG` (default `info`).
//!
//! JSON lines are written by [`JsonLine`], which writes each field straight into the line
//! instead of going through tracing-subscriber's JSON formatter (a serde map per event): the
//! per-request log line was the largest single cost in Petra's request path. Measured with
//! callgrind over 1,000 HTTPS requests to Petra: 58.5k instructions per request with
//! tracing-subscriber's JSON formatter, 48.3k with this one, 39.3k with no log line at all.
//! Numbers are written with itoa and ryu, the timestamp digit by digit and strings escaped byte
//! by byte: the line in Klaus went from 8.0k to 5.2k instructions.
//! The lines keep the same shape: `timestamp`, `level`, the event's fields (the message
//! under `message`), `target`.
//!
//! Logging never blocks serving: lines go to a bounded buffer that a thread of its own writes
//! out (`batched`), and request lines with an error status are sampled (`sampler`). The JSON
//! line is written in `json`, its timestamp in `timestamp`. The request line, one per request,
//! goes to that buffer as values and is formatted by the writing thread, off the request's path
//! (`request`).

mod batched;
mod json;
mod request;
mod sampler;
#[cfg(test)]
mod sink;
mod timestamp;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;
use crate::error::ConfigError;

pub use batched::{BatchedLine, BatchedStdout, FLUSH_INTERVAL, MAX_PENDING_BYTES};
pub use json::JsonLine;
pub use request::{RequestId, RequestLine, Route};
pub use sampler::{SAMPLED_LINES_PER_SECOND, StatusLabel};

use batched::DROPPED;
use sampler::Sampler;

/// Installs the global subscriber. A `RUST_LOG` that does not parse is a configuration error.
pub fn init(format: LogFormat) -> Result<(), ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|err| {
                ConfigError::new(
                    "RUST_LOG",
                    format!("'{directives}' is not a valid filter: {err}"),
                )
            })?,
        _ => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BatchedStdout);
    // A panic aborts the process (panic = "abort"): write out what the buffer holds first.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        batched::flush_stdout_after_panic(Duration::from_secs(1));
        report(info);
    }));
    // A second initialisation (tests that start several services) keeps the first subscriber.
    let sampler = Sampler::global();
    let installed = match format {
        LogFormat::Json => builder
            .event_format(JsonLine)
            .finish()
            .with(sampler)
            .try_init()
            .inspect(|()| REQUEST_LINES_AS_VALUES.store(true, Ordering::Release)),
        LogFormat::Text => builder.with_ansi(false).finish().with(sampler).try_init(),
    };
    if installed.is_ok() {
        sampler.start_summaries();
    }
    Ok(())
}

/// Whether request lines go to the batched stdout as values ([`request`]): JSON lines, through
/// the subscriber [`init`] installed.
static REQUEST_LINES_AS_VALUES: AtomicBool = AtomicBool::new(false);

/// Logs a request's line (target `http`, level INFO), unless `RUST_LOG` filters it out or
/// sampling leaves it out (error statuses beyond the first few each second).
pub fn log_request(status: u16, line: impl FnOnce() -> RequestLine) {
    log_request_as(
        REQUEST_LINES_AS_VALUES.load(Ordering::Acquire),
        status,
        line,
    );
}

/// [`log_request`], with the lines going to the batched stdout as values (`as_values`) or as
/// `tracing` events. As values, `line` is called only once `RUST_LOG` and sampling have let the
/// line through, so a line left out costs no clock reading or copy. As an event, the subscriber
/// decides on the event itself: a `RUST_LOG` rule on a field (`http[{error}]=off`) is only
/// checked against a real event, not against `tracing::enabled!`'s field-less hint.
fn log_request_as(as_values: bool, status: u16, line: impl FnOnce() -> RequestLine) {
    if !as_values {
        return request::log_as_event(&line());
    }
    if !tracing::enabled!(target: "http", tracing::Level::INFO) {
        return;
    }
    if Sampler::global().admit(status, Instant::now()) {
        batched::take_request(line());
    }
}

/// Registers the logging metrics in `registry`: `log_lines_dropped_total` and
/// `log_lines_suppressed_total{status}`. They count for the whole process.
pub fn register(registry: &mut Registry) {
    registry.register(
        "log_lines_dropped",
        "Log lines dropped because stdout did not take them as fast as they came (the buffer was full)",
        DROPPED.clone(),
    );
    registry.register(
        "log_lines_suppressed",
        "Request log lines with this status left out beyond the first few each second (a summary line counts them)",
        Sampler::global().suppressed.clone(),
    );
}

/// Writes out the log lines still held in the buffer, waiting at most a second for stdout.
/// Call it before the process exits.
pub fn flush() {
    batched::flush_stdout(Duration::from_secs(1));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::{EnvFilter, fmt};

    /// Calls `log_request_as` (lines as values) under a subscriber with `filter` and tells
    /// whether it built the line.
    fn builds_the_line_under(filter: &str) -> bool {
        let subscriber = fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .finish();
        let mut built = false;
        tracing::subscriber::with_default(subscriber, || {
            log_request_as(true, 200, || {
                built = true;
                RequestLine::for_tests("id")
            });
        });
        built
    }

    #[test]
    fn a_request_line_is_built_only_when_rust_log_lets_it_through() {
        assert!(builds_the_line_under("info"));
        assert!(!builds_the_line_under("info,http=warn"));
    }
}
