//! The HTTP server: binds the main and admin listeners, accepts connections (TLS or plain),
//! serves HTTP/1.1 and HTTP/2 with server-side timeouts, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Health};
use crate::admission::Admission;
use crate::config::{DEFAULT_MAX_CONNECTIONS, ServeArgs};
use crate::error::ConfigError;
use crate::observe::MAX_HEADER_BYTES;
use crate::shutdown::Timing;
use crate::tls::{ReloadingConfig, ServerFiles};

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

/// Connection metrics of the main listener.
#[derive(Debug, Clone, Default)]
struct ConnMetrics {
    accepted: Counter,
    open: Gauge,
    handshake_failures: Counter,
    /// The most connections open at once since the last memory trim.
    peak_open: Arc<std::sync::atomic::AtomicI64>,
    memory_trims: Counter,
}

impl ConnMetrics {
    fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        registry.register(
            "connections_accepted",
            "Connections accepted on the main listener",
            this.accepted.clone(),
        );
        registry.register(
            "connections_open",
            "Connections open on the main listener",
            this.open.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the main listener that failed or timed out (refused client certificates among them)",
            this.handshake_failures.clone(),
        );
        registry.register(
            "memory_trims",
            "Times free memory was given back to the system after a burst of connections ended",
            this.memory_trims.clone(),
        );
        this
    }
}

/// A listener's connection cap, and its metrics.
#[derive(Debug, Clone)]
struct Cap {
    /// One permit per connection the listener may hold open.
    slots: Arc<Semaphore>,
    /// Connections open on this listener.
    open: Gauge,
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
    fn register(limits: &Limits, registry: &mut Registry) -> (Self, Self) {
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
    async fn slot(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
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

/// Everything a service hands to the server.
#[derive(Debug)]
pub struct Service {
    /// The service's name, for logs.
    pub name: &'static str,
    /// The main listener's routes, with [`crate::observe::layer`] applied.
    pub router: axum::Router,
    /// The main listener's address.
    pub listen_addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// TLS for the main listener; `None` serves plain HTTP.
    pub tls: Option<ServerFiles>,
    /// The metrics the admin listener serves.
    pub registry: Registry,
    /// Graceful shutdown pacing.
    pub timing: Timing,
    /// Connection limits.
    pub limits: Limits,
    /// The main listener's admission control (the one its router's [`crate::observe::layer`]
    /// uses): its limit adapts while the service serves, and the listener stops accepting
    /// while its queue is full. `None` accepts always.
    pub admission: Option<Arc<Admission>>,
    /// Work the service runs beside its listeners while it serves.
    pub tasks: Tasks,
}

/// Work a service runs beside its listeners (re-reading files, resolving names): each task is
/// started once the service serves, inside its runtime, and is handed a token that is cancelled
/// when the admin listener stops, last in the shutdown.
#[derive(Default)]
pub struct Tasks(Vec<Box<dyn FnOnce(CancellationToken) + Send>>);

impl Tasks {
    /// Adds a task.
    pub fn push(&mut self, task: impl FnOnce(CancellationToken) + Send + 'static) {
        self.0.push(Box::new(task));
    }
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tasks({})", self.0.len())
    }
}

/// A service whose TLS files are loaded and whose listeners are bound, ready to serve.
#[derive(Debug)]
pub struct Bound {
    name: &'static str,
    router: axum::Router,
    main: TcpListener,
    admin: TcpListener,
    tls: Option<Arc<ReloadingConfig>>,
    registry: Arc<Registry>,
    conn_metrics: ConnMetrics,
    main_cap: Cap,
    admin_cap: Cap,
    health: Health,
    timing: Timing,
    limits: Limits,
    admission: Option<Arc<Admission>>,
    tasks: Tasks,
}

impl Service {
    /// The service `serve` describes: `router` on `listen_addr` under `name`, with `tls`, the
    /// metrics in `registry` and the main listener's `admission` (the one `router` uses).
    pub fn new(
        name: &'static str,
        serve: &ServeArgs,
        listen_addr: SocketAddr,
        router: axum::Router,
        tls: Option<ServerFiles>,
        registry: Registry,
        admission: Arc<Admission>,
    ) -> Self {
        Self {
            name,
            router,
            admission: Some(admission),
            listen_addr,
            admin_addr: serve.admin_addr,
            tls,
            registry,
            timing: serve.shutdown_timing(),
            limits: Limits {
                max_connection_age: (serve.max_connection_age_seconds > 0)
                    .then(|| Duration::from_secs(serve.max_connection_age_seconds)),
                max_connections: serve.max_connections as usize,
                ..Limits::default()
            },
            tasks: Tasks::default(),
        }
    }

    /// Loads and checks the TLS files, then binds both listeners. Every failure names the
    /// variable to fix.
    pub async fn bind(mut self) -> Result<Bound, ConfigError> {
        let tls = self
            .tls
            .map(|files| ReloadingConfig::load(files, &mut self.registry))
            .transpose()?;
        let main = bind("LISTEN_ADDR", self.listen_addr).await?;
        let admin = bind("ADMIN_ADDR", self.admin_addr).await?;
        let conn_metrics = ConnMetrics::register(&mut self.registry);
        let (main_cap, admin_cap) = Cap::register(&self.limits, &mut self.registry);
        crate::telemetry::register(&mut self.registry);
        crate::process::register(&mut self.registry);
        Ok(Bound {
            name: self.name,
            router: self.router,
            main,
            admin,
            tls,
            registry: Arc::new(self.registry),
            conn_metrics,
            main_cap,
            admin_cap,
            health: Health::default(),
            timing: self.timing,
            limits: self.limits,
            admission: self.admission,
            tasks: self.tasks,
        })
    }
}

async fn bind(var: &'static str, addr: SocketAddr) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| ConfigError::new(var, format!("cannot listen on {addr}: {err}")))
}

impl Bound {
    /// The main listener's address (with the real port when 0 was asked for).
    pub fn main_addr(&self) -> SocketAddr {
        self.main.local_addr().unwrap_or_else(|_| unspecified())
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or_else(|_| unspecified())
    }

    /// The readiness flag, for callers that watch it.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves until `shutdown` resolves, then: readiness false at once; the main listener keeps
    /// serving for the shutdown delay; it stops accepting and waits up to the drain timeout
    /// for requests in flight; the admin listener stops last.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (main_addr, admin_addr) = (self.main_addr(), self.admin_addr());
        let stop_main = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        if let Some(tls) = &self.tls {
            tls.spawn_reloader(stop_admin.clone());
        }
        for task in self.tasks.0 {
            task(stop_admin.clone());
        }
        if let Some(admission) = &self.admission {
            admission.spawn_adaptation(stop_admin.clone());
        }
        crate::memory::spawn_trimmer(
            self.conn_metrics.open.clone(),
            Arc::clone(&self.conn_metrics.peak_open),
            self.conn_metrics.memory_trims.clone(),
            stop_admin.clone(),
        );
        let admin_router = admin::router(self.health.clone(), Arc::clone(&self.registry));
        let admin = tokio::spawn(accept_loop(
            self.admin,
            self.admin_cap,
            None,
            None,
            None,
            admin_router,
            self.limits,
            stop_admin.clone(),
            Duration::from_secs(1),
        ));
        let main = tokio::spawn(accept_loop(
            self.main,
            self.main_cap,
            self.tls.clone(),
            Some(self.conn_metrics.clone()),
            self.admission.clone(),
            self.router,
            self.limits,
            stop_main.clone(),
            self.timing.drain_timeout,
        ));
        self.health.set_ready(true);
        tracing::info!(
            service = self.name,
            %main_addr,
            %admin_addr,
            tls = self.tls.is_some(),
            "serving"
        );

        shutdown.await;
        self.health.set_ready(false);
        tracing::info!(
            delay_s = self.timing.delay.as_secs_f64(),
            "readiness is now false; serving on until the delay ends"
        );
        tokio::time::sleep(self.timing.delay).await;
        stop_main.cancel();
        let _ = main.await;
        stop_admin.cancel();
        let _ = admin.await;
        tracing::info!(service = self.name, "stopped");
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Accepts connections until `stop` (pausing while `admission`'s queue is full or the
/// listener holds its `cap` of connections), then asks each open connection to finish its
/// requests and close, and waits up to `drain_timeout` for them.
#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: TcpListener,
    cap: Cap,
    tls: Option<Arc<ReloadingConfig>>,
    metrics: Option<ConnMetrics>,
    admission: Option<Arc<Admission>>,
    router: axum::Router,
    limits: Limits,
    stop: CancellationToken,
    drain_timeout: Duration,
) {
    let tracker = TaskTracker::new();
    let service = TowerToHyperService::new(router);
    loop {
        if let Some(admission) = &admission {
            tokio::select! {
                () = stop.cancelled() => break,
                () = admission.room_to_accept() => {}
            }
        }
        let Some(slot) = cap.slot(&stop).await else {
            break;
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let stop = stop.clone();
        let tls = tls.as_ref().map(|tls| tls.current());
        let metrics = metrics.clone();
        let open = cap.open.clone();
        tracker.spawn(async move {
            open.inc();
            if let Some(metrics) = &metrics {
                metrics.accepted.inc();
                let open = metrics.open.inc() + 1;
                metrics
                    .peak_open
                    .fetch_max(open, std::sync::atomic::Ordering::Relaxed);
            }
            match tls {
                None => serve_http1(stream, service, &limits, &stop, peer).await,
                Some(config) => {
                    if serve_tls(stream, peer, config, service, &limits, &stop)
                        .await
                        .is_err()
                        && let Some(metrics) = &metrics
                    {
                        metrics.handshake_failures.inc();
                    }
                }
            }
            if let Some(metrics) = &metrics {
                metrics.open.dec();
            }
            open.dec();
            // The slot frees last, once the connection is closed and counted as such.
            drop(slot);
        });
    }
    drop(listener);
    tracker.close();
    let open = tracker.len();
    if open > 0
        && tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
    {
        tracing::warn!(
            connections = tracker.len(),
            "drain timeout reached; closing connections still open"
        );
    }
}

type HyperService = TowerToHyperService<axum::Router>;

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    service: HyperService,
    limits: &Limits,
    stop: &CancellationToken,
) -> Result<(), ()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshake = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                return Err(());
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return Err(());
            }
        },
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    if h2 {
        serve_http2(stream, service, limits, stop, peer).await;
    } else {
        serve_http1(stream, service, limits, stop, peer).await;
    }
    Ok(())
}

async fn serve_http1<IO>(
    io: IO,
    service: HyperService,
    limits: &Limits,
    stop: &CancellationToken,
    peer: SocketAddr,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buf_size)
        .serve_connection(TokioIo::new(io), service);
    drive(conn, stop, max_age(limits, peer)).await;
}

async fn serve_http2<IO>(
    io: IO,
    service: HyperService,
    limits: &Limits,
    stop: &CancellationToken,
    peer: SocketAddr,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_list_size)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.h2_keep_alive_interval)
        .serve_connection(TokioIo::new(io), service);
    drive(conn, stop, max_age(limits, peer)).await;
}

/// This connection's maximum age: [`Limits::max_connection_age`] spread over ±10 % by the
/// peer's port, so that connections opened together do not all close together. Saturates
/// instead of overflowing (`Duration::mul_f64` panics there), though the configuration
/// already keeps the age to a week.
fn max_age(limits: &Limits, peer: SocketAddr) -> Option<Duration> {
    let age = limits.max_connection_age?;
    let spread = f64::from(peer.port() % 201) / 1000.0 - 0.1;
    Some(Duration::try_from_secs_f64(age.as_secs_f64() * (1.0 + spread)).unwrap_or(Duration::MAX))
}

/// Runs a connection to its end; when `stop` fires or the connection reaches `max_age`, lets
/// the requests in flight finish and closes it.
async fn drive<C>(conn: C, stop: &CancellationToken, max_age: Option<Duration>)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = pin!(conn);
    let aged = async {
        match max_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = aged => {
            tracing::debug!("connection reached its maximum age; closing it gracefully");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ages_spread_without_overflowing() {
        let peer = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let limits = |age| Limits {
            max_connection_age: Some(age),
            ..Limits::default()
        };
        let five_minutes = limits(Duration::from_secs(300));
        assert_eq!(
            max_age(&five_minutes, peer(0)),
            Some(Duration::from_secs(270))
        );
        assert_eq!(
            max_age(&five_minutes, peer(200)),
            Some(Duration::from_secs(330))
        );
        // Near the largest duration, a factor above 1 saturates instead of panicking.
        let forever = limits(Duration::from_secs(u64::MAX));
        assert_eq!(max_age(&forever, peer(200)), Some(Duration::MAX));
        assert_eq!(max_age(&Limits::default(), peer(200)), None);
    }
}
