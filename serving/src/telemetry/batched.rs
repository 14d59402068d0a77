//! The batched stdout: log lines collect in a bounded buffer that the `log-flush` thread writes
//! out, so that a thread that logs never writes.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::fmt::MakeWriter;

use super::request::{self, RequestLine};

/// The longest an info or debug line waits in the buffer before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// A buffer that holds this many bytes is written out at once.
const FLUSH_BYTES: usize = 64 * 1024;

/// What a request line held as values counts for in the buffer's bounds: about its length
/// once written with the longest request id (128 bytes); most are shorter.
const REQUEST_LINE_BYTES: usize = 384;

/// The most bytes the buffer holds while stdout does not take them: four full batches, about
/// a thousand request lines. Beyond it lines are dropped and counted, never waited for.
pub const MAX_PENDING_BYTES: usize = 4 * FLUSH_BYTES;

static STDOUT: OnceLock<Batched> = OnceLock::new();

/// `log_lines_dropped_total`.
pub(super) static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Hands a request line, as values, to the batched stdout, which writes it out in its place
/// among the other lines ([`request`]).
pub(super) fn take_request(line: RequestLine) {
    Batched::stdout().take_request(line);
}

/// Writes out what the batched stdout still holds, waiting at most `limit` for stdout.
pub(super) fn flush_stdout(limit: Duration) {
    if let Some(batched) = STDOUT.get() {
        batched.flush_within(limit);
    }
}

/// For the panic hook: has the batched stdout written out, waiting at most `limit`, without
/// waiting for a lock or writing on this thread.
pub(super) fn flush_stdout_after_panic(limit: Duration) {
    if let Some(batched) = STDOUT.get() {
        batched.flush_after_panic(limit);
    }
}

/// Log output written in batches, by one thread of its own. One `write(2)` per log line was a
/// third of Klaus's system calls and nine in ten of Petra's under load (strace), so lines
/// collect in a buffer that the `log-flush` thread writes out [`FLUSH_INTERVAL`] after the
/// first of them arrived, or at once when a warning or an error arrives or the buffer reaches
/// [`FLUSH_BYTES`], after what was buffered so that order is kept. A thread that logs only
/// appends to the buffer: it never writes, so a stdout that blocks (a log driver pushing back,
/// a full pipe nobody reads) never stops serving. While stdout does not take the lines the
/// buffer fills up to [`MAX_PENDING_BYTES`], and further lines are dropped and counted in
/// `log_lines_dropped_total`. [`super::flush`] runs before the process exits, and a panic
/// writes the buffer out before it aborts. What a SIGKILL can lose is at most the last 50 ms
/// of info lines, as with nginx's `access_log buffer= flush=`. While no line arrives the
/// thread sleeps on a condvar. Request lines can come as values rather than text
/// ([`take_request`]): the flushing thread writes them out, in their place among the others,
/// when it writes the batch.
///
/// tracing-appender's `non_blocking` writer was the other candidate: it also hands lines to a
/// thread and can drop them (lossy mode), but it sends every line as a message of its own and
/// writes each with a `write(2)` of its own. In an A/B of the two (BENCHMARKS.md, "Log
/// writer") the services' CPU per request did not differ; this writer stays for its buffer
/// bounded in bytes, its dropped-lines counter, warnings written at once and the panic flush.
struct Batched {
    /// Lines not yet written. Lock order: `lines`, then `out`.
    lines: Mutex<Pending>,
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

/// Lines not yet written: text, and request lines as values, each to go out where it came.
#[derive(Debug, Default)]
struct Pending {
    text: Vec<u8>,
    /// Request lines, each with the length `text` had when it came.
    requests: Vec<(usize, RequestLine)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.text.is_empty() && self.requests.is_empty()
    }

    /// The bytes it holds, a request line counted as [`REQUEST_LINE_BYTES`].
    fn size(&self) -> usize {
        self.text.len() + self.requests.len() * REQUEST_LINE_BYTES
    }

    fn clear(&mut self) {
        self.text.clear();
        self.requests.clear();
    }

    /// The lines in the order they came, request lines written out, appended to `out`.
    fn render(&self, out: &mut Vec<u8>) {
        let mut from = 0;
        for (at, line) in &self.requests {
            out.extend_from_slice(&self.text[from..*at]);
            from = *at;
            // Cannot fail: the writer only appends.
            let _ = request::write_json(&mut Appender(out), line);
        }
        out.extend_from_slice(&self.text[from..]);
    }
}

/// Appends formatted text to a byte buffer.
struct Appender<'a>(&'a mut Vec<u8>);

impl fmt::Write for Appender<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The sink, a spare buffer that the pending lines are swapped into for writing, and the
/// bytes of a batch with request lines written out.
struct Output {
    sink: Box<dyn io::Write + Send>,
    batch: Pending,
    bytes: Vec<u8>,
}

impl Output {
    /// Swaps the pending lines out, releases `lines`' lock (after this one was taken, so
    /// batches go out in order) and writes them.
    fn write(&mut self, mut pending: MutexGuard<'_, Pending>) {
        if pending.is_empty() {
            return;
        }
        std::mem::swap(&mut *pending, &mut self.batch);
        drop(pending);
        let bytes = if self.batch.requests.is_empty() {
            &self.batch.text
        } else {
            self.batch.render(&mut self.bytes);
            &self.bytes
        };
        // A closed or broken stdout must not take the service down; the lines are dropped.
        let _ = self.sink.write_all(bytes).and_then(|()| self.sink.flush());
        self.batch.clear();
        self.bytes.clear();
    }
}

impl Batched {
    fn new(sink: Box<dyn io::Write + Send>, dropped: Counter) -> Self {
        Self {
            lines: Mutex::new(Pending::default()),
            arrived: Condvar::new(),
            urgent: AtomicBool::new(false),
            out: Mutex::new(Output {
                sink,
                batch: Pending::default(),
                bytes: Vec::new(),
            }),
            flusher: AtomicBool::new(false),
            dropped,
        }
    }

    /// Writes out what `pending` holds, on this thread.
    fn write_out(&self, pending: MutexGuard<'_, Pending>) {
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

    fn lock(&self) -> MutexGuard<'_, Pending> {
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
            pending.text.extend_from_slice(line);
            self.write_out(pending);
            return;
        }
        if pending.size() + line.len() > MAX_PENDING_BYTES {
            drop(pending);
            let lines = line.iter().filter(|&&b| b == b'\n').count().max(1);
            self.dropped.inc_by(lines as u64);
            return;
        }
        let was_empty = pending.is_empty();
        pending.text.extend_from_slice(line);
        self.arrived(&pending, was_empty, urgent);
    }

    /// Takes a request line as values, as [`Batched::take`] takes an info line.
    fn take_request(&self, line: RequestLine) {
        let mut pending = self.lock();
        if !self.flusher.load(Ordering::Acquire) {
            let at = pending.text.len();
            pending.requests.push((at, line));
            self.write_out(pending);
            return;
        }
        if pending.size() + REQUEST_LINE_BYTES > MAX_PENDING_BYTES {
            drop(pending);
            self.dropped.inc();
            return;
        }
        let was_empty = pending.is_empty();
        let at = pending.text.len();
        pending.requests.push((at, line));
        self.arrived(&pending, was_empty, false);
    }

    /// Wakes the flushing thread for what just arrived in `pending`: at once for an urgent
    /// line or a full batch, to start its flush interval for a first line.
    fn arrived(&self, pending: &Pending, was_empty: bool, urgent: bool) {
        if urgent || pending.size() >= FLUSH_BYTES {
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

#[cfg(test)]
mod tests {
    use std::io;
    use std::time::{Duration, Instant};

    use prometheus_client::metrics::counter::Counter;

    use super::super::sink::Counting;
    use super::{Batched, FLUSH_INTERVAL, MAX_PENDING_BYTES, REQUEST_LINE_BYTES, RequestLine};

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

    #[test]
    fn request_lines_taken_as_values_go_out_in_their_place_among_the_others() {
        let sink = Counting::default();
        let batched: &'static Batched = Box::leak(Box::new(Batched::new(
            Box::new(sink.clone()),
            Counter::default(),
        )));
        batched.start_flusher();
        batched.take(b"first\n", false);
        batched.take_request(RequestLine::for_tests("one"));
        batched.take_request(RequestLine::for_tests("two"));
        batched.take(b"between\n", false);
        batched.take_request(RequestLine::for_tests("three"));
        batched.take(b"last\n", true);
        wait_for_lines(&sink, 6);
        let text = String::from_utf8(sink.0.lock().expect("lock").0.clone()).expect("UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        let id = |line: &str| {
            let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            line["request_id"]
                .as_str()
                .expect("a request id")
                .to_owned()
        };
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!((lines[0], lines[3], lines[5]), ("first", "between", "last"));
        assert_eq!(
            [id(lines[1]), id(lines[2]), id(lines[4])],
            ["one", "two", "three"]
        );
    }

    #[test]
    fn request_lines_count_against_the_bound_and_are_dropped_beyond_it() {
        let (batched, release, dropped) = blocked();
        // The first line goes into the write that blocks; the next fill the buffer.
        batched.take(b"stuck\n", true);
        while !batched.lock().is_empty() {
            std::thread::yield_now();
        }
        let lines = 2 * MAX_PENDING_BYTES / REQUEST_LINE_BYTES;
        for _ in 0..lines {
            batched.take_request(RequestLine::for_tests("x"));
        }
        assert_eq!(
            batched.lock().requests.len(),
            MAX_PENDING_BYTES / REQUEST_LINE_BYTES
        );
        assert_eq!(
            dropped.get() as usize,
            lines - MAX_PENDING_BYTES / REQUEST_LINE_BYTES
        );
        drop(release);
        batched.flush_within(Duration::from_secs(5));
        assert!(batched.lock().is_empty());
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

    /// A batched stdout whose writes block until the sender is dropped, and its dropped-lines
    /// counter.
    fn blocked() -> (&'static Batched, std::sync::mpsc::Sender<()>, Counter) {
        let (release, blocked) = std::sync::mpsc::channel();
        let dropped = Counter::default();
        let batched: &'static Batched = Box::leak(Box::new(Batched::new(
            Box::new(Blocked(blocked)),
            dropped.clone(),
        )));
        batched.start_flusher();
        (batched, release, dropped)
    }

    #[test]
    fn a_blocked_stdout_drops_and_counts_lines_instead_of_blocking() {
        let (batched, release, dropped) = blocked();
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
}
