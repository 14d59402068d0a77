//! The endpoint set and the choice of an endpoint per attempt: among the endpoints of the best
//! priority that has one available, the less loaded of two picked at random (power of two
//! choices over calls in flight, as Linkerd's and Finagle's balancers do). When every endpoint
//! is ejected, they are all tried anyway rather than none (Envoy's panic mode).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};

use super::config::Target;
use super::discover::Resolution;
use super::endpoint::{Endpoint, OutlierSettings};
use super::metrics::{PetraMetrics, StateLabel};
use super::tls::ClientTls;

/// What is known of one URL: its endpoints, and what its last resolution said.
#[derive(Debug)]
struct Group {
    endpoints: Vec<Arc<Endpoint>>,
    /// Why the group has no endpoint, if it has none: the resolution's answer.
    problem: Option<String>,
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
    /// The priority the last first attempt went to, -1 for none.
    in_use: AtomicI64,
    tls: Arc<ClientTls>,
    connect_timeout: Duration,
    outlier: OutlierSettings,
    metrics: PetraMetrics,
}

impl Endpoints {
    pub(crate) fn new(
        targets: Vec<Target>,
        tls: Arc<ClientTls>,
        connect_timeout: Duration,
        outlier: OutlierSettings,
        metrics: PetraMetrics,
    ) -> Self {
        let groups = targets
            .iter()
            .map(|_| Group {
                endpoints: Vec::new(),
                problem: None,
            })
            .collect();
        Self {
            targets: targets.into_iter().map(Arc::new).collect(),
            snapshot: ArcSwap::from_pointee(Snapshot { groups }),
            resolved: watch::Sender::new(false),
            resolve_now: Notify::new(),
            in_use: AtomicI64::new(-1),
            tls,
            connect_timeout,
            outlier,
            metrics,
        }
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

    /// Takes one round of answers, one per URL in order: endpoints that are still named keep
    /// their connections and state, new addresses become endpoints, the others are dropped.
    pub(crate) fn update(&self, answers: Vec<Resolution>) {
        let old = self.snapshot.load_full();
        let mut groups = Vec::with_capacity(self.targets.len());
        for ((target, answer), before) in self.targets.iter().zip(answers).zip(&old.groups) {
            let known: HashMap<SocketAddr, &Arc<Endpoint>> = before
                .endpoints
                .iter()
                .map(|endpoint| (endpoint.addr, endpoint))
                .collect();
            let group = match answer {
                Resolution::Addresses(ips) => Group {
                    endpoints: ips
                        .into_iter()
                        .map(|ip| {
                            let addr = SocketAddr::new(ip, target.port);
                            known.get(&addr).map_or_else(
                                || {
                                    Arc::new(Endpoint::new(
                                        Arc::clone(target),
                                        addr,
                                        &self.tls,
                                        self.connect_timeout,
                                        self.outlier,
                                        &self.metrics,
                                    ))
                                },
                                |endpoint| Arc::clone(endpoint),
                            )
                        })
                        .collect(),
                    problem: None,
                },
                Resolution::NotFound => Group {
                    endpoints: Vec::new(),
                    problem: Some("does not resolve".to_owned()),
                },
                Resolution::Failed(why) => {
                    if before.problem.is_none() || !before.endpoints.is_empty() {
                        tracing::warn!(url = %target.url, error = %why, kept = before.endpoints.len(), "resolving Petra's host failed; keeping the endpoints known");
                    }
                    Group {
                        endpoints: before.endpoints.clone(),
                        problem: before
                            .endpoints
                            .is_empty()
                            .then(|| format!("does not resolve ({why})")),
                    }
                }
            };
            log_changes(target, before, &group, &self.metrics);
            groups.push(group);
        }
        self.snapshot.store(Arc::new(Snapshot { groups }));
        self.resolved.send_replace(true);
        self.refresh_gauges();
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
            if let Some(endpoint) = self.pick(&[]) {
                self.note_in_use(endpoint.priority());
                return Ok(endpoint);
            }
            let mut resolved = self.resolved.subscribe();
            if *resolved.borrow_and_update() {
                self.note_in_use_none();
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
        self.pick(tried)
    }

    /// Power of two choices among the available endpoints not in `tried` of the best priority
    /// that has any; when none is available anywhere, among all endpoints not in `tried`.
    fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        let snapshot = self.snapshot.load();
        let untried = |endpoint: &&Arc<Endpoint>| !tried.iter().any(|t| Arc::ptr_eq(t, endpoint));
        for group in &snapshot.groups {
            if let Some(endpoint) =
                two_choices(group.endpoints.iter().filter(untried), |e| e.available())
            {
                return Some(Arc::clone(endpoint));
            }
        }
        // Every endpoint is ejected: better to try one than to fail the call unheard.
        snapshot.groups.iter().find_map(|group| {
            two_choices(group.endpoints.iter().filter(untried), |_| true).map(Arc::clone)
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

    /// Notes the priority a first attempt went to; a change is a failover or a failback, said
    /// once in the log and in `petra_priority_in_use`.
    fn note_in_use(&self, priority: usize) {
        let priority = priority as i64;
        let before = self.in_use.load(Ordering::Relaxed);
        if before == priority
            || self
                .in_use
                .compare_exchange(before, priority, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
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

    fn note_in_use_none(&self) {
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

/// Of the items that pass `available`, the less loaded of two chosen at random: the only one
/// if there is one, none if there is none. The items are walked again rather than collected,
/// so that choosing allocates nothing.
fn two_choices<'a, I>(items: I, available: impl Fn(&Endpoint) -> bool) -> Option<&'a Arc<Endpoint>>
where
    I: Iterator<Item = &'a Arc<Endpoint>> + Clone,
{
    let candidates = || items.clone().filter(|endpoint| available(endpoint));
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
