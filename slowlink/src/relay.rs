//! The relay between noxious and the upstream: it passes bytes on as they come and holds each
//! close from the upstream back for a while, so that noxious has sent the bytes before it learns
//! of the close (see the crate's documentation).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A relay on a free port of 127.0.0.1 to an upstream; stops accepting when dropped.
#[derive(Debug)]
pub(crate) struct Relay {
    addr: SocketAddr,
    close_hold_ms: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying to `upstream` (`host:port`, looked up for each connection), holding
    /// closes from it back for `close_hold`.
    pub(crate) async fn start(upstream: &str, close_hold: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let close_hold_ms = Arc::new(AtomicU64::new(millis(close_hold)));
        let accept = tokio::spawn(accept(listener, upstream.to_owned(), close_hold_ms.clone()));
        Ok(Self {
            addr,
            close_hold_ms,
            accept,
        })
    }

    /// Where noxious connects.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds closes back for `close_hold` from now on.
    pub(crate) fn set_close_hold(&self, close_hold: Duration) {
        self.close_hold_ms
            .store(millis(close_hold), Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Accepts noxious's connections and relays each to a new connection to `upstream`. When the
/// upstream cannot be reached, the accepted connection is closed, as noxious closes the client's.
async fn accept(listener: TcpListener, upstream: String, close_hold_ms: Arc<AtomicU64>) {
    while let Ok((inner, _)) = listener.accept().await {
        let upstream = upstream.clone();
        let close_hold_ms = close_hold_ms.clone();
        tokio::spawn(async move {
            let Ok(outer) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = inner.set_nodelay(true);
            let _ = outer.set_nodelay(true);
            let (inner_read, inner_write) = inner.into_split();
            let (outer_read, outer_write) = outer.into_split();
            // Towards the upstream, a close passes at once: noxious has already delayed it.
            let up = pass(inner_read, outer_write, Duration::ZERO);
            let hold = Duration::from_millis(close_hold_ms.load(Ordering::Relaxed));
            let down = pass(outer_read, inner_write, hold);
            let _ = tokio::join!(up, down);
        });
    }
}

/// Copies until the reading side ends (or fails), waits `hold`, then closes the writing side.
async fn pass(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    hold: Duration,
) -> io::Result<u64> {
    let copied = tokio::io::copy(&mut from, &mut to).await;
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    to.shutdown().await?;
    copied
}
