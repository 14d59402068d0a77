//! One Petra endpoint (an address of a URL's host): its connections, the calls it has in
//! flight, and its outlier state — consecutive failures eject it for a time that grows while it
//! keeps failing, as Envoy's outlier detection does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::config::Target;
use super::discover::Resolve;
use super::metrics::{AttemptLabel, EndpointLabel, OUTCOMES, PetraMetrics};
use super::solo::{Lease, Solo};
use super::tls::{ClientTls, Profile};
use super::transport::{self, Dial, HttpClient};

/// The outlier detection settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutlierSettings {
    /// Consecutive failures that eject an endpoint.
    pub(crate) eject_after: u32,
    /// The first ejection's length; each further one without a success between doubles it.
    pub(crate) base: Duration,
}

impl OutlierSettings {
    /// An ejection lasts at most this many times the first one.
    const MAX_FACTOR: u32 = 32;

    /// How long the `nth` consecutive ejection (0 first) lasts.
    fn ejection(&self, nth: u32) -> Duration {
        self.base * (1u32 << nth.min(Self::MAX_FACTOR.trailing_zeros()))
    }
}

/// What every endpoint's connections share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connection<'a> {
    pub(crate) tls: &'a Arc<ClientTls>,
    pub(crate) resolver: &'a Arc<dyn Resolve>,
    pub(crate) timeout: Duration,
}

/// An endpoint: one address of one of PETRA_URL's URLs.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Where it is.
    pub(crate) addr: SocketAddr,
    /// Its URL.
    pub(crate) target: Arc<Target>,
    /// The pooled client's connections: one HTTP/2 connection each, more opened as the open
    /// ones fill up.
    pooled: Lanes,
    /// The HTTP/1.1 connection for calls that come one at a time.
    solo: Solo,
    fresh: HttpClient,
    in_flight: AtomicUsize,
    outlier: Outlier,
    label: EndpointLabel,
    /// Its series of `petra_attempts_total`, one per outcome in [`OUTCOMES`]'s order, and of
    /// `petra_ejections_total`, looked up once: counting costs no lookup, and a call that ends
    /// after the endpoint was dropped cannot bring its series back.
    attempts: [Counter; OUTCOMES.len()],
    ejections: Counter,
}

impl Endpoint {
    pub(crate) fn new(
        target: Arc<Target>,
        addr: SocketAddr,
        connection: Connection<'_>,
        settings: OutlierSettings,
        metrics: &PetraMetrics,
    ) -> Self {
        let dial = Dial {
            ip: addr.ip(),
            host: target.host.clone(),
            server_name: target.server_name.clone(),
            resolver: Arc::clone(connection.resolver),
            tls: Arc::clone(connection.tls),
            connect_timeout: connection.timeout,
        };
        let client = |profile| transport::client(dial.clone(), profile, None);
        let label = EndpointLabel {
            priority: target.priority.to_string(),
            endpoint: addr.to_string(),
        };
        let attempts = OUTCOMES.map(|outcome| {
            metrics
                .attempts
                .get_or_create(&attempt(&label, outcome))
                .clone()
        });
        let ejections = metrics.ejections.get_or_create(&label).clone();
        Self {
            addr,
            pooled: Lanes::new(dial.clone()),
            solo: Solo::new(dial.clone(), target.uri.clone()),
            fresh: client(Profile::Fresh),
            target,
            in_flight: AtomicUsize::new(0),
            outlier: Outlier::new(settings),
            label,
            attempts,
            ejections,
        }
    }

    /// Its URL's position in PETRA_URL.
    pub(crate) fn priority(&self) -> usize {
        self.target.priority
    }

    /// The pooled client's lane for one call.
    pub(crate) fn lane(&self) -> LaneCall {
        self.pooled.pick(self.addr)
    }

    /// The solo connection, for a call that is the only one in flight on this endpoint (it
    /// counts itself, [`Endpoint::start`]), when it is warm.
    pub(crate) fn solo(&self) -> Option<Lease> {
        if self.load() != 1 {
            self.solo.crowded();
            return None;
        }
        self.solo.take()
    }

    /// A call over the solo connection reached its deadline: [`Solo::pause`].
    pub(crate) fn solo_pause(&self) {
        self.solo.pause();
    }

    /// A request for the solo connection: [`Solo::request`].
    pub(crate) fn solo_request(&self) -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
        self.solo.request()
    }

    /// The client that opens a fresh connection for each call.
    pub(crate) fn fresh(&self) -> &HttpClient {
        &self.fresh
    }

    /// Calls in flight on this endpoint, the balancer's measure of its load.
    pub(crate) fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call in flight until the guard is dropped.
    pub(crate) fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    /// Whether the endpoint may take a call now: it is not ejected; or its ejection is over
    /// and it is on probation, taking one call at a time until one succeeds (so that a
    /// replica still down costs one call, not every call of its connect timeout).
    pub(crate) fn available(&self) -> bool {
        match self.outlier.state(Instant::now()) {
            State::Active => true,
            State::Ejected => false,
            State::Probation => self.load() == 0,
        }
    }

    /// Whether the endpoint's ejection is over and no call has succeeded since.
    pub(crate) fn on_probation(&self) -> bool {
        self.outlier.state(Instant::now()) == State::Probation
    }

    /// Whether the endpoint is ejected now.
    pub(crate) fn is_ejected(&self) -> bool {
        self.outlier.state(Instant::now()) == State::Ejected
    }

    /// Records a successful attempt; true when it ends the endpoint's probation.
    pub(crate) fn succeeded(&self) -> bool {
        self.attempts[0].inc();
        let back = self.outlier.succeeded();
        if back {
            tracing::info!(
                endpoint = %self.addr,
                url = %self.target.url,
                priority = self.priority(),
                "Petra endpoint back after ejection"
            );
        }
        back
    }

    /// Records a failed attempt with `outcome`; `counts` says whether it counts against the
    /// endpoint. Returns how long the endpoint was ejected for, if this failure ejected it.
    pub(crate) fn failed(&self, outcome: &'static str, counts: bool) -> Option<Duration> {
        if let Some(index) = OUTCOMES.iter().position(|&known| known == outcome) {
            self.attempts[index].inc();
        }
        if !counts {
            return None;
        }
        let ejected = self.outlier.failed(Instant::now())?;
        self.ejections.inc();
        tracing::warn!(
            endpoint = %self.addr,
            url = %self.target.url,
            priority = self.priority(),
            ejected_ms = ejected.as_millis() as u64,
            "ejected a Petra endpoint after consecutive failures"
        );
        Some(ejected)
    }

    /// Removes this endpoint's series from the metrics, once discovery has dropped it.
    pub(crate) fn forget(&self, metrics: &PetraMetrics) {
        for outcome in OUTCOMES {
            metrics.attempts.remove(&attempt(&self.label, outcome));
        }
        metrics.ejections.remove(&self.label);
    }
}

fn attempt(label: &EndpointLabel, outcome: &'static str) -> AttemptLabel {
    AttemptLabel {
        priority: label.priority.clone(),
        endpoint: label.endpoint.clone(),
        outcome,
    }
}

/// The calls one HTTP/2 connection carries before Klaus opens another to the same endpoint:
/// half of the 256 streams Petra allows a connection, so that a connection never makes calls
/// queue for a stream. Over a long link, calls in flight grow with the round trip (Little's
/// law), and one connection's streams would cap the rate at 256 per round trip.
pub(crate) const CALLS_PER_CONNECTION: usize = 128;

/// The most connections to one endpoint: with [`CALLS_PER_CONNECTION`], as many calls as
/// Klaus's default MAX_CONCURRENT_REQUESTS (2,048).
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// The pooled client's connections to one endpoint. Each lane is a client with a pool of its
/// own, so one HTTP/2 connection each; a call takes the lane with the fewest calls, and a new
/// lane opens when every open one carries [`CALLS_PER_CONNECTION`] (as Envoy's and gRPC's
/// HTTP/2 pools open connections when the streams of the open ones are in use). A lane left
/// idle keeps its client and loses its connection to the pool's idle timeout.
///
/// Until a lane's connection is up (its first, or a new one once the last has gone: closed at
/// its age, idled out, failed), the calls that pick it wait for the call that opens it: the
/// client learns from ALPN whether a connection multiplexes, so without the wait a burst on a
/// cold lane would open a connection per call (158 connections for 300 calls, seen in
/// `resilience::calls_beyond_one_connections_streams_open_more_connections...`; 19 for 19
/// after a connection's age, `resilience::a_burst_after_the_connection_reached_its_age...`).
#[derive(Debug)]
struct Lanes {
    dial: Dial,
    lanes: std::sync::Mutex<Vec<Arc<Lane>>>,
}

#[derive(Debug)]
struct Lane {
    client: HttpClient,
    calls: AtomicUsize,
    opening: Arc<Opening>,
}

/// Whether a lane's connection is up, and the calls waiting for it.
#[derive(Debug, Default)]
struct Opening {
    /// A connection of the lane has been up.
    warm: std::sync::atomic::AtomicBool,
    /// A call is opening the lane's connection.
    busy: std::sync::atomic::AtomicBool,
    /// Wakes the calls waiting for the opening call.
    opened: tokio::sync::Notify,
    /// The lane's connections that are up.
    live: AtomicUsize,
}

impl transport::Watch for Opening {
    fn connected(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
        if !self.warm.swap(true, Ordering::AcqRel) {
            self.opened.notify_waiters();
        }
    }

    /// The lane's last connection gone (closed by Petra at its age, idled out of the pool, or
    /// failed), the lane is cold again: the next call opens a connection and the calls with
    /// it wait for that one, instead of each opening its own (19 calls opened 19 connections
    /// after a connection's age ended, before this).
    fn closed(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.busy.store(false, Ordering::Release);
            self.warm.store(false, Ordering::Release);
            // A connection that came up between the count and the reset (on another worker
            // thread) found the lane still warm and woke nobody: the lane is warm after all.
            if self.live.load(Ordering::Acquire) > 0 {
                self.warm.store(true, Ordering::Release);
            }
            self.opened.notify_waiters();
        }
    }
}

impl Lane {
    fn new(dial: &Dial) -> Arc<Self> {
        let opening = Arc::new(Opening::default());
        let watch: transport::Watcher = Arc::clone(&opening) as _;
        Arc::new(Self {
            client: transport::client(dial.clone(), Profile::Pooled, Some(watch)),
            calls: AtomicUsize::new(0),
            opening,
        })
    }
}

impl Lanes {
    fn new(dial: Dial) -> Self {
        let first = Lane::new(&dial);
        Self {
            dial,
            lanes: std::sync::Mutex::new(vec![first]),
        }
    }

    fn pick(&self, addr: SocketAddr) -> LaneCall {
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = lanes.len();
        let least = lanes
            .iter()
            .min_by_key(|lane| lane.calls.load(Ordering::Relaxed))
            .filter(|lane| {
                lane.calls.load(Ordering::Relaxed) < CALLS_PER_CONNECTION
                    || count >= MAX_CONNECTIONS
            })
            .cloned();
        let lane = least.unwrap_or_else(|| {
            let lane = Lane::new(&self.dial);
            lanes.push(Arc::clone(&lane));
            tracing::info!(
                endpoint = %addr,
                connections = lanes.len(),
                "the streams of every connection to a Petra endpoint are busy: opening another"
            );
            lane
        });
        lane.calls.fetch_add(1, Ordering::Relaxed);
        let opening = &lane.opening;
        let opener =
            !opening.warm.load(Ordering::Acquire) && !opening.busy.swap(true, Ordering::AcqRel);
        LaneCall { lane, opener }
    }
}

/// A call on one lane of an endpoint, counted there until dropped.
#[derive(Debug)]
pub(crate) struct LaneCall {
    lane: Arc<Lane>,
    /// Whether this call opens the lane's connection.
    opener: bool,
}

impl LaneCall {
    /// Waits, when another call is opening the lane's connection, until it is up or the
    /// opening call has failed.
    pub(crate) async fn connection(&self) {
        let opening = &self.lane.opening;
        if self.opener || opening.warm.load(Ordering::Acquire) {
            return;
        }
        let opened = opening.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if opening.warm.load(Ordering::Acquire) || !opening.busy.load(Ordering::Acquire) {
            return;
        }
        opened.await;
    }

    /// The lane's client.
    pub(crate) fn client(&self) -> &HttpClient {
        &self.lane.client
    }
}

impl Drop for LaneCall {
    fn drop(&mut self) {
        self.lane.calls.fetch_sub(1, Ordering::Relaxed);
        let opening = &self.lane.opening;
        if self.opener && !opening.warm.load(Ordering::Acquire) {
            // The opening call failed: the waiting calls go on, and the next call opens.
            opening.busy.store(false, Ordering::Release);
            opening.opened.notify_waiters();
        }
    }
}

/// A call in flight on an endpoint.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an endpoint stands in outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Takes calls.
    Active,
    /// Takes none until its ejection ends.
    Ejected,
    /// Its ejection has ended and no call has succeeded since: one call at a time, and the
    /// first failure ejects it again.
    Probation,
}

/// Consecutive failures and ejection of one endpoint, in atomics only: the hot path (an
/// endpoint that is active) reads one of them, and so does a call during a failover, when
/// every call looks at the ejected endpoints.
#[derive(Debug)]
struct Outlier {
    settings: OutlierSettings,
    failures: AtomicU32,
    /// Ejections since the last success; not 0 means ejected or on probation.
    ejections: AtomicU32,
    /// When the ejection ends, in nanoseconds since [`Outlier::epoch`].
    until: AtomicU64,
    epoch: Instant,
}

impl Outlier {
    fn new(settings: OutlierSettings) -> Self {
        Self {
            settings,
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn state(&self, now: Instant) -> State {
        if self.ejections.load(Ordering::Acquire) == 0 {
            State::Active
        } else if self.nanos(now) < self.until.load(Ordering::Acquire) {
            State::Ejected
        } else {
            State::Probation
        }
    }

    /// Counts a success; true when it ends a probation (the endpoint is back).
    fn succeeded(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        self.ejections.load(Ordering::Relaxed) != 0 && self.ejections.swap(0, Ordering::AcqRel) != 0
    }

    /// Counts a failure; ejects the endpoint when it is the `eject_after`-th in a row, or the
    /// first on probation, and returns for how long.
    fn failed(&self, now: Instant) -> Option<Duration> {
        let state = self.state(now);
        if state == State::Ejected {
            // Calls that were in flight when it was ejected: already dealt with.
            return None;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if state == State::Active && failures < self.settings.eject_after {
            return None;
        }
        let nth = self.ejections.load(Ordering::Acquire);
        let length = self.settings.ejection(nth);
        let until = self.nanos(now + length);
        // One failure ejects; others at the same moment find it ejected.
        let current = self.until.load(Ordering::Acquire);
        if self.nanos(now) < current
            || self
                .until
                .compare_exchange(current, until, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        self.ejections
            .store(nth.saturating_add(1), Ordering::Release);
        self.failures.store(0, Ordering::Relaxed);
        Some(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier() -> Outlier {
        Outlier::new(OutlierSettings {
            eject_after: 3,
            base: Duration::from_secs(1),
        })
    }

    #[test]
    fn consecutive_failures_eject_then_probation_one_failure_ejects_for_twice_as_long() {
        let outlier = outlier();
        let t0 = Instant::now();
        assert_eq!(outlier.failed(t0), None);
        assert_eq!(outlier.failed(t0), None);
        assert_eq!(outlier.failed(t0), Some(Duration::from_secs(1)));
        assert_eq!(outlier.state(t0), State::Ejected);
        // Calls that were in flight fail too: no second ejection, nothing counted.
        for _ in 0..5 {
            assert_eq!(outlier.failed(t0), None);
        }
        // Over: on probation, where one failure ejects again, for twice as long, then four
        // times, up to 32 times.
        let mut now = t0 + Duration::from_secs(1);
        for expected in [2, 4, 8, 16, 32, 32] {
            assert_eq!(outlier.state(now), State::Probation);
            assert_eq!(outlier.failed(now), Some(Duration::from_secs(expected)));
            assert_eq!(outlier.state(now), State::Ejected);
            now += Duration::from_secs(expected);
        }
    }

    #[test]
    fn a_success_on_probation_brings_it_back_and_resets_the_growth() {
        let outlier = outlier();
        let t0 = Instant::now();
        outlier.failed(t0);
        outlier.failed(t0);
        assert!(!outlier.succeeded(), "not ejected: nothing to end");
        assert_eq!(outlier.failed(t0), None, "the count starts again");
        outlier.failed(t0);
        assert_eq!(outlier.failed(t0), Some(Duration::from_secs(1)));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(outlier.state(later), State::Probation);
        assert!(outlier.succeeded(), "back");
        assert_eq!(outlier.state(later), State::Active);
        assert_eq!(
            outlier.failed(later),
            None,
            "active again: three failures to eject"
        );
        assert_eq!(outlier.failed(later), None);
        assert_eq!(
            outlier.failed(later),
            Some(Duration::from_secs(1)),
            "growth reset"
        );
    }
}
