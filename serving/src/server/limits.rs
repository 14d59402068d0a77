//! The limits that keep a slow, idle or hostile client from holding a connection or task
//! forever, and each listener's connection cap.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::DEFAULT_MAX_CONNECTIONS;
use crate::observe::MAX_HEADER_BYTES;

/// What the protocol layers hold of one request head, on either HTTP version: 16 KiB, twice
/// [`MAX_HEADER_BYTES`], which the application answers 431 above. That leaves room for the
/// request line and each field's separators (HTTP/1.1), or the 32 bytes HTTP/2 counts per
/// field, for up to hyper's 100 fields, so that every request the application would take
/// reaches it; a larger head is refused before it is decoded into a header map. It is also
/// hyper's own HTTP/2 default.
pub const MAX_HEAD_BYTES: usize = 2 * MAX_HEADER_BYTES;

/// The admin listener's connection cap: the kubelet's probes and a Prometheus scraper use a
/// few connections at a time.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Limits that keep a slow, idle or hostile client from holding a connection or task forever.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time a client has to finish the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time a client has to send a request's headers, counted from when the server waits for
    /// them; this also closes idle HTTP/1.1 keep-alive connections.
    pub header_read_timeout: Duration,
    /// The HTTP/1.1 read buffer, which bounds the request head; beyond it hyper answers 431.
    pub max_buf_size: usize,
    /// The HTTP/2 header list limit (RFC 9113's `SETTINGS_MAX_HEADER_LIST_SIZE`: names and
    /// values plus 32 bytes a field); beyond it h2 answers 431 and resets the stream.
    pub max_header_list_size: u32,
    /// The most connections the main listener holds open at once; at the cap it stops
    /// accepting until one closes, so that further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// The same for the admin listener, which probes and a scraper use a few at a time.
    pub admin_max_connections: usize,
    /// Concurrent HTTP/2 streams per connection: 256, so that one client cannot hold more of
    /// the service's work on one connection than that; Klaus opens another connection to a
    /// Petra endpoint at 128 calls, half of it, and the admission limit bounds the total.
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings, which find dead peers.
    pub h2_keep_alive_interval: Duration,
    /// Age after which a connection is closed gracefully (HTTP/2 GOAWAY, or `Connection:
    /// close` on the next HTTP/1.1 response), give or take 10 %, so that a client holding one
    /// long-lived HTTP/2 connection spreads over new replicas; `None` keeps connections open.
    pub max_connection_age: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_buf_size: MAX_HEAD_BYTES,
            max_header_list_size: MAX_HEAD_BYTES as u32,
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            admin_max_connections: ADMIN_MAX_CONNECTIONS,
            max_concurrent_streams: 256,
            h2_keep_alive_interval: Duration::from_secs(20),
            max_connection_age: None,
        }
    }
}

/// A listener's connection cap, and its metrics.
#[derive(Debug, Clone)]
pub(super) struct Cap {
    /// One permit per connection the listener may hold open.
    slots: Arc<Semaphore>,
    /// Connections open on this listener.
    pub(super) open: Gauge,
    /// Times the listener stopped accepting because it held its cap.
    pauses: Counter,
}

/// The `listener` label of the connection cap metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

impl Cap {
    /// The caps of the main and admin listeners, their metrics in `registry`.
    pub(super) fn register(limits: &Limits, registry: &mut Registry) -> (Self, Self) {
        let open = Family::<ListenerLabel, Gauge>::default();
        let max = Family::<ListenerLabel, Gauge>::default();
        let pauses = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "listener_connections_open",
            "Connections open, by listener",
            open.clone(),
        );
        registry.register(
            "listener_connections_max",
            "The most connections a listener holds open at once (MAX_CONNECTIONS for the main listener)",
            max.clone(),
        );
        registry.register(
            "listener_cap_pauses",
            "Times a listener stopped accepting because it held its most connections; new ones wait in the backlog",
            pauses.clone(),
        );
        let cap = |listener: &'static str, slots: usize| {
            let label = ListenerLabel { listener };
            let slots = slots.clamp(1, Semaphore::MAX_PERMITS);
            max.get_or_create(&label)
                .set(i64::try_from(slots).unwrap_or(i64::MAX));
            Self {
                slots: Arc::new(Semaphore::new(slots)),
                open: open.get_or_create(&label).clone(),
                pauses: pauses.get_or_create(&label).clone(),
            }
        };
        (
            cap("main", limits.max_connections),
            cap("admin", limits.admin_max_connections),
        )
    }

    /// A slot for the next connection: at once while the listener is under its cap, else once
    /// a connection closes (`None` when `stop` fires first). Until then nothing is accepted,
    /// so that further clients wait in the kernel's backlog, which costs the service nothing;
    /// closing them at once would cost an accept and a close each, and a client that retries
    /// at once would keep the listener busy doing only that.
    pub(super) async fn slot(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(slot);
        }
        self.pauses.inc();
        tracing::debug!("connection cap reached; accepting again when a connection closes");
        tokio::select! {
            () = stop.cancelled() => None,
            slot = Arc::clone(&self.slots).acquire_owned() => slot.ok(),
        }
    }
}
