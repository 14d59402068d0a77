//! The solo connection: one HTTP/1.1 connection per endpoint for calls that come one at a time.
//!
//! HTTP/2 is the better protocol for calls that overlap: one connection carries them all and
//! batches their frames. A call that is alone on its endpoint gets nothing from that and pays
//! for it: HTTP/2 framing and HPACK on both ends and a hop through the connection's task, about
//! a quarter of the instructions of Klaus and Petra together per call (BENCHMARKS.md, "Where
//! one request's time goes"). So a call that finds no other call in flight to its endpoint goes
//! over this connection when it is warm, and every other call over the HTTP/2 lanes.
//!
//! The connection never costs a call anything:
//! - It is opened in the background, never on a call's path, once [`OPEN_AFTER`] lone calls
//!   in a row each followed the one before within [`WARM_FOR`]: calls are coming one at a time
//!   and it pays to have it. A call that overlaps another starts the count again, so a burst
//!   does not open it, and calls that come less often never do; until it is up they go over
//!   HTTP/2.
//! - It is used only while it was last used within [`WARM_FOR`], which is far shorter than the
//!   idle timeouts that close HTTP/1.1 keep-alive connections (Petra's is its 10 s header read
//!   timeout). A colder one is closed and the call goes over HTTP/2, whose pings keep its
//!   connection open over any distance.
//! - Every [`LANE_REFRESH`] one lone call goes over HTTP/2 all the same, so that the HTTP/2
//!   connection stays in use: left unused, the pool's idle timeout would close it, and the
//!   next burst would open connections on its calls' path.
//! - When sending a call over it fails before an answer comes (Petra closed it at that moment,
//!   its age ended), the call is sent over HTTP/2, so what a call's errors say, and what
//!   outlier detection counts, comes from the HTTP/2 lanes. When Petra had already read the
//!   request, that sends the idempotent `GET /` a second time, as the retry of a call whose
//!   connection closed under it does; the pause below bounds it to once per [`RETRY_AFTER`].
//!   An answer that came over it is the call's answer, an error status too.
//! - After a connection could not be opened, closed before a call used it, or failed under a
//!   call (no answer, an error status, the call's deadline), none is opened for
//!   [`RETRY_AFTER`].
//! - A call cut short from outside (its client went away) closes the connection too, since its
//!   answer may still be on the way. When it had waited less than [`PATIENT_FOR`] for the
//!   answer, that says nothing about Petra: the next lone calls may open another at once, once
//!   they are again [`OPEN_AFTER`] in a row. A load generator that stops mid-call, as every
//!   timed benchmark does, would otherwise keep the next run's first second off the
//!   connection. A call that had waited longer may have been given up on because the answer
//!   never came (a client whose timeout is shorter than `PETRA_TIMEOUT_MS`, a Petra or a
//!   middlebox that takes HTTP/1.1 requests and never answers): that pauses, as a failure does.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::header::HOST;
use axum::http::{HeaderValue, Uri};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1::{self, SendRequest};
use tower_service::Service;

use super::tls::Profile;
use super::transport::{self, Dial};

/// How recently the connection must have been used, and the previous lone call have started,
/// for a lone call to go over it, or to open it.
pub(crate) const WARM_FOR: Duration = Duration::from_secs(1);

/// How often a lone call goes over HTTP/2 although the solo connection is warm: well inside the
/// HTTP/2 pool's idle timeout (50 s, `transport::client`).
pub(crate) const LANE_REFRESH: Duration = Duration::from_secs(5);

/// Lone calls in a row, each within [`WARM_FOR`] of the one before, that open the connection.
pub(crate) const OPEN_AFTER: u32 = 8;

/// How long after a failed attempt to open the connection, or a failed call over it, no other
/// is opened.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a call cut short from outside may have waited for its answer and still say nothing
/// about Petra.
pub(crate) const PATIENT_FOR: Duration = Duration::from_millis(250);

/// One endpoint's solo connection.
#[derive(Debug)]
pub(crate) struct Solo {
    dial: Arc<Dial>,
    /// The endpoint's URL, which the connector reads the port from.
    uri: Uri,
    /// Its path (origin form) and authority (`host`), as an HTTP/1.1 connection sends them.
    path: Uri,
    host: Option<HeaderValue>,
    /// Lone calls in a row, each within [`WARM_FOR`] of the one before.
    streak: Arc<AtomicU32>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// The connection's sender, while no call uses it.
    idle: Option<SendRequest<Empty<Bytes>>>,
    /// When it was put back by the last call that used it.
    idle_since: Option<Instant>,
    /// A call has it, or it is being opened.
    busy: bool,
    /// When the last lone call started.
    last_lone: Option<Instant>,
    /// When a lone call last went over HTTP/2.
    http2_at: Option<Instant>,
    /// No attempt to open it before this.
    retry_at: Option<Instant>,
}

impl State {
    /// No attempt to open the connection for [`RETRY_AFTER`] from `now`.
    fn pause(&mut self, now: Instant) {
        self.retry_at = Some(now + RETRY_AFTER);
    }
}

impl Solo {
    pub(crate) fn new(dial: Dial, uri: Uri) -> Self {
        let path = uri
            .path_and_query()
            .and_then(|path| path.as_str().parse().ok())
            .unwrap_or_default();
        let host = uri
            .authority()
            .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok());
        Self {
            dial: Arc::new(dial),
            uri,
            path,
            host,
            streak: Arc::default(),
            state: Arc::default(),
        }
    }

    /// A `GET` of the URL's path with its authority in `host`: this is a connection, not a
    /// client, so the request names what a client would have filled in.
    pub(crate) fn request(&self) -> hyper::Request<Empty<Bytes>> {
        let mut request = hyper::Request::new(Empty::new());
        *request.uri_mut() = self.path.clone();
        if let Some(host) = &self.host {
            request.headers_mut().insert(HOST, host.clone());
        }
        request
    }

    /// A call started while another was in flight: lone calls count from the start again.
    pub(crate) fn crowded(&self) {
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    /// For a call that is alone on its endpoint: the connection when it is warm, which the
    /// call holds until [`Lease::give_back`]. Otherwise `None`, and the call goes over HTTP/2;
    /// when lone calls are coming one after another and there is no connection, one is opened
    /// for the next.
    pub(crate) fn take(&self) -> Option<Lease> {
        let now = Instant::now();
        let mut state = self.lock();
        let follows = state
            .last_lone
            .is_some_and(|last| now.saturating_duration_since(last) < WARM_FOR);
        state.last_lone = Some(now);
        let streak = if follows {
            self.streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1)
        } else {
            self.streak.store(1, Ordering::Relaxed);
            1
        };
        if state.busy {
            state.http2_at = Some(now);
            return None;
        }
        let refresh = state
            .http2_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LANE_REFRESH);
        if let Some(sender) = state.idle.take() {
            let warm = state
                .idle_since
                .is_some_and(|since| now.saturating_duration_since(since) < WARM_FOR);
            if sender.is_closed() {
                // Closed before a call used it (Petra's idle close or age, a refused
                // certificate, something between that drops HTTP/1.1): wait before the next.
                state.pause(now);
            } else if warm && refresh {
                // This call keeps the HTTP/2 connection in use; the next one takes this, and
                // its warmth counts from now (or calls 0.5–1 s apart would find it cold after
                // each refresh and open another).
                state.idle = Some(sender);
                state.idle_since = Some(now);
                state.http2_at = Some(now);
                return None;
            } else if warm {
                state.busy = true;
                return Some(Lease {
                    sender: Some(sender),
                    state: Arc::clone(&self.state),
                    streak: Arc::clone(&self.streak),
                    waiting_since: None,
                });
            }
            // Cold or closed: dropping the sender closes it.
        }
        state.http2_at = Some(now);
        if streak >= OPEN_AFTER && state.retry_at.is_none_or(|at| now >= at) {
            state.busy = true;
            drop(state);
            self.open();
        }
        None
    }

    /// Opens the connection in the background: TCP and TLS with ALPN `http/1.1` and the
    /// configuration in use now, within the connect deadline.
    fn open(&self) {
        let mut connector = transport::connector((*self.dial).clone(), Profile::Fresh, None);
        let (uri, state) = (self.uri.clone(), Arc::clone(&self.state));
        let endpoint = self.dial.ip;
        let opening = Opening {
            state: Some(Arc::clone(&state)),
        };
        tokio::spawn(async move {
            let opened = async {
                let io = connector.call(uri).await?;
                let (sender, connection) = http1::handshake(io).await?;
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(%endpoint, error = %err, "Petra's solo connection ended");
                    }
                });
                Ok::<_, transport::BoxError>(sender)
            };
            let opened = opened.await;
            opening.finish();
            let mut state = lock(&state);
            state.busy = false;
            match opened {
                Ok(sender) => {
                    state.idle = Some(sender);
                    state.idle_since = Some(Instant::now());
                }
                Err(err) => {
                    tracing::debug!(%endpoint, error = %err, "could not open the solo connection to Petra");
                    state.pause(Instant::now());
                }
            }
        });
    }

    /// A call over the connection failed where the lease no longer was (its deadline passed):
    /// none is opened for [`RETRY_AFTER`].
    pub(crate) fn pause(&self) {
        self.lock().pause(Instant::now());
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// The state, also when a thread panicked while it held it: every write to it is one whole
/// step, so what a panic leaves is consistent.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The opening of the solo connection, until it ends: dropped before (the task was dropped
/// with the runtime, or cancelled), it lets the next lone calls open another after
/// [`RETRY_AFTER`] instead of leaving the connection marked busy for good.
struct Opening {
    state: Option<Arc<Mutex<State>>>,
}

impl Opening {
    /// The opening ended: what it found is recorded by its task.
    fn finish(mut self) {
        self.state = None;
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let mut state = lock(&state);
            state.busy = false;
            state.pause(Instant::now());
        }
    }
}

/// The solo connection, held by one call. Dropped without [`Lease::give_back`], it is closed.
#[derive(Debug)]
pub(crate) struct Lease {
    sender: Option<SendRequest<Empty<Bytes>>>,
    state: Arc<Mutex<State>>,
    /// The endpoint's streak, which a call cut short starts again.
    streak: Arc<AtomicU32>,
    /// Since when the call has waited for its answer's head, until it came.
    waiting_since: Option<Instant>,
}

impl Lease {
    /// Sends `request` ([`Solo::request`]) once the connection takes one.
    pub(crate) async fn send(
        &mut self,
        request: hyper::Request<Empty<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error> {
        let sender = self
            .sender
            .as_mut()
            .expect("a lease holds its sender until dropped");
        self.waiting_since = Some(Instant::now());
        sender.ready().await?;
        let response = sender.send_request(request).await;
        self.waiting_since = None;
        response
    }

    /// Gives the connection back for the next lone call, once this call has read the answer
    /// to its end.
    pub(crate) fn give_back(mut self) {
        let mut state = lock(&self.state);
        state.idle = self.sender.take();
        state.idle_since = Some(Instant::now());
    }

    /// The call failed over it: the connection closes, and none is opened for [`RETRY_AFTER`].
    pub(crate) fn fail(mut self) {
        self.sender = None;
        lock(&self.state).pause(Instant::now());
    }
}

impl Drop for Lease {
    /// Given back, failed, or cut short (neither): a call cut short closes the connection with
    /// the sender, as its answer may still come, and the streak starts again; after waiting for
    /// its answer longer than [`PATIENT_FOR`], none is opened for [`RETRY_AFTER`].
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.busy = false;
        if self.sender.is_some() {
            self.streak.store(0, Ordering::Relaxed);
            if self
                .waiting_since
                .is_some_and(|since| since.elapsed() >= PATIENT_FOR)
            {
                state.pause(Instant::now());
            }
        }
    }
}
