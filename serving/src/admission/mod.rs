//! Admission control: how many requests the main listener works on at once, and what happens
//! to the rest.
//!
//! A fixed limit is right for one latency and wrong for every other (Little's law: requests in
//! flight = rate × latency): a Klaus whose Petra is 50 ms away needs fifty times the requests in
//! flight of one whose Petra is next door, for the same rate and the same CPU. So the limit
//! follows a measure of overload that distance does not change: the service's own queueing
//! delay, the time a task that is ready to run waits for the runtime's thread (the signal
//! Breakwater uses). A probe measures it every [`PROBE_EVERY`]; every [`WINDOW`] the limit
//!
//! - shrinks by a tenth when the delay exceeds [`QUEUEING_TARGET`] while the serving threads
//!   were on a CPU or waiting for one at least 90 % of the window (saturated: more requests in
//!   flight only make each one slower; the waiting counts because on shared cores the threads
//!   get less CPU than they ask for, and more requests in flight would not get them more), and
//! - grows by a fifth when requests had to wait for the limit and it is not saturated (the
//!   requests in flight are waiting on something else, such as a distant Petra),
//!
//! between a floor and `MAX_CONCURRENT_REQUESTS`, which bounds memory. A request over the limit
//! waits, first come first served, for at most `REQUEST_QUEUE_TIMEOUT_MS`; a waiting request
//! costs no CPU, where refusing it would cost an answer and, from a client that ignores
//! `Retry-After`, another request at once. It is refused (503, `Retry-After`, and on HTTP/1.1
//! `Connection: close`) only when its wait runs out or the queue is full; while the queue is
//! full the listener stops accepting connections, so that TCP pushes back on new clients.
//!
//! Before a request is even read, an HTTP/1.1 connection asks [`Admission::may_read`]: while
//! the limit is reached, its next request stays unread in the kernel (the server's read gate),
//! where it costs nothing, instead of being parsed into a queued request whose memory and
//! connection state are touched twice. The gate holds a connection for at most `max_wait` and
//! lets the oldest through first as room frees.

mod demand;
mod limit;

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use limit::QUEUEING_TARGET;

use limit::{Window, next_limit};

/// How often the probe measures the queueing delay.
pub const PROBE_EVERY: Duration = Duration::from_millis(10);

/// How often the limit is adjusted.
pub const WINDOW: Duration = Duration::from_millis(100);

/// The settings of a listener's admission control.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The most requests worked on at once, whatever the adaptation says (memory bound).
    pub ceiling: usize,
    /// The limit before the first adjustment.
    pub initial: usize,
    /// How long a request over the limit may wait for room; zero refuses it at once.
    pub max_wait: Duration,
    /// How many requests may wait at once; beyond, they are refused and no connection is
    /// accepted.
    pub max_queued: usize,
    /// Whether the limit adapts to the queueing delay; `false` keeps it at the ceiling.
    pub adaptive: bool,
}

impl Settings {
    /// Adaptive settings below `ceiling`, with waits of at most `max_wait`.
    pub fn adaptive(ceiling: usize, max_wait: Duration) -> Self {
        let ceiling = ceiling.max(1);
        Self {
            ceiling,
            initial: ceiling.min(256),
            max_wait,
            max_queued: ceiling.saturating_mul(2),
            adaptive: true,
        }
    }

    /// A fixed limit of `limit`, refusing at once above it.
    pub fn fixed(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            ceiling: limit,
            initial: limit,
            max_wait: Duration::ZERO,
            max_queued: 0,
            adaptive: false,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ShedLabels {
    /// `queue_full`, `queue_timeout`, or `over_limit` (no waiting allowed).
    pub reason: &'static str,
}

/// A refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The limit was reached and waiting is off.
    OverLimit,
    /// The queue was full.
    QueueFull,
    /// The request waited [`Settings::max_wait`] without room.
    QueueTimeout,
}

impl Shed {
    fn reason(self) -> &'static str {
        match self {
            Self::OverLimit => "over_limit",
            Self::QueueFull => "queue_full",
            Self::QueueTimeout => "queue_timeout",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    limit: Gauge,
    in_flight: Gauge,
    queued: Gauge,
    queueing_delay: Gauge<f64, std::sync::atomic::AtomicU64>,
    shed: Family<ShedLabels, Counter>,
    accept_pauses: Counter,
    reads_paused: Gauge,
}

/// The admission control of one listener, shared by its requests and its accept loop.
#[derive(Debug)]
pub struct Admission {
    settings: Settings,
    state: Mutex<State>,
    /// Wakes waiting requests, oldest first, when room frees up.
    room: Notify,
    /// Wakes a paused accept loop when the queue has room again.
    accept: Notify,
    /// Wakes connections whose next request is left unread, oldest first, when room frees up
    /// and no read request waits for it.
    readers: Arc<Notify>,
    metrics: Metrics,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    queued: usize,
    /// Connections the read gate holds back.
    held: usize,
    /// Whether a request waited (in the queue or behind the read gate) or was refused since the
    /// last adjustment.
    limited: bool,
    /// The queueing delays the probe measured since the last adjustment.
    delay_sum: Duration,
    delay_samples: u32,
    adjusted: Instant,
    /// The process's CPU demand ([`demand::cpu_demand`]) at the last adjustment.
    demand_at_adjustment: Duration,
}

impl Admission {
    /// Admission control with `settings`, its metrics in `registry`.
    pub fn new(settings: Settings, registry: &mut Registry) -> Arc<Self> {
        let metrics = Metrics::default();
        // Every reason is exported from the start, at 0, so that a rate over it has data before
        // the first request is shed (dashboards and alerts see 0, not "no data").
        for shed in [Shed::OverLimit, Shed::QueueFull, Shed::QueueTimeout] {
            let _ = metrics.shed.get_or_create(&ShedLabels {
                reason: shed.reason(),
            });
        }
        registry.register(
            "concurrency_limit",
            "Requests the main listener works on at once now (adapted to the queueing delay, below MAX_CONCURRENT_REQUESTS)",
            metrics.limit.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests the main listener is working on",
            metrics.in_flight.clone(),
        );
        registry.register(
            "requests_queued",
            "Requests waiting for room under the concurrency limit",
            metrics.queued.clone(),
        );
        registry.register(
            "runtime_queueing_delay_seconds",
            "How long a ready task waited for the runtime, averaged over the last adjustment window",
            metrics.queueing_delay.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests refused with 503, by reason",
            metrics.shed.clone(),
        );
        registry.register(
            "connections_read_paused",
            "Plain HTTP/1.1 connections whose next request is left unread in the kernel until the concurrency limit has room",
            metrics.reads_paused.clone(),
        );
        registry.register(
            "accept_pauses",
            "Times the main listener stopped accepting connections because the queue was full",
            metrics.accept_pauses.clone(),
        );
        let initial = settings.initial.clamp(1, settings.ceiling);
        metrics
            .limit
            .set(i64::try_from(initial).unwrap_or(i64::MAX));
        Arc::new(Self {
            settings,
            state: Mutex::new(State {
                limit: initial,
                in_flight: 0,
                queued: 0,
                held: 0,
                limited: false,
                delay_sum: Duration::ZERO,
                delay_samples: 0,
                adjusted: Instant::now(),
                demand_at_adjustment: demand::cpu_demand(),
            }),
            room: Notify::new(),
            accept: Notify::new(),
            readers: Arc::new(Notify::new()),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Whether a connection may read its next request now: waiting is allowed (a fixed limit
    /// refuses instead), nothing waits in the queue or behind the read gate (the oldest go
    /// first) and the limit has room.
    pub fn may_read(&self) -> bool {
        if self.settings.max_wait.is_zero() {
            return true;
        }
        let state = self.lock();
        state.queued == 0 && state.held == 0 && state.in_flight < state.limit
    }

    /// What wakes a connection that [`Self::may_read`] held back, and the longest it is held.
    pub fn read_gate(&self) -> (Arc<Notify>, Duration) {
        (Arc::clone(&self.readers), self.settings.max_wait)
    }

    /// Counts a connection held back by the read gate, until the returned guard is dropped.
    pub fn read_paused(self: &Arc<Self>) -> ReadPaused {
        let mut state = self.lock();
        state.held += 1;
        // A request held back met the limit, as one that waits in the queue does: the limit
        // may grow (over a distant link the requests in flight are waiting, not working).
        state.limited = true;
        drop(state);
        self.metrics.reads_paused.inc();
        ReadPaused(Arc::clone(self))
    }

    /// Hands room the limit has to whoever waits for it: the oldest queued request, else the
    /// oldest connection the read gate holds. Called wherever room may have appeared.
    fn hand_on(&self, state: &State) {
        if state.in_flight >= state.limit {
            return;
        }
        if state.queued > 0 {
            self.room.notify_one();
        } else if state.held > 0 {
            self.readers.notify_one();
        }
    }

    /// Passes on room that a connection let through the read gate did not take (its client
    /// had gone).
    pub fn read_unused(&self) {
        let state = self.lock();
        self.hand_on(&state);
    }

    /// Room for one request: at once when there is room and nobody is waiting, else after a
    /// wait of at most [`Settings::max_wait`].
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, Shed> {
        match self.try_acquire() {
            Ok(permit) => Ok(permit),
            Err(None) => Box::pin(self.wait()).await,
            Err(Some(shed)) => Err(shed),
        }
    }

    /// Room for one request at once; `Err(None)` when it must wait (it is counted as queued
    /// then, and must call [`Self::wait`]), `Err(Some(_))` when it is refused.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, Option<Shed>> {
        let mut state = self.lock();
        if state.queued == 0 && state.in_flight < state.limit {
            return Ok(self.admit(&mut state));
        }
        state.limited = true;
        if self.settings.max_wait.is_zero() {
            return Err(Some(self.refuse(Shed::OverLimit)));
        }
        if state.queued >= self.settings.max_queued {
            return Err(Some(self.refuse(Shed::QueueFull)));
        }
        state.queued += 1;
        self.metrics.queued.inc();
        Err(None)
    }

    /// The wait of a request that [`Self::try_acquire`] queued. Kept out of the request's
    /// future (callers box it), so that the common case, room at once, costs no timer and no
    /// larger future.
    pub async fn wait(self: &Arc<Self>) -> Result<Permit, Shed> {
        // Leaves the queue however the wait ends, a client that went away included.
        let mut queued = Queued(self, true);
        let deadline = tokio::time::sleep(self.settings.max_wait);
        tokio::pin!(deadline);
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.in_flight < state.limit {
                    queued.leave(&mut state);
                    let permit = self.admit(&mut state);
                    // Two releases may have come before this request ran: the second's room
                    // goes on.
                    self.hand_on(&state);
                    return Ok(permit);
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = &mut deadline => {
                    let mut state = self.lock();
                    queued.leave(&mut state);
                    // Room that freed up as this wait ended goes to the next in line.
                    self.hand_on(&state);
                    return Err(self.refuse(Shed::QueueTimeout));
                }
            }
        }
    }

    fn admit(self: &Arc<Self>, state: &mut State) -> Permit {
        state.in_flight += 1;
        self.metrics.in_flight.inc();
        Permit(Arc::clone(self))
    }

    fn leave_queue(&self, state: &mut State) {
        state.queued -= 1;
        self.metrics.queued.dec();
        if state.queued + 1 == self.settings.max_queued {
            self.accept.notify_waiters();
        }
    }

    fn refuse(&self, shed: Shed) -> Shed {
        self.metrics
            .shed
            .get_or_create(&ShedLabels {
                reason: shed.reason(),
            })
            .inc();
        shed
    }

    fn release(&self) {
        let mut state = self.lock();
        state.in_flight -= 1;
        self.metrics.in_flight.dec();
        self.hand_on(&state);
    }

    /// Waits until the queue has room for more requests, so that the accept loop stops
    /// accepting connections while it is full. Returns at once when it has room.
    pub async fn room_to_accept(&self) {
        if self.settings.max_queued == 0 {
            return;
        }
        let mut paused = false;
        loop {
            let notified = self.accept.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().queued < self.settings.max_queued {
                return;
            }
            if !paused {
                paused = true;
                self.metrics.accept_pauses.inc();
                tracing::warn!(
                    queued = self.settings.max_queued,
                    "request queue full: not accepting connections until it has room"
                );
            }
            notified.await;
        }
    }

    /// Measures the runtime's queueing delay and adjusts the limit, until `stop`. Does nothing
    /// for a fixed limit.
    pub fn spawn_adaptation(self: &Arc<Self>, stop: CancellationToken) {
        if !self.settings.adaptive {
            return;
        }
        let this = Arc::clone(self);
        let workers = tokio::runtime::Handle::current()
            .metrics()
            .num_workers()
            .max(1);
        tokio::spawn(async move {
            let mut probe = tokio::time::interval(PROBE_EVERY);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = probe.tick() => {}
                }
                // A yield puts this task behind every task that is ready to run: the time it
                // takes to come back is what a woken request waits for the thread.
                let yielded = Instant::now();
                tokio::task::yield_now().await;
                this.observe_delay(
                    yielded.elapsed(),
                    Instant::now(),
                    demand::cpu_demand,
                    workers,
                );
            }
        });
    }

    fn observe_delay(
        &self,
        delay: Duration,
        now: Instant,
        demand: impl FnOnce() -> Duration,
        workers: usize,
    ) {
        let mut state = self.lock();
        state.delay_sum += delay;
        state.delay_samples += 1;
        let wall = now.duration_since(state.adjusted);
        if wall < WINDOW {
            return;
        }
        // Read once a window, not at every probe: it reads a file per thread.
        let demand = demand();
        let mean = state.delay_sum / state.delay_samples.max(1);
        let busy = demand
            .saturating_sub(state.demand_at_adjustment)
            .as_secs_f64()
            / (wall.as_secs_f64() * workers as f64);
        let before = state.limit;
        state.limit = next_limit(
            before,
            Window {
                delay: mean,
                busy,
                limited: state.limited || state.in_flight >= before,
            },
            self.settings.ceiling,
        );
        state.delay_sum = Duration::ZERO;
        state.delay_samples = 0;
        state.limited = false;
        state.adjusted = now;
        state.demand_at_adjustment = demand;
        self.metrics
            .limit
            .set(i64::try_from(state.limit).unwrap_or(i64::MAX));
        self.metrics.queueing_delay.set(mean.as_secs_f64());
        // Room the larger limit makes goes to the requests waiting for it.
        let grown = state.limit.saturating_sub(before);
        for _ in 0..grown.min(state.queued) {
            self.room.notify_one();
        }
        for _ in 0..grown.saturating_sub(state.queued).min(state.held) {
            self.readers.notify_one();
        }
    }
}

/// The CPU time of the process so far (all its threads).
pub(crate) fn process_cpu() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// A request in the queue; leaves it when dropped, if it has not left yet.
struct Queued<'a>(&'a Arc<Admission>, bool);

impl Queued<'_> {
    fn leave(&mut self, state: &mut State) {
        if std::mem::take(&mut self.1) {
            self.0.leave_queue(state);
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.1 {
            let admission = self.0;
            let mut state = admission.lock();
            self.leave(&mut state);
            // A wake-up this request took goes to the next in line.
            admission.hand_on(&state);
        }
    }
}

/// A connection held back by the read gate; counted in `held` and `connections_read_paused`
/// while alive.
#[derive(Debug)]
pub struct ReadPaused(Arc<Admission>);

impl Drop for ReadPaused {
    fn drop(&mut self) {
        self.0.lock().held -= 1;
        self.0.metrics.reads_paused.dec();
    }
}

tokio::task_local! {
    /// When the request a connection is about to read arrived, where the read gate held it
    /// unread: the request's latency counts from then, so that the time it waited in the kernel
    /// is in the latency histogram, the log line and the latency alerts, as a wait in the queue
    /// is.
    static ARRIVED: Cell<Option<Instant>>;
}

/// Runs a connection whose read gate may record arrivals (an HTTP/1.1 connection polls its
/// requests' futures in its own task, where [`take_arrival`] finds them).
pub async fn with_arrivals<F: std::future::Future>(connection: F) -> F::Output {
    ARRIVED.scope(Cell::new(None), connection).await
}

/// Records that the request about to be read arrived at `at` (the read gate held it since).
pub fn note_arrival(at: Instant) {
    let _ = ARRIVED.try_with(|arrived| arrived.set(Some(at)));
}

/// When the request being served arrived, if the read gate held it; once per request.
pub fn take_arrival() -> Option<Instant> {
    ARRIVED.try_with(Cell::take).ok().flatten()
}

/// Room for one request, given back when dropped.
#[derive(Debug)]
pub struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests;
