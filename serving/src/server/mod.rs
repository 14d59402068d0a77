//! The HTTP server: assembles a [`Service`] from its settings, binds the main and admin
//! listeners, accepts connections (TLS or plain) and shuts down gracefully. Each connection is
//! served in `conn` (HTTP/1.1 and HTTP/2 with server-side timeouts); the limits and each
//! listener's connection cap are in `limits`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod conn;
mod gate;
mod limits;

pub use limits::{ADMIN_MAX_CONNECTIONS, Limits, MAX_HEAD_BYTES};

use crate::admin::{self, Health};
use crate::admission::Admission;
use crate::config::ServeArgs;
use crate::error::ConfigError;
use crate::shutdown::Timing;
use crate::tls::{ReloadingConfig, ServerFiles};

use conn::{serve_http1, serve_tls};
use limits::Cap;

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
        // This connection's own token: cancelled when the server stops, or when the connection
        // reaches its maximum age.
        let stop = stop.child_token();
        let tls = tls.as_ref().map(|tls| tls.current());
        let metrics = metrics.clone();
        let admission = admission.clone();
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
                None => match admission {
                    Some(admission) => {
                        let gated = gate::Gated::new(
                            stream,
                            admission,
                            stop.clone(),
                            limits.header_read_timeout,
                        );
                        crate::admission::with_arrivals(serve_http1(
                            gated, service, &limits, &stop, peer,
                        ))
                        .await;
                    }
                    None => serve_http1(stream, service, &limits, &stop, peer).await,
                },
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
