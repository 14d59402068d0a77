//! The endpoint set and the choice of an endpoint per attempt: among the endpoints of the best
//! priority that has one available, the less loaded of two picked at random (power of two
//! choices over calls in flight, as Linkerd's and Finagle's balancers do). When every endpoint
//! is ejected, they are all tried anyway rather than none (Envoy's panic mode).
//!
//! The set also runs discovery's loop ([`spawn_discovery`]): `discover` only turns a host name
//! into addresses and knows nothing of the set, so the modules depend one way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::config::Target;
use super::discover::{Resolution, Resolve};
use super::endpoint::{Connection, Endpoint, OutlierSettings};
use super::metrics::{PetraMetrics, StateLabel};
use super::tls::ClientTls;

/// What is known of one URL: its endpoints, and what its resolutions said.
#[derive(Debug, Clone, Default)]
struct Group {
    endpoints: Vec<Arc<Endpoint>>,
    /// Why the group has no endpoint, if it has none: the resolution's answer.
    problem: Option<String>,
    /// Whether the host has been resolved at least once.
    answered: bool,
    /// Whether the last answer was "no such name" while endpoints were kept.
    not_found: bool,
    /// Whether the last resolution failed (said once, not every round).
    failing: bool,
}

/// The endpoints of every URL, in priority order.
#[derive(Debug)]
struct Snapshot {
    groups: Vec<Group>,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoEndpoint {
    /// Discovery has not finished its first round.
    NotResolvedYet,
    /// Every URL's host was resolved and none gave an address: what each said.
    Unresolved(Vec<(String, String)>),
}

/// The endpoints Klaus calls, kept up to date by discovery.
#[derive(Debug)]
pub(crate) struct Endpoints {
    targets: Vec<Arc<Target>>,
    snapshot: ArcSwap<Snapshot>,
    /// True once every URL has been resolved once.
    resolved: watch::Sender<bool>,
    /// Asks discovery to resolve again now.
    resolve_now: Notify,
    /// Discovery's finished rounds, for a call that waits for a fresh one.
    rounds: watch::Sender<u64>,
    /// Whether some URL's host is a name (one of addresses only has nothing to look up).
    names: bool,
    /// The priority the last first attempt went to, -1 for none; changed under `changing`,
    /// so that the log, the gauge and the value agree.
    in_use: AtomicI64,
    changing: Mutex<()>,
    /// Whether every endpoint is ejected and calls go to them anyway.
    panicking: AtomicBool,
    tls: Arc<ClientTls>,
    resolver: Arc<dyn Resolve>,
    connect_timeout: Duration,
    outlier: OutlierSettings,
    metrics: PetraMetrics,
}

impl Endpoints {
    pub(crate) fn new(
        targets: Vec<Target>,
        tls: Arc<ClientTls>,
        resolver: Arc<dyn Resolve>,
        connect_timeout: Duration,
        outlier: OutlierSettings,
        metrics: PetraMetrics,
    ) -> Self {
        let groups = targets.iter().map(|_| Group::default()).collect();
        let names = targets
            .iter()
            .any(|target| target.host.parse::<std::net::IpAddr>().is_err());
        Self {
            targets: targets.into_iter().map(Arc::new).collect(),
            snapshot: ArcSwap::from_pointee(Snapshot { groups }),
            resolved: watch::Sender::new(false),
            resolve_now: Notify::new(),
            rounds: watch::Sender::new(0),
            names,
            in_use: AtomicI64::new(-1),
            changing: Mutex::new(()),
            panicking: AtomicBool::new(false),
            tls,
            resolver,
            connect_timeout,
            outlier,
            metrics,
        }
    }

    /// The resolver of the URLs' hosts.
    pub(crate) fn resolver(&self) -> &Arc<dyn Resolve> {
        &self.resolver
    }

    /// The URLs, in priority order.
    pub(crate) fn targets(&self) -> &[Arc<Target>] {
        &self.targets
    }

    /// Resolves when a failed attempt asks discovery to resolve again.
    pub(crate) async fn resolve_requested(&self) {
        self.resolve_now.notified().await;
    }

    /// Asks discovery to resolve every host again now: a failing endpoint may be a replica
    /// that is gone.
    pub(crate) fn request_resolve(&self) {
        self.resolve_now.notify_one();
    }

    /// Discovery has finished a round.
    pub(crate) fn round_done(&self) {
        self.rounds.send_modify(|round| *round += 1);
    }

    /// Asks for a round and waits up to `patience` for it to finish: a retry that found no
    /// other endpoint may find one the DNS gives now (a replica that has just started while
    /// the one tried goes away, faster than the resolve interval). Returns at once when every
    /// URL names an address.
    pub(crate) async fn fresh_round(&self, patience: Duration) {
        if !self.names {
            return;
        }
        let mut rounds = self.rounds.subscribe();
        rounds.borrow_and_update();
        self.request_resolve();
        let _ = tokio::time::timeout(patience, rounds.changed()).await;
    }

    /// Takes the answer for the URL at `index`: endpoints still named keep their connections
    /// and state, new addresses become endpoints, the others are dropped. "No such name"
    /// drops them only when it is said twice in a row (one odd answer must not empty a
    /// URL); a failed resolution keeps them.
    pub(crate) fn update(&self, index: usize, answer: Resolution) {
        let (Some(target), old) = (self.targets.get(index), self.snapshot.load_full()) else {
            return;
        };
        let before = &old.groups[index];
        let group = match answer {
            Resolution::Addresses(ips) => {
                let known: HashMap<SocketAddr, &Arc<Endpoint>> = before
                    .endpoints
                    .iter()
                    .map(|endpoint| (endpoint.addr, endpoint))
                    .collect();
                let endpoints = ips
                    .into_iter()
                    .map(|ip| {
                        let addr = SocketAddr::new(ip, target.port);
                        known.get(&addr).map_or_else(
                            || Arc::new(self.endpoint(target, addr)),
                            |e| Arc::clone(e),
                        )
                    })
                    .collect();
                Group {
                    endpoints,
                    answered: true,
                    ..Group::default()
                }
            }
            Resolution::NotFound if !before.endpoints.is_empty() && !before.not_found => Group {
                endpoints: before.endpoints.clone(),
                answered: true,
                not_found: true,
                ..Group::default()
            },
            Resolution::NotFound => Group {
                problem: Some("does not resolve".to_owned()),
                answered: true,
                ..Group::default()
            },
            Resolution::Failed(why) => {
                if !before.failing {
                    tracing::warn!(url = %target.url, error = %why, kept = before.endpoints.len(), "resolving Petra's host failed; keeping the endpoints known");
                }
                Group {
                    endpoints: before.endpoints.clone(),
                    problem: before
                        .endpoints
                        .is_empty()
                        .then(|| format!("does not resolve ({why})")),
                    answered: true,
                    failing: true,
                    not_found: before.not_found,
                }
            }
        };
        log_changes(target, before, &group, &self.metrics);
        let mut groups = old.groups.clone();
        groups[index] = group;
        let all_answered = groups.iter().all(|group| group.answered);
        self.snapshot.store(Arc::new(Snapshot { groups }));
        if all_answered {
            self.resolved
                .send_if_modified(|resolved| !std::mem::replace(resolved, true));
        }
        self.refresh_gauges();
    }

    fn endpoint(&self, target: &Arc<Target>, addr: SocketAddr) -> Endpoint {
        Endpoint::new(
            Arc::clone(target),
            addr,
            Connection {
                tls: &self.tls,
                resolver: &self.resolver,
                timeout: self.connect_timeout,
            },
            self.outlier,
            &self.metrics,
        )
    }

    /// Sets `petra_endpoints{priority, state}` from the endpoints known now.
    pub(crate) fn refresh_gauges(&self) {
        let snapshot = self.snapshot.load();
        for (priority, group) in snapshot.groups.iter().enumerate() {
            let ejected = group.endpoints.iter().filter(|e| e.is_ejected()).count();
            let gauge = |state| -> Gauge {
                self.metrics
                    .endpoints
                    .get_or_create(&StateLabel {
                        priority: priority.to_string(),
                        state,
                    })
                    .clone()
            };
            gauge("active").set((group.endpoints.len() - ejected) as i64);
            gauge("ejected").set(ejected as i64);
        }
    }

    /// The endpoint for a call's first attempt, waiting (until `deadline`) for discovery's
    /// first round if it has not finished.
    pub(crate) async fn first(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Endpoint>, NoEndpoint> {
        loop {
            // Read before picking: the snapshot is stored before the flag is set, so a round
            // that ends in between is seen by the pick.
            let mut resolved = self.resolved.subscribe();
            let done = *resolved.borrow_and_update();
            if let Some((endpoint, panic)) = self.pick(&[]) {
                // A probe of an endpoint on probation is not where calls go yet.
                if !endpoint.on_probation() {
                    self.note_pick(endpoint.priority(), panic);
                }
                return Ok(endpoint);
            }
            if done {
                self.note_none();
                // Petra may be back already: the next call should not wait for the interval.
                self.request_resolve();
                return Err(self.why_none());
            }
            match tokio::time::timeout_at(deadline, resolved.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(NoEndpoint::NotResolvedYet),
            }
        }
    }

    /// An endpoint for a retry: one not in `tried`, or `None`.
    pub(crate) fn other(&self, tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        self.pick(tried).map(|(endpoint, _)| endpoint)
    }

    /// Power of two choices among the available endpoints not in `tried` of the best priority
    /// that has any; when none is available anywhere, among all endpoints not in `tried`
    /// (`true`: panic mode).
    fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<(Arc<Endpoint>, bool)> {
        let snapshot = self.snapshot.load();
        let untried = |endpoint: &&Arc<Endpoint>| !tried.iter().any(|t| Arc::ptr_eq(t, endpoint));
        for group in &snapshot.groups {
            let candidates = group.endpoints.iter().filter(untried);
            if let Some(endpoint) = two_choices(candidates, |e| e.available()) {
                return Some((Arc::clone(endpoint), false));
            }
        }
        // Every endpoint is ejected: better to try one than to fail the call unheard.
        snapshot.groups.iter().find_map(|group| {
            two_choices(group.endpoints.iter().filter(untried), |_| true)
                .map(|endpoint| (Arc::clone(endpoint), true))
        })
    }

    fn why_none(&self) -> NoEndpoint {
        let snapshot = self.snapshot.load();
        NoEndpoint::Unresolved(
            self.targets
                .iter()
                .zip(&snapshot.groups)
                .map(|(target, group)| {
                    (
                        target.authority(),
                        group
                            .problem
                            .clone()
                            .unwrap_or_else(|| "has no endpoint".to_owned()),
                    )
                })
                .collect(),
        )
    }

    /// Notes where a first attempt went. A change of priority is a failover or a failback,
    /// said once in the log and in `petra_priority_in_use`; panic mode is said once too, and
    /// changes nothing else.
    fn note_pick(&self, priority: usize, panic: bool) {
        if panic != self.panicking.load(Ordering::Relaxed)
            && panic != self.panicking.swap(panic, Ordering::Relaxed)
        {
            if panic {
                tracing::warn!("every Petra endpoint is ejected; trying them anyway");
            } else {
                tracing::info!("a Petra endpoint is available again");
            }
        }
        if panic {
            return;
        }
        let priority = priority as i64;
        if self.in_use.load(Ordering::Relaxed) == priority {
            return;
        }
        let _changing = self
            .changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = self.in_use.load(Ordering::Relaxed);
        if before == priority {
            return;
        }
        self.in_use.store(priority, Ordering::Relaxed);
        self.metrics.priority_in_use.set(priority);
        let url = &self.targets[priority as usize].url;
        if before < 0 {
            tracing::info!(priority, %url, "calling Petra");
        } else if priority > before {
            tracing::warn!(from = before, to = priority, %url, "failing over to the next Petra priority: no endpoint of a higher one is available");
        } else {
            tracing::info!(from = before, to = priority, %url, "failing back to a higher Petra priority");
        }
    }

    fn note_none(&self) {
        let _changing = self
            .changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.in_use.swap(-1, Ordering::Relaxed) != -1 {
            self.metrics.priority_in_use.set(-1);
            tracing::warn!("no Petra endpoint is known");
        }
    }
}

/// Logs what changed in a group, and forgets the metrics of endpoints that are gone.
fn log_changes(target: &Target, before: &Group, after: &Group, metrics: &PetraMetrics) {
    let gone: Vec<&Arc<Endpoint>> = before
        .endpoints
        .iter()
        .filter(|old| !after.endpoints.iter().any(|new| Arc::ptr_eq(old, new)))
        .collect();
    let added = after
        .endpoints
        .iter()
        .filter(|new| !before.endpoints.iter().any(|old| Arc::ptr_eq(old, new)))
        .count();
    for endpoint in &gone {
        endpoint.forget(metrics);
    }
    if gone.is_empty() && added == 0 && before.problem == after.problem {
        return;
    }
    let addresses: Vec<String> = after.endpoints.iter().map(|e| e.addr.to_string()).collect();
    match &after.problem {
        Some(problem) if after.endpoints.is_empty() => {
            tracing::warn!(url = %target.url, priority = target.priority, problem, "Petra's host has no endpoint");
        }
        _ => tracing::info!(
            url = %target.url,
            priority = target.priority,
            added,
            removed = gone.len(),
            endpoints = %addresses.join(","),
            "Petra endpoints changed"
        ),
    }
}

/// What the balancer weighs: calls in flight.
pub(crate) trait Loaded {
    fn load(&self) -> usize;
}

impl Loaded for Endpoint {
    fn load(&self) -> usize {
        Endpoint::load(self)
    }
}

/// Of the items that pass `available`, the less loaded of two chosen at random: the only one
/// if there is one, none if there is none. The items are walked again rather than collected,
/// so that choosing allocates nothing.
fn two_choices<'a, T, I>(items: I, available: impl Fn(&T) -> bool) -> Option<&'a Arc<T>>
where
    T: Loaded + 'a,
    I: Iterator<Item = &'a Arc<T>> + Clone,
{
    let candidates = || items.clone().filter(|item| available(item));
    let count = candidates().count();
    if count < 2 {
        return candidates().next();
    }
    // Two distinct positions among `count`, uniformly.
    let a = fastrand::usize(..count);
    let mut b = fastrand::usize(..count - 1);
    if b >= a {
        b += 1;
    }
    // An endpoint ejected in between shortens the list: take what is there.
    match (candidates().nth(a), candidates().nth(b)) {
        (Some(x), Some(y)) => Some(if y.load() < x.load() { y } else { x }),
        (Some(x), None) | (None, Some(x)) => Some(x),
        (None, None) => candidates().next(),
    }
}

/// Resolves every URL's host now, then every `interval` and whenever `endpoints` asks (a
/// failed attempt), at most every 100 ms, until `stop`.
pub(crate) fn spawn_discovery(
    endpoints: Arc<Endpoints>,
    resolver: Arc<dyn Resolve>,
    interval: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        // At most this often on demand, so that a flapping endpoint cannot flood the DNS.
        const MIN_GAP: Duration = Duration::from_millis(100);
        loop {
            // Each URL's answer is taken as it comes: a slow name (another cloud's) does not
            // hold up the others.
            futures_util::future::join_all(endpoints.targets().iter().enumerate().map(
                |(index, target)| {
                    let (endpoints, resolver) = (&endpoints, &resolver);
                    async move {
                        let answer = resolver.resolve(&target.host).await;
                        endpoints.update(index, answer);
                    }
                },
            ))
            .await;
            endpoints.round_done();
            let rested = tokio::time::sleep(MIN_GAP);
            tokio::select! {
                () = stop.cancelled() => return,
                () = rested => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval.saturating_sub(MIN_GAP)) => {}
                () = endpoints.resolve_requested() => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Busy(usize);

    impl Loaded for Busy {
        fn load(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn of_two_the_less_loaded_is_chosen() {
        let items = [Arc::new(Busy(5)), Arc::new(Busy(0))];
        for _ in 0..100 {
            let chosen = two_choices(items.iter(), |_| true).expect("one");
            assert_eq!(chosen.0, 0);
        }
    }

    #[test]
    fn among_many_the_idle_one_wins_whenever_it_is_drawn() {
        // Drawn in two of three pairs; picked each time: about 2/3 of the choices. Choosing
        // the more loaded instead would never pick it, and choosing at random 1/3.
        let items = [Arc::new(Busy(9)), Arc::new(Busy(0)), Arc::new(Busy(9))];
        let idle = (0..3000)
            .filter(|_| two_choices(items.iter(), |_| true).expect("one").0 == 0)
            .count();
        assert!((1800..2200).contains(&idle), "{idle} of 3000");
    }

    #[test]
    fn unavailable_items_are_skipped_and_none_is_none() {
        let items = [Arc::new(Busy(0)), Arc::new(Busy(7))];
        let chosen = two_choices(items.iter(), |item| item.0 == 7).expect("one");
        assert_eq!(chosen.0, 7);
        assert!(two_choices(items.iter(), |_| false).is_none());
        assert!(two_choices(std::iter::empty::<&Arc<Busy>>(), |_| true).is_none());
    }
}
