//! One Petra endpoint (an address of a URL's host): its connections, the calls it has in
//! flight, and its outlier state — consecutive failures eject it for a time that grows while it
//! keeps failing, as Envoy's outlier detection does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::config::Target;
use super::metrics::{AttemptLabel, EndpointLabel, OUTCOMES, PetraMetrics};
use super::tls::{ClientTls, Profile};
use super::transport::{self, HttpClient};

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

/// An endpoint: one address of one of PETRA_URL's URLs.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Where it is.
    pub(crate) addr: SocketAddr,
    /// Its URL.
    pub(crate) target: Arc<Target>,
    pooled: HttpClient,
    fresh: HttpClient,
    in_flight: AtomicUsize,
    outlier: Outlier,
    label: EndpointLabel,
    /// `petra_attempts_total{outcome="ok"}` of this endpoint, looked up once.
    ok: Counter,
}

impl Endpoint {
    pub(crate) fn new(
        target: Arc<Target>,
        addr: SocketAddr,
        tls: &Arc<ClientTls>,
        connect_timeout: Duration,
        settings: OutlierSettings,
        metrics: &PetraMetrics,
    ) -> Self {
        let client = |profile| {
            transport::client(
                addr.ip(),
                target.server_name.clone(),
                Arc::clone(tls),
                profile,
                connect_timeout,
            )
        };
        let label = EndpointLabel {
            priority: target.priority.to_string(),
            endpoint: addr.to_string(),
        };
        let ok = metrics
            .attempts
            .get_or_create(&attempt(&label, "ok"))
            .clone();
        Self {
            addr,
            pooled: client(Profile::Pooled),
            fresh: client(Profile::Fresh),
            target,
            in_flight: AtomicUsize::new(0),
            outlier: Outlier::new(settings),
            label,
            ok,
        }
    }

    /// Its URL's position in PETRA_URL.
    pub(crate) fn priority(&self) -> usize {
        self.target.priority
    }

    /// The client of `profile`.
    pub(crate) fn client(&self, profile: Profile) -> &HttpClient {
        match profile {
            Profile::Pooled => &self.pooled,
            Profile::Fresh => &self.fresh,
        }
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

    /// Whether the endpoint may take calls: not ejected, or its ejection is over (then it is
    /// back, and says so once).
    pub(crate) fn available(&self) -> bool {
        match self.outlier.available(Instant::now()) {
            Availability::Available => true,
            Availability::Ejected => false,
            Availability::Back => {
                tracing::info!(
                    endpoint = %self.addr,
                    url = %self.target.url,
                    priority = self.priority(),
                    "Petra endpoint back after ejection"
                );
                true
            }
        }
    }

    /// Whether the endpoint is ejected now, without changing anything.
    pub(crate) fn is_ejected(&self) -> bool {
        self.outlier.is_ejected(Instant::now())
    }

    /// Records a successful attempt.
    pub(crate) fn succeeded(&self) {
        self.ok.inc();
        self.outlier.succeeded();
    }

    /// Records a failed attempt with `outcome`; `counts` says whether it counts against the
    /// endpoint. Returns how long the endpoint was ejected for, if this failure ejected it.
    pub(crate) fn failed(
        &self,
        outcome: &'static str,
        counts: bool,
        metrics: &PetraMetrics,
    ) -> Option<Duration> {
        metrics
            .attempts
            .get_or_create(&attempt(&self.label, outcome))
            .inc();
        if !counts {
            return None;
        }
        let ejected = self.outlier.failed(Instant::now())?;
        metrics.ejections.get_or_create(&self.label).inc();
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

/// A call in flight on an endpoint.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an endpoint may take calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Availability {
    Available,
    Ejected,
    /// Its ejection has just ended.
    Back,
}

/// Consecutive failures and ejection of one endpoint. The hot path (an endpoint that is not
/// ejected and has not failed) reads two atomics and takes no lock.
#[derive(Debug)]
struct Outlier {
    settings: OutlierSettings,
    failures: AtomicU32,
    /// Ejections since the last success.
    ejections: AtomicU32,
    ejected: AtomicBool,
    state: Mutex<Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
}

impl Outlier {
    fn new(settings: OutlierSettings) -> Self {
        Self {
            settings,
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            state: Mutex::new(Ejection::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ejection> {
        // The state stays consistent whatever a panicking holder did: plain values only.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn available(&self, now: Instant) -> Availability {
        if !self.ejected.load(Ordering::Acquire) {
            return Availability::Available;
        }
        let mut state = self.lock();
        match state.until {
            Some(until) if now < until => Availability::Ejected,
            Some(_) => {
                state.until = None;
                self.ejected.store(false, Ordering::Release);
                Availability::Back
            }
            // Another call saw it back first.
            None => Availability::Available,
        }
    }

    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected.load(Ordering::Acquire) && self.lock().until.is_some_and(|until| now < until)
    }

    fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; ejects the endpoint when it is the `eject_after`-th in a row and
    /// returns for how long.
    fn failed(&self, now: Instant) -> Option<Duration> {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.settings.eject_after {
            return None;
        }
        let mut state = self.lock();
        if state.until.is_some_and(|until| now < until) {
            // Calls that were in flight when it was ejected.
            return None;
        }
        let nth = self.ejections.fetch_add(1, Ordering::Relaxed);
        let length = self.settings.ejection(nth);
        state.until = Some(now + length);
        self.failures.store(0, Ordering::Relaxed);
        self.ejected.store(true, Ordering::Release);
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
    fn consecutive_failures_eject_for_a_time_that_doubles_while_failing() {
        let outlier = outlier();
        let t0 = Instant::now();
        assert_eq!(outlier.failed(t0), None);
        assert_eq!(outlier.failed(t0), None);
        assert_eq!(outlier.failed(t0), Some(Duration::from_secs(1)));
        assert_eq!(outlier.available(t0), Availability::Ejected);
        // Calls that were in flight fail too: no second ejection.
        for _ in 0..5 {
            assert_eq!(outlier.failed(t0), None);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(outlier.available(t1), Availability::Back);
        assert_eq!(outlier.available(t1), Availability::Available);
        // Still failing: ejected again, for twice as long, then four times, up to 32 times.
        let mut now = t1;
        for expected in [2, 4, 8, 16, 32, 32] {
            let ejected = (0..3).find_map(|_| outlier.failed(now));
            assert_eq!(ejected, Some(Duration::from_secs(expected)));
            now += Duration::from_secs(expected);
            assert_eq!(outlier.available(now), Availability::Back);
        }
    }

    #[test]
    fn a_success_resets_the_count_and_the_growth() {
        let outlier = outlier();
        let t0 = Instant::now();
        outlier.failed(t0);
        outlier.failed(t0);
        outlier.succeeded();
        assert_eq!(outlier.failed(t0), None, "the count starts again");
        outlier.failed(t0);
        assert_eq!(outlier.failed(t0), Some(Duration::from_secs(1)));
        let back = t0 + Duration::from_secs(1);
        assert_eq!(outlier.available(back), Availability::Back);
        outlier.succeeded();
        let ejected = (0..3).find_map(|_| outlier.failed(back));
        assert_eq!(ejected, Some(Duration::from_secs(1)), "growth reset");
    }
}
