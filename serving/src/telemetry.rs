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
//! out (`Batched`), and request lines with an error status are sampled (`Sampler`).

use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{ConfigError, LogFormat};

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
        if let Some(batched) = STDOUT.get() {
            batched.flush_after_panic(Duration::from_secs(1));
        }
        report(info);
    }));
    // A second initialisation (tests that start several services) keeps the first subscriber.
    let sampler = Sampler::global();
    let installed = match format {
        LogFormat::Json => builder
            .event_format(JsonLine)
            .finish()
            .with(sampler)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).finish().with(sampler).try_init(),
    };
    if installed.is_ok() {
        sampler.start_summaries();
    }
    Ok(())
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
    if let Some(batched) = STDOUT.get() {
        batched.flush_within(Duration::from_secs(1));
    }
}

/// The longest an info or debug line waits in the buffer before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// A buffer that holds this many bytes is written out at once.
const FLUSH_BYTES: usize = 64 * 1024;

/// The most bytes the buffer holds while stdout does not take them: four full batches, about
/// a thousand request lines. Beyond it lines are dropped and counted, never waited for.
pub const MAX_PENDING_BYTES: usize = 4 * FLUSH_BYTES;

static STDOUT: OnceLock<Batched> = OnceLock::new();

/// `log_lines_dropped_total`.
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Log output written in batches, by one thread of its own. One `write(2)` per log line was a
/// third of Klaus's system calls and nine in ten of Petra's under load (strace), so lines
/// collect in a buffer that the `log-flush` thread writes out [`FLUSH_INTERVAL`] after the
/// first of them arrived, or at once when a warning or an error arrives or the buffer reaches
/// [`FLUSH_BYTES`], after what was buffered so that order is kept. A thread that logs only
/// appends to the buffer: it never writes, so a stdout that blocks (a log driver pushing back,
/// a full pipe nobody reads) never stops serving. While stdout does not take the lines the
/// buffer fills up to [`MAX_PENDING_BYTES`], and further lines are dropped and counted in
/// `log_lines_dropped_total`. [`flush`] runs before the process exits, and a panic writes the
/// buffer out before it aborts. What a SIGKILL can lose is at most the last 50 ms of info
/// lines, as with nginx's `access_log buffer= flush=`. While no line arrives the thread sleeps
/// on a condvar.
///
/// tracing-appender's `non_blocking` writer was the other candidate: it also hands lines to a
/// thread and can drop them (lossy mode), but it sends every line as a message of its own and
/// writes each with a `write(2)` of its own, the cost this writer was made to remove.
struct Batched {
    /// Lines not yet written. Lock order: `lines`, then `out`.
    lines: Mutex<Vec<u8>>,
    /// Wakes the flushing thread: a first line arrived, or one that must go out at once.
    arrived: Condvar,
    /// Whether a line that must go out at once (a warning, an error, a full batch, a flush)
    /// is waiting.
    urgent: AtomicBool,
    /// Where the lines go, and the batch being written. Only the flushing thread writes while
    /// it runs; it holds this lock, not `lines`, while it does.
    out: Mutex<Output>,
    /// Whether the flushing thread runs; without it every line is written at once.
    flusher: AtomicBool,
    /// Where dropped lines are counted.
    dropped: Counter,
}

/// The sink, and a spare buffer that the pending lines are swapped into for writing.
struct Output {
    sink: Box<dyn io::Write + Send>,
    batch: Vec<u8>,
}

impl Output {
    /// Swaps the pending lines out, releases `lines`' lock (after this one was taken, so
    /// batches go out in order) and writes them.
    fn write(&mut self, mut pending: MutexGuard<'_, Vec<u8>>) {
        if pending.is_empty() {
            return;
        }
        std::mem::swap(&mut *pending, &mut self.batch);
        drop(pending);
        // A closed or broken stdout must not take the service down; the lines are dropped.
        let _ = self
            .sink
            .write_all(&self.batch)
            .and_then(|()| self.sink.flush());
        self.batch.clear();
    }
}

impl Batched {
    fn new(sink: Box<dyn io::Write + Send>, dropped: Counter) -> Self {
        Self {
            lines: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            urgent: AtomicBool::new(false),
            out: Mutex::new(Output {
                sink,
                batch: Vec::new(),
            }),
            flusher: AtomicBool::new(false),
            dropped,
        }
    }

    /// Writes out what `pending` holds, on this thread.
    fn write_out(&self, pending: MutexGuard<'_, Vec<u8>>) {
        if pending.is_empty() {
            return;
        }
        self.out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .write(pending);
    }

    /// Has the flushing thread write out what is buffered, and waits up to `limit` until it
    /// has: a stdout that never takes them must not keep the process from exiting.
    fn flush_within(&self, limit: Duration) {
        if !self.flusher.load(Ordering::Acquire) {
            self.write_out(self.lock());
            return;
        }
        {
            let _pending = self.lock();
            self.urgent.store(true, Ordering::Release);
            self.arrived.notify_one();
        }
        let deadline = Instant::now() + limit;
        // Written once nothing is pending and the flushing thread is not in a write.
        while !(self.lock().is_empty() && self.out.try_lock().is_ok()) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// For the panic hook: has the flushing thread write out what is buffered and waits up to
    /// `limit`, without waiting for a lock (the panic may have struck while this thread held
    /// one) or writing on this thread (a blocked stdout would turn the abort into a hang).
    fn flush_after_panic(&self, limit: Duration) {
        if !self.flusher.load(Ordering::Acquire) {
            if let (Ok(pending), Ok(mut out)) = (self.lines.try_lock(), self.out.try_lock()) {
                out.write(pending);
            }
            return;
        }
        // Without the lock a wake-up can be missed; the flushing thread then writes at the
        // end of its flush interval instead.
        self.urgent.store(true, Ordering::Release);
        self.arrived.notify_one();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let written = self
                .lines
                .try_lock()
                .is_ok_and(|pending| pending.is_empty())
                && self.out.try_lock().is_ok();
            if written {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The process's one batched stdout, with its flushing thread started on first use.
    fn stdout() -> &'static Self {
        static START: Once = Once::new();
        let batched = STDOUT.get_or_init(|| Self::new(Box::new(io::stdout()), DROPPED.clone()));
        START.call_once(|| batched.start_flusher());
        batched
    }

    fn start_flusher(&'static self) {
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || self.flush_forever());
        match spawned {
            Ok(_) => self.flusher.store(true, Ordering::Release),
            Err(err) => eprintln!(
                "warning: cannot start the log flushing thread ({err}); writing log lines one by one"
            ),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while the lock was held leaves lines that are still worth writing.
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn flush_forever(&self) {
        loop {
            let mut pending = self.lock();
            while pending.is_empty() {
                pending = self
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            // Info lines wait for more to join them, unless something must go out now.
            let deadline = Instant::now() + FLUSH_INTERVAL;
            while !self.urgent.load(Ordering::Acquire) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pending = self
                    .arrived
                    .wait_timeout(pending, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            self.urgent.store(false, Ordering::Release);
            self.write_out(pending);
        }
    }

    /// Takes one formatted line (or several): appends it to the buffer, or drops and counts
    /// it when the buffer is full. Never writes, unless the flushing thread could not start.
    fn take(&self, line: &[u8], urgent: bool) {
        let mut pending = self.lock();
        if !self.flusher.load(Ordering::Acquire) {
            pending.extend_from_slice(line);
            self.write_out(pending);
            return;
        }
        if pending.len() + line.len() > MAX_PENDING_BYTES {
            drop(pending);
            let lines = line.iter().filter(|&&b| b == b'\n').count().max(1);
            self.dropped.inc_by(lines as u64);
            return;
        }
        let was_empty = pending.is_empty();
        pending.extend_from_slice(line);
        if urgent || pending.len() >= FLUSH_BYTES {
            self.urgent.store(true, Ordering::Release);
            self.arrived.notify_one();
        } else if was_empty {
            self.arrived.notify_one();
        }
    }
}

/// One log line on its way into the batched stdout.
#[derive(Debug)]
pub struct BatchedLine {
    urgent: bool,
}

impl io::Write for BatchedLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Batched::stdout().take(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The [`MakeWriter`] for the batched stdout: warnings and errors are urgent.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchedStdout;

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = BatchedLine;

    fn make_writer(&'a self) -> BatchedLine {
        BatchedLine { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> BatchedLine {
        BatchedLine {
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

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
struct Sampler {
    /// Per status: the current second's window. A handful of statuses at most.
    windows: Mutex<Vec<Window>>,
    suppressed: Family<StatusLabel, Counter>,
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
    fn global() -> &'static Self {
        static SAMPLER: LazyLock<Sampler> = LazyLock::new(Sampler::default);
        &SAMPLER
    }

    /// Whether a request line with `status` is logged at `now`.
    fn admit(&self, status: u16, now: Instant) -> bool {
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
    fn start_summaries(&'static self) {
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

/// One JSON object per event: `{"timestamp":"…Z","level":"INFO",<fields>,"target":"…"}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_str("\"")?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFields<'a, W: fmt::Write> {
    out: &'a mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> JsonFields<'_, W> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                // A field name is almost always an identifier: one check, then one write.
                let name = field.name();
                if needs_escaping(name) {
                    self.out.write_str(",")?;
                    write_json_str(self.out, name)?;
                    self.out.write_str(":")?;
                } else {
                    self.out.write_str(",\"")?;
                    self.out.write_str(name)?;
                    self.out.write_str("\":")?;
                }
                value(self.out)
            })();
        }
    }
}

impl<W: fmt::Write> Visit for JsonFields<'_, W> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |out| {
            if value.is_finite() {
                out.write_str(ryu::Buffer::new().format_finite(value))
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |out| write_json_str(out, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |out| {
            out.write_str("\"")?;
            write!(Escaped(out), "{value}")?;
            out.write_str("\"")
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |out| {
            out.write_str("\"")?;
            write!(Escaped(out), "{value:?}")?;
            out.write_str("\"")
        });
    }
}

/// `value` as a JSON string, quotes included.
fn write_json_str(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    out.write_str("\"")?;
    Escaped(out).write_str(value)?;
    out.write_str("\"")
}

/// Whether `s` holds a byte that a JSON string must escape. The check looks at every byte
/// without stopping early, which the compiler vectorises: most strings here (request ids,
/// routes, field names) need nothing and are then written whole, without the byte-by-byte
/// search for the first byte to escape.
fn needs_escaping(s: &str) -> bool {
    s.bytes().fold(false, |any, b| {
        any | (b == b'"') | (b == b'\\') | (b < b' ')
    })
}

/// Escapes what it is given for the inside of a JSON string.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !needs_escaping(s) {
            return self.0.write_str(s);
        }
        // Byte by byte: every character that needs escaping is ASCII, and no byte of a
        // multi-byte UTF-8 sequence is, so the runs in between are whole characters.
        let mut rest = s;
        while let Some(at) = rest
            .bytes()
            .position(|b| b == b'"' || b == b'\\' || b < b' ')
        {
            self.0.write_str(&rest[..at])?;
            match rest.as_bytes()[at] {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                other => write!(self.0, "\\u{:04x}", u32::from(other))?,
            }
            rest = &rest[at + 1..];
        }
        self.0.write_str(rest)
    }
}

/// `now` in RFC 3339, UTC, with microseconds: `2026-11-27T08:15:02.123456Z`.
fn write_timestamp(out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    // Digit by digit into a fixed buffer: `write!` with padding cost more than the rest of
    // the line's fields together.
    let mut buf = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for slot in buf[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    out.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
}

/// The Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timestamp(secs: u64, micros: u32) -> String {
        let mut out = String::new();
        let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into());
        write_timestamp(&mut out, at).expect("write");
        out
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00.000000Z");
        // Leap days, the turn of a century that is not a leap year, and one that is.
        assert_eq!(timestamp(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(
            timestamp(4_107_542_399, 999_999),
            "2100-02-28T23:59:59.999999Z"
        );
        assert_eq!(timestamp(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        assert_eq!(
            timestamp(1_795_767_302, 123_456),
            "2026-11-27T08:15:02.123456Z"
        );
    }

    #[test]
    fn strings_are_escaped_for_json() {
        let mut out = String::new();
        write_json_str(&mut out, "a \"b\" \\ c\nd\te\u{1}é").expect("write");
        assert_eq!(out, r#""a \"b\" \\ c\nd\te\u0001é""#);
        let parsed: String = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(parsed, "a \"b\" \\ c\nd\te\u{1}é");
    }

    #[test]
    fn numbers_are_json_numbers_at_any_size() {
        for value in [0.0, 1.5, 2.5e-7, 12_345.678_9, 1e21] {
            let line = one_line(|| tracing::info!(latency_ms = value, count = 7_u64, "x"));
            let line: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
            assert_eq!(line["latency_ms"].as_f64(), Some(value), "{line}");
            assert_eq!(line["count"].as_u64(), Some(7), "{line}");
        }
    }

    /// A sink that records what it was given and how many writes it took.
    #[derive(Clone, Default)]
    struct Counting(std::sync::Arc<Mutex<(Vec<u8>, usize)>>);

    impl io::Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut seen = self.0.lock().expect("lock");
            seen.0.extend_from_slice(buf);
            seen.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Counting {
        fn lines(&self) -> (usize, usize) {
            let seen = self.0.lock().expect("lock");
            (seen.0.iter().filter(|&&b| b == b'\n').count(), seen.1)
        }
    }

    /// Waits up to 5 s until `sink` has seen `lines` lines.
    fn wait_for_lines(sink: &Counting, lines: usize) {
        let since = Instant::now();
        while sink.lines().0 < lines {
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "{} of {lines} lines written",
                sink.lines().0
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn info_lines_go_out_in_batches_and_warnings_at_once() {
        let sink = Counting::default();
        let batched: &'static Batched = Box::leak(Box::new(Batched::new(
            Box::new(sink.clone()),
            Counter::default(),
        )));
        batched.start_flusher();

        let since = Instant::now();
        for i in 0..100 {
            batched.take(format!("info {i}\n").as_bytes(), false);
        }
        batched.take(b"warn\n", true);
        // The warning goes out without waiting for the flush interval, after every line
        // before it.
        wait_for_lines(&sink, 101);
        assert!(
            since.elapsed() < FLUSH_INTERVAL,
            "the warning waited {:?}",
            since.elapsed()
        );
        let (_, writes) = sink.lines();
        assert!(writes <= 3, "101 lines took {writes} writes");
        let text = String::from_utf8(sink.0.lock().expect("lock").0.clone()).expect("UTF-8");
        assert!(text.starts_with("info 0\ninfo 1\n") && text.ends_with("info 99\nwarn\n"));

        // Info lines alone go out within the flush interval, in a write or two.
        for i in 0..100 {
            batched.take(format!("later {i}\n").as_bytes(), false);
        }
        wait_for_lines(&sink, 201);
        let (_, writes_after) = sink.lines();
        assert!(
            writes_after - writes <= 3,
            "100 lines took {} writes",
            writes_after - writes
        );
    }

    /// A sink whose writes block until the test lets them go, as a pipe nobody reads.
    struct Blocked(std::sync::mpsc::Receiver<()>);

    impl io::Write for Blocked {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_stdout_drops_and_counts_lines_instead_of_blocking() {
        let (release, blocked) = std::sync::mpsc::channel();
        let dropped = Counter::default();
        let batched: &'static Batched = Box::leak(Box::new(Batched::new(
            Box::new(Blocked(blocked)),
            dropped.clone(),
        )));
        batched.start_flusher();
        let line = format!("{}\n", "x".repeat(199));
        let lines = 3 * MAX_PENDING_BYTES / line.len();
        let since = Instant::now();
        for i in 0..lines {
            // Warnings too: each wakes the flushing thread, which is stuck in a write.
            batched.take(line.as_bytes(), i % 10 == 0);
        }
        let took = since.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{lines} lines took {took:?} with stdout blocked"
        );
        // The first batch is stuck in the write, the buffer holds what fits, the rest is
        // dropped and counted.
        let kept = MAX_PENDING_BYTES / line.len();
        let dropped_lines = dropped.get() as usize;
        assert!(
            dropped_lines >= lines - 2 * kept && dropped_lines < lines,
            "{dropped_lines} of {lines} lines dropped"
        );
        // Once stdout takes lines again, the flush waits for them, and not forever.
        drop(release);
        batched.flush_within(Duration::from_secs(5));
        assert!(batched.lock().is_empty());
    }

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

    /// What `emit` logs, as JSON lines.
    fn one_line(emit: impl FnOnce()) -> String {
        let sink = Counting::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().expect("lock").0.clone();
        String::from_utf8(bytes).expect("UTF-8")
    }

    #[test]
    fn an_event_is_one_json_object_with_its_fields() {
        let text = one_line(|| {
            let error = std::io::Error::other("broken \"pipe\"");
            tracing::info!(
                target: "http",
                method = "GET",
                status = 200_u16,
                latency_ms = 1.5,
                slow = false,
                delta = -3_i64,
                error = &error as &dyn std::error::Error,
                shown = %"a\nb",
                "request"
            );
        });
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text:?}"
        );
        let line: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "http");
        assert_eq!(line["message"], "request");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["status"], 200);
        assert_eq!(line["latency_ms"], 1.5);
        assert_eq!(line["slow"], false);
        assert_eq!(line["delta"], -3);
        assert_eq!(line["error"], "broken \"pipe\"");
        assert_eq!(line["shown"], "a\nb");
        let timestamp = line["timestamp"].as_str().expect("timestamp");
        assert_eq!(
            timestamp.len(),
            "2026-11-27T08:15:02.123456Z".len(),
            "{timestamp}"
        );
        assert!(timestamp.ends_with('Z'), "{timestamp}");
    }
}
