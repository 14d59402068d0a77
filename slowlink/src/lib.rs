//! The link between two services made long: a TCP proxy that delays what crosses it in each
//! direction, with jitter, as a link between two clouds would. The proxy is noxious (the Rust
//! port of Toxiproxy); this crate only starts it with the toxics of a [`Shape`] and changes them
//! while it runs.
//!
//! How noxious delays: its latency toxic holds each chunk it reads for the delay (± jitter),
//! and passes chunks on in the order they came. Published, it held one chunk at a time, so under
//! load a chunk also waited for the delays of the chunks before it; the copy in `vendor/`
//! holds them concurrently (vendor/README.md). The toxics apply to a whole connection
//! (Toxiproxy's `toxicity` picks connections, not segments), so a proxy cannot drop single
//! segments: loss is made below TCP, where a test needs it. TCP itself sees no distance: the
//! delay is added between two local connections.
//!
//! How noxious closes, which this crate mends on one side: as soon as one side of a connection
//! closes, noxious ends both directions and drops the chunks its latency toxic still holds. TCP
//! delivers every byte sent before the close, and what a server sends just before it closes is
//! often the point: a TLS alert refusing the client's certificate, an HTTP/2 GOAWAY. So the
//! link reaches its upstream through a small relay (module `relay`) that, when the upstream
//! closes, keeps noxious's side open for as long as noxious can hold a chunk
//! ([`Shape::longest_hold`]) and closes it only then. The other side is not mended: bytes the
//! client sends just before it closes may still be dropped.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use noxious::proxy::{ProxyConfig, ProxyRunner, Runner, Toxics};
use noxious::signal::{Close, Stop, Stopper};
use noxious::socket::TcpListener;
use noxious::toxic::{StreamDirection, Toxic, ToxicEvent, ToxicEventKind, ToxicEventResult};
use tokio::sync::watch;

/// What the link does to the bytes crossing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// The round trip the link adds: half of it in each direction.
    pub round_trip: Duration,
    /// How much the round trip varies, either way: half of it in each direction, drawn anew for
    /// each chunk.
    pub jitter: Duration,
}

impl Shape {
    /// No delay: the link passes bytes on as they come.
    pub const NONE: Self = Self {
        round_trip: Duration::ZERO,
        jitter: Duration::ZERO,
    };

    /// A round trip of `round_trip` ± `jitter`.
    pub const fn new(round_trip: Duration, jitter: Duration) -> Self {
        Self { round_trip, jitter }
    }

    /// How long noxious may hold what crosses the link before it passes it on: one delay at its
    /// longest, doubled for margin (a chunk also waits for the one before it to leave).
    pub fn longest_hold(self) -> Duration {
        2 * (self.round_trip + self.jitter.min(self.round_trip))
    }

    /// The toxics that make this shape: a latency toxic in each direction.
    fn toxics(self) -> Vec<Toxic> {
        if self == Self::NONE {
            return Vec::new();
        }
        let one_way = |d: Duration| u64::try_from(d.as_millis() / 2).unwrap_or(u64::MAX);
        [StreamDirection::Upstream, StreamDirection::Downstream]
            .into_iter()
            .map(|direction| Toxic {
                kind: noxious::toxic::ToxicKind::Latency {
                    latency: one_way(self.round_trip),
                    // noxious draws from [0, 2 × jitter), which must not be empty.
                    jitter: one_way(self.jitter.min(self.round_trip)),
                },
                name: format!("latency_{direction}"),
                toxicity: 1.0,
                direction,
            })
            .collect()
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ms ± {} ms round trip",
            self.round_trip.as_millis(),
            self.jitter.as_millis()
        )
    }
}

/// Why a link could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The proxy had stopped, or refused the change.
    #[error("the link did not take the new shape: {0}")]
    Reshape(String),
}

/// A running link: a proxy from [`Link::addr`] to its upstream, stopped when dropped.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    name: String,
    events: bmrng::RequestSender<ToxicEvent, ToxicEventResult>,
    stopper: Option<Stopper>,
    /// The shape in force, which the relay reads for how long to hold a close.
    shape: watch::Sender<Shape>,
    relays: [tokio::task::AbortHandle; 2],
}

/// noxious on a free port of 127.0.0.1, to `upstream`. noxious binds by address and does not
/// report the port it got, so a free port is taken first and handed over; another process may
/// take it in between, hence the retries.
async fn start_noxious(
    upstream: SocketAddr,
    shape: Shape,
) -> Result<
    (
        SocketAddr,
        String,
        bmrng::RequestSender<ToxicEvent, ToxicEventResult>,
        Stopper,
    ),
    Error,
> {
    let mut last = None;
    for _ in 0..20 {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|source| Error::Listen {
                addr: "127.0.0.1:0".into(),
                source,
            })?;
        let name = format!("link-{free}");
        let config = ProxyConfig {
            name: name.clone(),
            listen: free.to_string(),
            upstream: upstream.to_string(),
            enabled: true,
            rand_seed: None,
        };
        let mut toxics = Toxics::empty();
        for toxic in shape.toxics() {
            match toxic.direction {
                StreamDirection::Upstream => toxics.upstream.push(toxic),
                StreamDirection::Downstream => toxics.downstream.push(toxic),
            }
        }
        match ProxyRunner::initialize_proxy::<TcpListener>(config, toxics).await {
            Ok((listener, info)) => {
                let (events, receiver) = bmrng::channel(4);
                let (stop, stopper) = Stop::new();
                let (_closed, closer) = Close::new();
                tokio::spawn(ProxyRunner::run_proxy(
                    listener, info, receiver, stop, closer,
                ));
                return Ok((free, name, events, stopper));
            }
            Err(source) if source.kind() == io::ErrorKind::AddrInUse => last = Some(source),
            Err(source) => {
                return Err(Error::Listen {
                    addr: free.to_string(),
                    source,
                });
            }
        }
    }
    Err(Error::Listen {
        addr: "127.0.0.1:0".into(),
        source: last.unwrap_or_else(|| io::Error::other("no free port")),
    })
}

impl Link {
    /// A link on a free port of 127.0.0.1 to `upstream`, shaped by `shape`. Runs on the calling
    /// runtime.
    pub async fn start(upstream: SocketAddr, shape: Shape) -> Result<Self, Error> {
        Self::bind("127.0.0.1:0", &upstream.to_string(), shape).await
    }

    /// A link listening on `listen` (`host:port`; port 0 picks a free one) to `upstream`
    /// (`host:port`, looked up for each connection), shaped by `shape`. Runs on the calling
    /// runtime.
    pub async fn bind(listen: &str, upstream: &str, shape: Shape) -> Result<Self, Error> {
        let listen_error = |addr: &str| {
            let addr = addr.to_owned();
            move |source| Error::Listen { addr, source }
        };
        let front = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(listen_error(listen))?;
        let addr = front.local_addr().map_err(listen_error(listen))?;
        let back = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(listen_error("127.0.0.1:0"))?;
        let back_addr = back.local_addr().map_err(listen_error("127.0.0.1:0"))?;
        let (proxy, name, events, stopper) = start_noxious(back_addr, shape).await?;
        let (shape, held) = watch::channel(shape);
        let relays = [
            tokio::spawn(relay::front(front, proxy)).abort_handle(),
            tokio::spawn(relay::serve(back, upstream.to_owned(), held)).abort_handle(),
        ];
        Ok(Self {
            addr,
            name,
            events,
            stopper: Some(stopper),
            shape,
            relays,
        })
    }

    /// Where the link listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shape in force.
    pub fn shape(&self) -> Shape {
        *self.shape.borrow()
    }

    /// Gives the link a new shape, for the connections open now and the ones to come.
    pub async fn reshape(&mut self, shape: Shape) -> Result<(), Error> {
        // One by one: noxious's "remove all" clears only the upstream direction.
        for toxic in self.shape().toxics() {
            self.send(ToxicEventKind::RemoveToxic(toxic.name)).await?;
        }
        for toxic in shape.toxics() {
            self.send(ToxicEventKind::AddToxic(toxic)).await?;
        }
        self.shape.send_replace(shape);
        Ok(())
    }

    async fn send(&self, kind: ToxicEventKind) -> Result<(), Error> {
        self.events
            .send_receive(ToxicEvent::new(self.name.clone(), kind))
            .await
            .map_err(|err| Error::Reshape(err.to_string()))?
            .map_err(|err| Error::Reshape(err.to_string()))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(stopper) = self.stopper.take() {
            stopper.stop();
        }
        for relay in &self.relays {
            relay.abort();
        }
    }
}

mod relay {
    //! The link's two relays, on either side of noxious. The front one takes the clients'
    //! connections; the back one reaches the upstream and, when the upstream closes, holds
    //! noxious's side open for [`Shape::longest_hold`] first, so that what the upstream sent
    //! before closing crosses the link (see the crate's doc).
    //!
    //! Both acknowledge what noxious sends them at once (`TCP_QUICKACK` after each read):
    //! noxious leaves Nagle's algorithm on, so a small write of its waits for the peer's
    //! acknowledgement of the one before, and a peer that delays its acknowledgements (40 ms on
    //! Linux) added up to 40 ms to a crossing, even with no delay set.

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use super::Shape;

    /// Accepts noxious's connections and relays each to `upstream` (looked up each time).
    pub(crate) async fn serve(
        listener: TcpListener,
        upstream: String,
        shape: watch::Receiver<Shape>,
    ) {
        while let Ok((link, _)) = listener.accept().await {
            let (upstream, shape) = (upstream.clone(), shape.clone());
            tokio::spawn(async move {
                // An upstream that refuses: noxious's connection is closed at once, as
                // noxious itself closes the client's when it cannot connect.
                if let Ok(server) = TcpStream::connect(upstream.as_str()).await {
                    relay(link, server, shape).await;
                }
            });
        }
    }

    /// Accepts the clients' connections and relays each to noxious at `proxy`.
    pub(crate) async fn front(listener: TcpListener, proxy: std::net::SocketAddr) {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(link) = TcpStream::connect(proxy).await else {
                    return;
                };
                let _ = (client.set_nodelay(true), link.set_nodelay(true));
                let (client_read, client_write) = client.into_split();
                let (link_read, link_write) = link.into_split();
                tokio::join!(
                    pass(client_read, link_write, false),
                    pass(link_read, client_write, true),
                );
            });
        }
    }

    /// Passes bytes on until the reading side ends, then ends the writing side's stream;
    /// `from_noxious` acknowledges each read at once.
    async fn pass(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, from_noxious: bool) {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if from_noxious {
                quickack(&from);
            }
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// Acknowledges what has arrived at once, for the next segments too (Linux turns it off
    /// again by itself, so it is set after each read).
    fn quickack(stream: &OwnedReadHalf) {
        let _ = rustix::net::sockopt::set_tcp_quickack(AsRef::<TcpStream>::as_ref(stream), true);
    }

    async fn relay(link: TcpStream, server: TcpStream, shape: watch::Receiver<Shape>) {
        let _ = (link.set_nodelay(true), server.set_nodelay(true));
        let (link_read, link_write) = link.into_split();
        let (server_read, server_write) = server.into_split();
        let towards = towards_server(link_read, server_write);
        let back = back_to_link(server_read, link_write);
        tokio::pin!(towards, back);
        tokio::select! {
            link_write = &mut back => {
                // The upstream closed: what it sent last may still be in noxious's toxics.
                let hold: Duration = shape.borrow().longest_hold();
                let _ = tokio::time::timeout(hold, &mut towards).await;
                drop(link_write);
            }
            () = &mut towards => {
                // noxious closed (it closes both directions at once): the upstream has had
                // its end of stream; it has nowhere left to send.
            }
        }
    }

    /// Passes what noxious sends on to the upstream; once the upstream stops taking it, reads on
    /// and drops it, so that noxious's side stays open until noxious closes it. Ends the
    /// upstream's stream when noxious's ends.
    async fn towards_server(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut taken = true;
        while let Ok(n) = from.read(&mut buf).await {
            quickack(&from);
            if n == 0 {
                break;
            }
            taken = taken && to.write_all(&buf[..n]).await.is_ok();
        }
        let _ = to.shutdown().await;
    }

    /// Passes what the upstream sends to noxious until the upstream closes; returns noxious's
    /// side, still open.
    async fn back_to_link(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> OwnedWriteHalf {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        to
    }
}
