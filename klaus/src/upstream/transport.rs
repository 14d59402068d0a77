//! The connection to one endpoint: TCP to its address, TLS with the URL's host name and the
//! client configuration in use at that moment, all within a connect deadline; and the HTTP
//! client of each [`Profile`] over it.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::iter::Once;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Uri;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::discover::{Resolution, Resolve};
use super::tls::{ClientTls, Profile};

/// How often Klaus pings Petra on an HTTP/2 connection, and how long it waits for the answer
/// before it closes the connection.
const H2_PING_INTERVAL: Duration = Duration::from_secs(5);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// An error from the HTTP client, the connector or the deadline.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The HTTP client of one endpoint and profile.
pub(crate) type HttpClient = Client<EndpointConnector, Empty<Bytes>>;

/// Connecting (TCP and TLS handshake together) took longer than its share of the deadline.
/// The request was not sent, so another endpoint may take it.
#[derive(Debug, thiserror::Error)]
#[error("connecting to Petra timed out after {0:?}")]
pub(crate) struct ConnectTimeout(pub(crate) Duration);

/// The endpoint's address is no longer among its host's addresses (a replica that is gone),
/// so no connection is tried: it would wait for a peer that cannot answer.
#[derive(Debug, thiserror::Error)]
#[error("{ip} is no longer an address of {host}")]
pub(crate) struct Gone {
    pub(crate) ip: IpAddr,
    pub(crate) host: String,
}

/// What a connection to one endpoint needs.
#[derive(Debug, Clone)]
pub(crate) struct Dial {
    /// The endpoint's address.
    pub(crate) ip: IpAddr,
    /// The URL's host, looked up again before each new connection.
    pub(crate) host: String,
    /// The name Petra's certificate must carry.
    pub(crate) server_name: ServerName<'static>,
    pub(crate) resolver: Arc<dyn Resolve>,
    pub(crate) tls: Arc<ClientTls>,
    pub(crate) connect_timeout: Duration,
}

/// Told when a connection is up (TCP and TLS done), so that calls waiting for a lane's first
/// connection can go on, and when it is gone (its client dropped it: closed by Petra, by age,
/// by the pool's idle timeout, or failed), so that the next burst waits for one new
/// connection instead of opening one per call.
pub(crate) trait Watch: Send + Sync {
    fn connected(&self);
    fn closed(&self);
}

/// A client's [`Watch`], if it has one.
pub(crate) type Watcher = Arc<dyn Watch>;

/// Builds the client of `profile` for one endpoint, for requests whose URI names the
/// endpoint's URL; `watch` is told of each connection made and gone.
pub(crate) fn client(dial: Dial, profile: Profile, watch: Option<Watcher>) -> HttpClient {
    let connector = connector(dial, profile, watch);
    let pooled = profile == Profile::Pooled;
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // HTTP/2 when Petra offers it (ALPN), else HTTP/1.1: one multiplexed connection
        // costs less CPU per request under load than a pool of HTTP/1.1 connections (fewer
        // system calls), measured twice (BENCHMARKS.md, "Where one request's time goes").
        // Petra closes connections gracefully after MAX_CONNECTION_AGE_SECONDS, so that a
        // rotated certificate is used in time.
        .pool_idle_timeout(Duration::from_secs(50))
        .pool_max_idle_per_host(if pooled { usize::MAX } else { 0 })
        // A connection whose peer went silent (a cut link, a replica gone without a FIN)
        // would otherwise carry every call into its deadline until TCP gives up, minutes
        // later. A ping unanswered within 3 s closes it, so new calls get a new connection.
        .http2_keep_alive_interval(H2_PING_INTERVAL)
        .http2_keep_alive_timeout(H2_PING_TIMEOUT)
        .http2_keep_alive_while_idle(true);
    // No proxy (service-to-service calls go straight to Petra, whatever HTTPS_PROXY says) and
    // no redirects: this client follows neither.
    builder.build(connector)
}

/// The connector of `profile` for one endpoint: TCP (no delay, keep-alive) to its address,
/// then TLS; `watch` is told of each connection made and gone.
pub(crate) fn connector(dial: Dial, profile: Profile, watch: Option<Watcher>) -> EndpointConnector {
    let mut tcp = HttpConnector::new_with_resolver(Fixed(dial.ip));
    // TLS is added below; the request's scheme is https.
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    // TCP keep-alive as reqwest set it, which Klaus used before: probes after 15 s idle,
    // every 15 s, 3 unanswered close the connection.
    tcp.set_keepalive(Some(Duration::from_secs(15)));
    tcp.set_keepalive_interval(Some(Duration::from_secs(15)));
    tcp.set_keepalive_retries(Some(3));
    EndpointConnector {
        tcp,
        dial: Arc::new(dial),
        profile,
        watch,
    }
}

/// A "resolver" that always answers with the endpoint's address: the URL's host was resolved
/// already, by discovery, and the connector sets the URL's port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fixed(IpAddr);

impl tower_service::Service<Name> for Fixed {
    type Response = Once<SocketAddr>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        ready(Ok(std::iter::once(SocketAddr::new(self.0, 0))))
    }
}

/// TCP to one address, then TLS for the URL's host name with the configuration in use now.
/// Before connecting, the host is looked up again (new connections are rare: one per endpoint,
/// renewed through its age, and retries): an address that is no longer the host's is not
/// dialled, so that a replica that has just gone costs a failed lookup, not a connect timeout.
#[derive(Clone)]
pub(crate) struct EndpointConnector {
    tcp: HttpConnector<Fixed>,
    dial: Arc<Dial>,
    profile: Profile,
    watch: Option<Watcher>,
}

impl std::fmt::Debug for EndpointConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConnector")
            .field("dial", &self.dial)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl tower_service::Service<Uri> for EndpointConnector {
    type Response = Watched;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let tcp = self.tcp.call(dst);
        let dial = Arc::clone(&self.dial);
        let tls = tokio_rustls::TlsConnector::from(dial.tls.config(self.profile));
        let (name, timeout) = (dial.server_name.clone(), dial.connect_timeout);
        let watch = self.watch.clone();
        Box::pin(async move {
            let connecting = async move {
                if dial.host.parse::<IpAddr>().is_err() {
                    match dial.resolver.resolve(&dial.host).await {
                        Resolution::Addresses(ips) if !ips.contains(&dial.ip) => {}
                        Resolution::NotFound => {}
                        // Still named, or the lookup failed: try the address.
                        _ => return connect(tcp, tls, name).await,
                    }
                    return Err(Gone {
                        ip: dial.ip,
                        host: dial.host.clone(),
                    }
                    .into());
                }
                connect(tcp, tls, name).await
            };
            let connected = tokio::time::timeout(timeout, connecting)
                .await
                .unwrap_or_else(|_| Err(ConnectTimeout(timeout).into()))?;
            if let Some(watch) = &watch {
                watch.connected();
            }
            Ok(Watched {
                io: connected,
                watch,
            })
        })
    }
}

/// TCP, then the TLS handshake.
async fn connect<F, E>(
    tcp: F,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
) -> Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>
where
    F: Future<Output = Result<TokioIo<TcpStream>, E>>,
    E: Into<BoxError>,
{
    let tcp = tcp.await.map_err(Into::into)?;
    let stream = tls.connect(name, TokioIo::new(tcp)).await?;
    Ok(MaybeHttpsStream::from(stream))
}

/// A connection's stream that tells its client's [`Watch`] when it is dropped.
pub(crate) struct Watched {
    io: MaybeHttpsStream<TokioIo<TcpStream>>,
    watch: Option<Watcher>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.closed();
        }
    }
}

impl hyper::rt::Read for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl hyper_util::client::legacy::connect::Connection for Watched {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}
