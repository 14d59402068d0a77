//! One connection: the TLS handshake under its timeout, HTTP/1.1 or HTTP/2 (by ALPN) with the
//! server's limits, and a graceful close at shutdown or at the connection's maximum age.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::limits::Limits;

type HyperService = TowerToHyperService<axum::Router>;

pub(super) async fn serve_tls(
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

pub(super) async fn serve_http1<IO>(
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

/// Runs a connection to its end; when `closing` fires (the server stops: it is a child of the
/// server's stop token) or the connection reaches `max_age` (which cancels `closing`), lets the
/// requests in flight finish and closes it.
async fn drive<C>(conn: C, closing: &CancellationToken, max_age: Option<Duration>)
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
    let aged = async {
        aged.await;
        tracing::debug!("connection reached its maximum age; closing it gracefully");
        closing.cancel();
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closing.cancelled() => close(conn).await,
        () = aged => close(conn).await,
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// Closes a connection gracefully, after one more turn: a request that has arrived but was left
/// unread (the read gate opens once `closing` is cancelled) is read now, so that it is answered
/// before the connection closes instead of being dropped with a connection that looked idle.
async fn close<C>(mut conn: std::pin::Pin<&mut C>) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    if let Poll::Ready(result) =
        std::future::poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await
    {
        return result;
    }
    conn.as_mut().graceful_shutdown();
    conn.await
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
