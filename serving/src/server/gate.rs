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
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;

use crate::admission::{self, Admission, ReadPaused};

/// A plain TCP connection behind the read gate.
pub(super) struct Gated<IO = TcpStream> {
    io: IO,
    admission: Arc<Admission>,
    /// Whether the next read begins a request.
    between_requests: bool,
    /// Set while the connection is held back.
    held: Option<Held>,
}

/// A connection held back: what wakes it, and when it stops waiting.
struct Held {
    /// When the request's first bytes were there.
    since: Instant,
    notified: Pin<Box<OwnedNotified>>,
    deadline: Pin<Box<Sleep>>,
    _counted: ReadPaused,
}

impl<IO> Gated<IO> {
    pub(super) fn new(io: IO, admission: Arc<Admission>) -> Self {
        Self {
            io,
            admission,
            between_requests: true,
            held: None,
        }
    }

    /// Ready when the connection may read the request it is about to begin: at once while the
    /// limit has room, else when room frees up and this connection is the oldest held (a
    /// wake-up is a grant: admission gives one only when the limit has room and no read
    /// request waits for it), or when [`Held::deadline`] passes.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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
                if self.admission.may_read() {
                    return Poll::Ready(());
                }
                self.held.insert(Held {
                    since: Instant::now(),
                    notified,
                    deadline: Box::pin(tokio::time::sleep(max_wait)),
                    _counted: self.admission.read_paused(),
                })
            }
        };
        if held.notified.as_mut().poll(cx).is_ready() || held.deadline.as_mut().poll(cx).is_ready()
        {
            admission::note_arrival(held.since);
            self.held = None;
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl AsyncRead for Gated<TcpStream> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.between_requests {
            // The gate is asked when the request's first bytes are there, not when hyper
            // starts to look for them: a client that waits for each answer sends its next
            // request only after it, by when the answer's own room has long been given back.
            if let Err(err) = ready!(this.io.poll_read_ready(cx)) {
                return Poll::Ready(Err(err));
            }
            ready!(this.poll_open(cx));
            this.between_requests = false;
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated<TcpStream> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.between_requests = true;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.between_requests = true;
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

    async fn connection(admission: &Arc<Admission>) -> (TcpStream, Gated) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, Gated::new(server, Arc::clone(admission)))
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
}
