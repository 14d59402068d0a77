//! The read gate: an HTTP/1.1 connection reads its next request only when admission control
//! has room for it. While the limit is reached, the request stays in the kernel's socket
//! buffer, where it costs the service nothing and TCP pushes back on the client, instead of
//! being read and parsed into a queued request that holds memory and is touched again when its
//! turn comes. A held connection waits first come first served, for at most the admission
//! queue's `max_wait`; then it reads anyway and its request meets the queue as any other.
//!
//! Only the read that begins a request is gated (the first on a connection, and the first
//! after each response was written), and only once its bytes have arrived: the reads hyper
//! makes while a request is in progress (its body, or a look for the client's close) pass, so
//! that a request never waits on its own connection. The request's latency counts from when
//! its bytes were there ([`admission::note_arrival`]), so that the wait is in the service's
//! latency metrics and log line. HTTP/2 is not gated: its connection
//! carries pings and window updates that must be read whatever the load. Nor is TLS: rustls
//! may hold a request's bytes already decrypted, which the socket's readiness cannot show.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::admission::{self, Admission, ReadPaused};

/// A plain TCP connection behind the read gate.
pub(super) struct Gated {
    io: TcpStream,
    admission: Arc<Admission>,
    /// Cancelled when the server stops: the gate opens, so that requests already sent are read
    /// and answered while the connection drains, instead of being closed unread as idle.
    stop: CancellationToken,
    /// hyper's header-read timeout, which runs from when it starts waiting for a request: a
    /// request held longer would be cut off unanswered, so the gate lets it through before.
    header_timeout: Duration,
    /// Whether the next read begins a request, and since when the connection waits for it.
    between_requests: Option<Instant>,
    /// Set while the connection is held back.
    held: Option<Held>,
    /// Whether the read in progress was let through by a wake-up, which is room handed to it.
    woken: bool,
}

/// A connection held back: what wakes it, and when it stops waiting.
struct Held {
    /// When the request's first bytes were there.
    since: Instant,
    notified: Pin<Box<OwnedNotified>>,
    deadline: Pin<Box<Sleep>>,
    _counted: ReadPaused,
}

/// How long before hyper's header-read timeout the gate lets a held request through, so that
/// hyper reads it in time.
const BEFORE_HEADER_TIMEOUT: Duration = Duration::from_millis(100);

impl Gated {
    pub(super) fn new(
        io: TcpStream,
        admission: Arc<Admission>,
        stop: CancellationToken,
        header_timeout: Duration,
    ) -> Self {
        Self {
            io,
            admission,
            stop,
            header_timeout,
            between_requests: Some(Instant::now()),
            held: None,
            woken: false,
        }
    }

    /// Ready when the connection may read the request it is about to begin: at once while the
    /// limit has room and nobody is held before it, else when room frees up and this
    /// connection is the oldest held (admission wakes a held connection only when it has room
    /// for it), when the server stops, or when [`Held::deadline`] passes: `max_wait`, or
    /// shortly before hyper's header-read timeout, whichever comes first.
    fn poll_open(&mut self, cx: &mut Context<'_>, idle_since: Instant) -> Poll<()> {
        if self.stop.is_cancelled() {
            self.held = None;
            return Poll::Ready(());
        }
        let held = match &mut self.held {
            Some(held) => held,
            None => {
                if self.admission.may_read() {
                    return Poll::Ready(());
                }
                let (readers, max_wait) = self.admission.read_gate();
                let mut notified = Box::pin(readers.notified_owned());
                // Registered before the second look, so that room freed in between wakes it.
                notified.as_mut().enable();
                let counted = self.admission.read_paused();
                let now = Instant::now();
                let cut_off =
                    idle_since + self.header_timeout.saturating_sub(BEFORE_HEADER_TIMEOUT);
                let deadline = (now + max_wait).min(cut_off);
                self.held.insert(Held {
                    since: now,
                    notified,
                    deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
                    _counted: counted,
                })
            }
        };
        let woken = held.notified.as_mut().poll(cx).is_ready();
        if woken || held.deadline.as_mut().poll(cx).is_ready() {
            admission::note_arrival(held.since);
            self.woken = woken;
            self.held = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(idle_since) = this.between_requests {
            // The gate is asked when the request's first bytes are there, not when hyper
            // starts to look for them: a client that waits for each answer sends its next
            // request only after it, by when the answer's own room has long been given back.
            ready!(this.io.poll_read_ready(cx))?;
            ready!(this.poll_open(cx, idle_since));
            this.between_requests = None;
        }
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut this.io).poll_read(cx, buf));
        if std::mem::take(&mut this.woken) && (result.is_err() || buf.filled().len() == before) {
            // The client had gone: the room it was handed goes to the next.
            this.admission.read_unused();
        }
        Poll::Ready(result)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.between_requests.get_or_insert_with(Instant::now);
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.between_requests.get_or_insert_with(Instant::now);
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use prometheus_client::registry::Registry;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::admission::Settings;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";

    /// Admission with room for one request, held requests waiting at most `max_wait`.
    fn admission(max_wait: Duration) -> (Arc<Admission>, Registry) {
        let mut registry = Registry::default();
        let admission = Admission::new(Settings::adaptive(1, max_wait), &mut registry);
        (admission, registry)
    }

    fn paused(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text.lines()
            .find(|line| line.starts_with("connections_read_paused "))
            .unwrap_or_default()
            .to_owned()
    }

    /// Both ends of a loopback connection: the client's, and the server's with the peer.
    async fn pair() -> (TcpStream, TcpStream, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, peer) = listener.accept().await.expect("accept");
        (client, server, peer)
    }

    async fn connection(admission: &Arc<Admission>) -> (TcpStream, Gated) {
        let (client, server, _) = pair().await;
        let gated = Gated::new(
            server,
            Arc::clone(admission),
            CancellationToken::new(),
            Duration::from_secs(10),
        );
        (client, gated)
    }

    /// Reads from `server` in a task, handing back what it read and the connection.
    fn read(server: Gated) -> tokio::task::JoinHandle<(Vec<u8>, Gated)> {
        tokio::spawn(read_once(server))
    }

    async fn read_once(mut server: Gated) -> (Vec<u8>, Gated) {
        let mut buf = vec![0; 1024];
        let n = server.read(&mut buf).await.expect("read");
        buf.truncate(n);
        (buf, server)
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(5), "{what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_request_stays_unread_while_the_limit_is_reached_and_is_read_when_room_frees() {
        let (admission, registry) = admission(Duration::from_secs(30));
        let permit = admission.acquire().await.expect("room");
        let (mut client, server) = connection(&admission).await;
        client.write_all(REQUEST).await.expect("write");
        let sent = Instant::now();
        // As the server does, in a scope where the gate records when the request arrived.
        let reading = tokio::spawn(admission::with_arrivals(async move {
            let (read, _) = read_once(server).await;
            (read, admission::take_arrival())
        }));
        until("the connection was never held", || {
            paused(&registry) == "connections_read_paused 1"
        })
        .await;
        assert!(!reading.is_finished(), "read while the limit was reached");
        let released = Instant::now();
        drop(permit);
        let (read, arrived) = reading.await.expect("task");
        assert_eq!(read, REQUEST);
        assert_eq!(paused(&registry), "connections_read_paused 0");
        // The request's latency counts from its arrival, not from when it was read.
        let arrived = arrived.expect("the gate recorded the arrival");
        assert!(arrived >= sent && arrived < released, "{arrived:?}");
    }

    #[tokio::test]
    async fn a_held_request_is_read_once_its_wait_runs_out() {
        let max_wait = Duration::from_millis(50);
        let (admission, _registry) = admission(max_wait);
        let _permit = admission.acquire().await.expect("room");
        let (mut client, server) = connection(&admission).await;
        client.write_all(REQUEST).await.expect("write");
        let started = Instant::now();
        let (read, _) = read(server).await.expect("task");
        assert_eq!(read, REQUEST);
        assert!(started.elapsed() >= max_wait, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn only_the_read_that_begins_a_request_is_gated() {
        let (admission, registry) = admission(Duration::from_secs(30));
        let (mut client, server) = connection(&admission).await;
        // With room, the first part of a request is read...
        client.write_all(&REQUEST[..5]).await.expect("write");
        let (first, server) = read(server).await.expect("task");
        assert_eq!(first, &REQUEST[..5]);
        // ...and its rest too, though the limit is reached meanwhile (by this very request).
        let permit = admission.acquire().await.expect("room");
        client.write_all(&REQUEST[5..]).await.expect("write");
        let (rest, mut server) = read(server).await.expect("task");
        assert_eq!(rest, &REQUEST[5..]);
        // Once the answer is written, the next request begins, and waits for room.
        server
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .expect("answer");
        client.write_all(REQUEST).await.expect("write");
        let reading = read(server);
        until("the next request was not held", || {
            paused(&registry) == "connections_read_paused 1"
        })
        .await;
        assert!(!reading.is_finished());
        drop(permit);
        assert_eq!(reading.await.expect("task").0, REQUEST);
    }

    /// A gated connection served by hyper, as the server serves it (a router without admission
    /// of its own, hyper's header-read timeout `header_read_timeout`); returns the client and
    /// the server's stop token.
    async fn served(
        admission: &Arc<Admission>,
        header_read_timeout: Duration,
    ) -> (TcpStream, CancellationToken) {
        let (client, server, peer) = pair().await;
        let stop = CancellationToken::new();
        let gated = Gated::new(
            server,
            Arc::clone(admission),
            stop.clone(),
            header_read_timeout,
        );
        let limits = super::super::Limits {
            header_read_timeout,
            ..super::super::Limits::default()
        };
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let service = hyper_util::service::TowerToHyperService::new(router);
        let serving = stop.clone();
        tokio::spawn(async move {
            super::super::conn::serve_http1(gated, service, &limits, &serving, peer).await;
        });
        (client, stop)
    }

    async fn answer(client: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
            .await
            .expect("an answer within 5 s")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_held_request_is_read_before_hypers_header_timeout_cuts_it_off() {
        let (admission, _registry) = admission(Duration::from_secs(30));
        let _permit = admission.acquire().await.expect("room");
        let (mut client, _stop) = served(&admission, Duration::from_millis(300)).await;
        client.write_all(REQUEST).await.expect("write");
        // Let through before hyper's 300 ms run out (this router has no admission of its own),
        // the request is answered; held past them, it would be dropped with the connection.
        let answer = answer(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }

    #[tokio::test]
    async fn a_held_request_is_answered_when_the_server_stops() {
        let (admission, registry) = admission(Duration::from_secs(30));
        let permit = admission.acquire().await.expect("room");
        let (mut client, stop) = served(&admission, Duration::from_secs(10)).await;
        client.write_all(REQUEST).await.expect("write");
        until("the request was never held", || {
            paused(&registry) == "connections_read_paused 1"
        })
        .await;
        stop.cancel();
        drop(permit);
        let answer = answer(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
}
