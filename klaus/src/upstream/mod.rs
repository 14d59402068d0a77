//! Klaus's side of the call to Petra: one client built at startup over every endpoint of every
//! URL in PETRA_URL. Each call goes to an endpoint of the best priority that has one available
//! ([`balance`]), which discovery keeps up to date ([`discover`]); failures eject endpoints
//! ([`endpoint`]); an attempt that surely did not reach Petra moves to another endpoint within
//! the call's deadline and the retry budget; and the TLS files are re-read while Klaus runs
//! ([`tls`]).
//!
//! The rooms, one job each: [`config`] (settings), [`discover`] (names to addresses),
//! [`balance`] (the endpoint set and the choice), [`endpoint`] (one endpoint's connections and
//! outlier state), [`transport`] (connecting), [`tls`] (trust and identity), [`error`]
//! (what went wrong), [`metrics`].

mod balance;
pub mod config;
pub mod discover;
mod endpoint;
pub mod error;
mod metrics;
mod solo;
mod tls;
mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::header::USER_AGENT;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use serving::ConfigError;
use serving::observe::{self, REQUEST_ID, TRACEPARENT, TRACESTATE};
use serving::trace::Span;
use tokio_util::sync::CancellationToken;

pub use config::{ErrorDetail, PetraArgs, Target, parse_url, parse_urls};
pub use discover::{Resolution, Resolve, SystemResolver};
pub use error::{MAX_BODY_BYTES, PetraError, RETRY_AFTER_SECONDS, Retry, TlsProblem, body_text};
pub use metrics::PetraMetrics;

use balance::{Endpoints, NoEndpoint};
use endpoint::{Endpoint, OutlierSettings};
use error::Chain;
use solo::Lease;
use tls::{ClientTls, Profile};

/// Headers of the incoming request that Klaus passes on to Petra. The middleware has checked
/// them ([`serving::propagate`]): the request id is one Klaus kept or made, and trace context
/// that was not valid W3C is gone. `traceparent` is Klaus's own: the caller's trace, with the
/// attempt's span as the parent of Petra's.
const FORWARDED: [HeaderName; 2] = [TRACESTATE, REQUEST_ID];

/// The `user-agent` Klaus sends.
const KLAUS_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("klaus/", env!("CARGO_PKG_VERSION")));

/// How many times a call is sent again at once, on the same client, when Petra refused its
/// stream unprocessed (HTTP/2 `REFUSED_STREAM`, or a graceful `GOAWAY` that came first).
/// These retries are free of the budget: Petra did no work, and the connection is going away.
const MAX_REFUSED_RETRIES: u32 = 2;

/// How long a retry that found no other endpoint waits for a fresh resolution.
const FRESH_ROUND_PATIENCE: Duration = Duration::from_millis(200);

/// Attempts of one call at most: the first and two retries, each on an endpoint not tried yet
/// where there is one (a replica gone, then a whole priority).
const MAX_ATTEMPTS: usize = 3;

/// Retries allowed: at most [`RetryBudget::MAX_TOKENS`] at once, refilled by a tenth of a
/// retry for each successful call, so that retries add at most about 10 % to the load on a
/// healthy Petra and stop altogether when Petra is really down.
#[derive(Debug)]
struct RetryBudget {
    /// Thousandths of a retry.
    milli_tokens: AtomicU64,
}

impl RetryBudget {
    const MAX_TOKENS: u64 = 20;
    const PER_SUCCESS_MILLI: u64 = 100;

    fn withdraw(&self) -> bool {
        self.milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                tokens.checked_sub(1000)
            })
            .is_ok()
    }

    fn deposit(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                (tokens < Self::MAX_TOKENS * 1000)
                    .then(|| (tokens + Self::PER_SUCCESS_MILLI).min(Self::MAX_TOKENS * 1000))
            });
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            milli_tokens: AtomicU64::new(Self::MAX_TOKENS * 1000),
        }
    }
}

/// The one client Klaus uses for Petra, built at startup and shared by every request, so that
/// connections (and TLS sessions) are reused.
#[derive(Debug, Clone)]
pub struct PetraClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Arc<Endpoints>,
    tls: Arc<ClientTls>,
    budget: RetryBudget,
    timeout: Duration,
    resolve_interval: Duration,
    error_detail: ErrorDetail,
    metrics: PetraMetrics,
}

impl PetraClient {
    /// Checks the settings and reads the TLS files; every error names the variable to fix.
    /// Nothing is resolved or connected yet: [`PetraClient::start`] does that.
    pub fn new(
        args: &PetraArgs,
        resolver: Arc<dyn Resolve>,
        metrics: PetraMetrics,
    ) -> Result<Self, ConfigError> {
        let raw = args.petra_url.as_deref().ok_or_else(|| {
            ConfigError::new("PETRA_URL", "is not set; set it to Petra's https:// URL")
        })?;
        let targets = parse_urls(raw)?;
        let tls = Arc::new(ClientTls::load(args)?.with_expiry(metrics.cert_expiry.clone())?);
        let endpoints = Arc::new(Endpoints::new(
            targets,
            Arc::clone(&tls),
            resolver,
            args.connect_timeout(),
            OutlierSettings {
                eject_after: args.petra_eject_after,
                base: Duration::from_millis(args.petra_ejection_ms),
            },
            metrics.clone(),
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints,
                tls,
                budget: RetryBudget::default(),
                timeout: args.timeout(),
                resolve_interval: Duration::from_secs(args.petra_resolve_interval_seconds),
                error_detail: args.error_detail,
                metrics,
            }),
        })
    }

    /// Starts discovery and, when `tls_reload` is given, the re-reading of the TLS files, until
    /// `stop` is cancelled. Calls made before discovery's first round wait for it.
    pub fn start(&self, tls_reload: Option<Duration>, stop: CancellationToken) {
        let inner = &self.inner;
        balance::spawn_discovery(
            Arc::clone(&inner.endpoints),
            Arc::clone(inner.endpoints.resolver()),
            inner.resolve_interval,
            stop.clone(),
        );
        if let Some(interval) = tls_reload {
            inner
                .tls
                .spawn_reloader(interval, inner.metrics.tls_reloads.clone(), stop);
        }
    }

    /// How much Klaus's error answers say (ERROR_DETAIL).
    pub fn error_detail(&self) -> ErrorDetail {
        self.inner.error_detail
    }

    /// The URLs Klaus calls, in priority order.
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.inner
            .endpoints
            .targets()
            .iter()
            .map(|target| &**target)
    }

    /// Calls `GET {PETRA_URL}/`, passing on the trace state and request id of `incoming`,
    /// and returns Petra's body. The call is a span under `span` (the request's), each attempt
    /// a client span under the call's, whose id Petra gets as its parent in `traceparent`.
    pub async fn hello(&self, incoming: &HeaderMap, span: &Span) -> Result<String, PetraError> {
        let started = Instant::now();
        let call = span.child(SpanKind::Internal, || "call Petra".into(), Vec::new);
        let result = self.call(incoming, &call).await;
        let outcome = result.as_ref().map_or_else(PetraError::outcome, |_| "ok");
        self.inner.metrics.record(outcome, started.elapsed());
        if result.is_err() {
            call.fail(outcome);
        }
        call.record(|span| span.set_attribute(KeyValue::new("petra.outcome", outcome)));
        call.end();
        result
    }

    /// One call: a first attempt on the endpoint the balancer picks; when it surely did not
    /// reach Petra, a retry on an endpoint not tried yet (or, when there is none and the
    /// connection failed under the request, on a fresh connection to the same one), as long as
    /// the deadline and the retry budget allow.
    async fn call(&self, incoming: &HeaderMap, call: &Span) -> Result<String, PetraError> {
        let inner = &*self.inner;
        let deadline = tokio::time::Instant::now() + inner.timeout;
        let first = match inner.endpoints.first(deadline).await {
            Ok(endpoint) => endpoint,
            Err(none) => return Err(self.no_endpoint(none)),
        };
        let mut result = self
            .attempt(&first, Profile::Pooled, incoming, deadline, call, 0)
            .await;
        if result.is_ok() {
            inner.budget.deposit();
            record_attempts(call, 1, first.target.priority);
            return result;
        }
        let mut tried = vec![first];
        while let Err(err) = &result {
            let Some(scope) = err.retry() else { break };
            if tried.len() >= MAX_ATTEMPTS {
                break;
            }
            let mut other = inner.endpoints.other(&tried);
            // Not for a replica that shed the request: it is there, only full.
            if other.is_none() && err.counts_against_endpoint() {
                // The DNS may know an endpoint Klaus has not resolved yet (a rolling restart
                // moves faster than the resolve interval): ask, briefly.
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                inner
                    .endpoints
                    .fresh_round(FRESH_ROUND_PATIENCE.min(left / 4))
                    .await;
                other = inner.endpoints.other(&tried);
            }
            let (next, profile) = match other {
                // Another endpoint's pooled connection, unless the connection closed with no
                // reason given (a refused certificate can look like that over HTTP/2).
                Some(other) if err.wants_fresh_connection() => (other, Profile::Fresh),
                Some(other) => (other, Profile::Pooled),
                // The only endpoint: once more on a fresh connection, as the connection
                // failed under the request, not the endpoint.
                None if scope == Retry::Anywhere && tried.len() == 1 => {
                    (Arc::clone(&tried[0]), Profile::Fresh)
                }
                None => break,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left < inner.timeout / 10 || !inner.budget.withdraw() {
                inner.metrics.retry("skipped");
                break;
            }
            inner.metrics.retry("attempted");
            tracing::debug!(error = %Chain(err), from = %tried[tried.len() - 1].addr, to = %next.addr, "retrying the call to Petra");
            result = self
                .attempt(&next, profile, incoming, deadline, call, tried.len())
                .await;
            tried.push(next);
        }
        if result.is_ok() {
            inner.budget.deposit();
        }
        let last = tried.last().map_or(0, |endpoint| endpoint.target.priority);
        record_attempts(call, tried.len(), last);
        result
    }

    /// One attempt on `endpoint` with the client of `profile`: the request sent and the body
    /// read before `deadline`. The outcome is recorded against the endpoint, except a retry's
    /// timeout at the call's deadline (`retry` above 0): it had less than its share of time.
    async fn attempt(
        &self,
        endpoint: &Endpoint,
        profile: Profile,
        incoming: &HeaderMap,
        deadline: tokio::time::Instant,
        call: &Span,
        retry: usize,
    ) -> Result<String, PetraError> {
        let first = retry == 0;
        let in_flight = endpoint.start();
        // A pooled call alone on its endpoint goes over the solo connection when it is warm.
        let solo = match profile {
            Profile::Pooled => endpoint.solo(),
            Profile::Fresh => None,
        };
        let over_solo = solo.is_some();
        let connection = match (over_solo, profile) {
            (true, _) => "solo",
            (false, Profile::Pooled) => "pooled",
            (false, Profile::Fresh) => "fresh",
        };
        let span = call.child(
            SpanKind::Client,
            || "GET".into(),
            || {
                let mut attributes = vec![
                    KeyValue::new("http.request.method", "GET"),
                    KeyValue::new("server.address", endpoint.target.host.clone()),
                    KeyValue::new("server.port", i64::from(endpoint.target.port)),
                    KeyValue::new("network.peer.address", endpoint.addr.ip().to_string()),
                    KeyValue::new("network.peer.port", i64::from(endpoint.addr.port())),
                    KeyValue::new("petra.priority", endpoint.target.priority as i64),
                    KeyValue::new("petra.connection", connection),
                ];
                if retry > 0 {
                    attributes.push(KeyValue::new("http.request.resend_count", retry as i64));
                }
                attributes
            },
        );
        let result = match tokio::time::timeout_at(
            deadline,
            self.exchange(endpoint, profile, solo, incoming, &span),
        )
        .await
        {
            Ok(result) => result,
            Err(elapsed) => {
                if over_solo {
                    endpoint.solo_pause();
                }
                Err(PetraError::Timeout {
                    timeout_ms: self.timeout_ms(),
                    connecting: false,
                    source: Box::new(elapsed),
                })
            }
        };
        drop(in_flight);
        match &result {
            Ok(_) => span.record(|span| {
                span.set_attribute(KeyValue::new("http.response.status_code", 200));
            }),
            Err(err) => span.fail(err.outcome()),
        }
        span.end();
        match &result {
            Ok(_) => {
                if endpoint.succeeded() {
                    self.inner.endpoints.refresh_gauges();
                }
            }
            Err(err) => {
                let cut_short = !first
                    && matches!(
                        err,
                        PetraError::Timeout {
                            connecting: false,
                            ..
                        }
                    );
                let counts = err.counts_against_endpoint() && !cut_short;
                if endpoint.failed(err.outcome(), counts).is_some() {
                    self.inner.endpoints.refresh_gauges();
                }
                if counts {
                    // The endpoint may be a replica that is gone, whose address the DNS no
                    // longer gives: look again now rather than at the next interval.
                    self.inner.endpoints.request_resolve();
                }
            }
        }
        result
    }

    /// The call over `solo` when the attempt holds it, otherwise over the client of `profile`.
    async fn exchange(
        &self,
        endpoint: &Endpoint,
        profile: Profile,
        solo: Option<Lease>,
        incoming: &HeaderMap,
        span: &Span,
    ) -> Result<String, PetraError> {
        if let Some(mut solo) = solo {
            // Sending failed before an answer came: the call goes over HTTP/2 (a second time
            // when Petra had read it; see `solo`).
            match solo.send(solo_request(endpoint, incoming, span)).await {
                Ok(response) => {
                    let answer = self.answer(endpoint, response).await;
                    if answer.is_ok() {
                        solo.give_back();
                    } else {
                        solo.fail();
                    }
                    return answer;
                }
                Err(err) => {
                    solo.fail();
                    tracing::debug!(endpoint = %endpoint.addr, error = %Chain(&err), "a call over the solo connection to Petra failed; sending it over HTTP/2");
                    span.record(|span| {
                        span.add_event(
                            "solo connection failed, sent over HTTP/2",
                            vec![KeyValue::new("error.message", Chain(&err).to_string())],
                        );
                    });
                }
            }
        }
        let lane = (profile == Profile::Pooled).then(|| endpoint.lane());
        let client = match &lane {
            Some(lane) => {
                lane.connection().await;
                lane.client()
            }
            None => endpoint.fresh(),
        };
        let mut refused = 0;
        let response = loop {
            match client.request(request(endpoint, incoming, span)).await {
                Ok(response) => break response,
                Err(err) if refused < MAX_REFUSED_RETRIES && error::cause::is_refused(&err) => {
                    refused += 1;
                }
                Err(err) => return Err(self.classify(endpoint, err.into())),
            }
        };
        self.answer(endpoint, response).await
    }

    /// Petra's answer: its body as text (at most [`MAX_BODY_BYTES`]), or the error its status
    /// means.
    async fn answer(
        &self,
        endpoint: &Endpoint,
        response: hyper::Response<hyper::body::Incoming>,
    ) -> Result<String, PetraError> {
        let status = response.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return Err(PetraError::Overloaded {
                retry_after: error::retry_after(response.headers()),
            });
        }
        if !status.is_success() {
            return Err(PetraError::Status(status));
        }
        let mut body = response.into_body();
        if hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|len| len > MAX_BODY_BYTES as u64)
        {
            return Err(PetraError::TooLarge);
        }
        // Room for Petra's answer and Klaus's suffix without growing.
        let mut text = Vec::with_capacity(64);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| self.classify(endpoint, err.into()))?;
            if let Ok(chunk) = frame.into_data() {
                if text.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(PetraError::TooLarge);
                }
                text.extend_from_slice(&chunk);
            }
        }
        body_text(text)
    }

    fn timeout_ms(&self) -> u64 {
        self.inner.timeout.as_millis() as u64
    }

    /// Sorts a client error; the problem names the URL's host and port, never the address,
    /// which is an internal detail (the log has it).
    fn classify(&self, endpoint: &Endpoint, err: transport::BoxError) -> PetraError {
        let err = error::cause::classify(err, endpoint.target.authority(), self.timeout_ms());
        tracing::debug!(endpoint = %endpoint.addr, error = %Chain(&err), "attempt to call Petra failed");
        err
    }

    fn no_endpoint(&self, none: NoEndpoint) -> PetraError {
        let detail = match none {
            NoEndpoint::NotResolvedYet => format!(
                "Klaus is still resolving Petra's host names ({}) after {} ms; check the cluster's DNS and PETRA_URL",
                self.targets()
                    .map(Target::authority)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.timeout_ms()
            ),
            NoEndpoint::Unresolved(groups) if groups.len() == 1 => format!(
                "Petra's host name in {} {}; check PETRA_URL",
                groups[0].0, groups[0].1
            ),
            NoEndpoint::Unresolved(groups) => format!(
                "no Petra endpoint is known: {}; check PETRA_URL",
                groups
                    .iter()
                    .map(|(target, problem)| format!("{target} {problem}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        PetraError::Unreachable {
            detail,
            public: error::cause::UNREACHABLE,
            retryable: false,
            unexplained: false,
            source: "no endpoint".into(),
        }
    }
}

/// Puts on the call's span how many attempts it made and the priority of the last one (above 0
/// is failover to a later URL of PETRA_URL).
fn record_attempts(call: &Span, attempts: usize, priority: usize) {
    call.record(|span| {
        span.set_attribute(KeyValue::new("petra.attempts", attempts as i64));
        span.set_attribute(KeyValue::new("petra.priority", priority as i64));
    });
}

/// `GET {url}/` with Klaus's user agent, `span` as the parent of Petra's span, and the
/// headers passed on from `incoming`.
fn request(endpoint: &Endpoint, incoming: &HeaderMap, span: &Span) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = endpoint.target.uri.clone();
    add_headers(request.headers_mut(), incoming, span);
    request
}

/// [`request`] for the solo connection.
fn solo_request(endpoint: &Endpoint, incoming: &HeaderMap, span: &Span) -> Request<Empty<Bytes>> {
    let mut request = endpoint.solo_request();
    add_headers(request.headers_mut(), incoming, span);
    request
}

/// Klaus's user agent, `span` as the parent of Petra's span, and the headers passed on from
/// `incoming`.
fn add_headers(headers: &mut HeaderMap, incoming: &HeaderMap, span: &Span) {
    headers.insert(USER_AGENT, KLAUS_AGENT);
    headers.insert(TRACEPARENT, span.traceparent());
    for name in FORWARDED {
        if let Some(value) = incoming.get(&name) {
            headers.insert(name, observe::unique(value));
        }
    }
}
