//! The link between two services made long: a TCP proxy that delays what crosses it in each
//! direction, with jitter, as a link between two clouds would. The proxy is noxious (the Rust
//! port of Toxiproxy); this crate only starts it with the toxics of a [`Shape`] and changes them
//! while it runs.
//!
//! How noxious delays, which the figures taken through it inherit: its latency toxic holds each
//! chunk it reads for the delay and reads the next one only then, so bytes that arrive while a
//! chunk is held leave with the next chunk. A byte therefore spends between one and two delays in
//! each direction, and a busy connection moves in bursts, one per delay. Chunks already read
//! queue: each waits its full delay after the one before it (Toxiproxy subtracts the time a chunk
//! has already waited; noxious does not), so under load the link also caps the rate of chunks,
//! and its throughput is the tool's, not the services'.
//!
//! noxious stops writing to one side as soon as the other side's end is read, dropping the bytes
//! its latency toxic still holds: a TLS alert that Petra sends just before it closes (a refused
//! client certificate) would never reach Klaus. A link delivers bytes before the close that
//! follows them, so noxious's upstream is a small relay ([`relay`]) that holds each close from
//! the upstream back for two of the longest one-way delays, by which time what noxious holds is
//! out. (Its slow-close toxic does not help: told to stop, it races the bytes still queued in
//! front of it.) The toxics apply to a
//! whole connection (Toxiproxy's `toxicity` picks connections, not segments), so a proxy cannot
//! drop single segments: loss is made below TCP, where a test needs it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use noxious::proxy::{ProxyConfig, ProxyRunner, Runner, Toxics};
use noxious::signal::{Close, Stop, Stopper};
use noxious::socket::TcpListener;
use noxious::toxic::{StreamDirection, Toxic, ToxicEvent, ToxicEventKind, ToxicEventResult};

mod relay;

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

    /// How long a close from the upstream is held back: two of the longest one-way delays, the
    /// most that noxious's latency toxic holds bytes for (a chunk it holds and the one behind).
    fn close_hold(self) -> Duration {
        self.round_trip + self.jitter.min(self.round_trip)
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
    relay: relay::Relay,
    shape: Shape,
}

impl Link {
    /// A link on a free port of 127.0.0.1 to `upstream`, shaped by `shape`. Runs on the calling
    /// runtime.
    pub async fn start(upstream: SocketAddr, shape: Shape) -> Result<Self, Error> {
        // noxious binds by address and does not report the port it got, so a free port is taken
        // first and handed over; another process may take it in between, hence the retries.
        let mut last = None;
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .map_err(|source| Error::Listen {
                    addr: "127.0.0.1:0".into(),
                    source,
                })?
                .port();
            match Self::bind(&format!("127.0.0.1:{port}"), &upstream.to_string(), shape).await {
                Err(Error::Listen { source, .. }) if source.kind() == io::ErrorKind::AddrInUse => {
                    last = Some(source);
                }
                other => return other,
            }
        }
        Err(Error::Listen {
            addr: "127.0.0.1:0".into(),
            source: last.unwrap_or_else(|| io::Error::other("no free port")),
        })
    }

    /// A link listening on `listen` (`host:port`) to `upstream` (`host:port`, looked up for each
    /// connection), shaped by `shape`. Runs on the calling runtime.
    pub async fn bind(listen: &str, upstream: &str, shape: Shape) -> Result<Self, Error> {
        let addr = listen.parse::<SocketAddr>().map_err(|err| Error::Listen {
            addr: listen.into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, err),
        })?;
        let name = format!("link-{addr}");
        let relay = relay::Relay::start(upstream, shape.close_hold())
            .await
            .map_err(|source| Error::Listen {
                addr: "127.0.0.1:0".into(),
                source,
            })?;
        let config = ProxyConfig {
            name: name.clone(),
            listen: listen.into(),
            upstream: relay.addr().to_string(),
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
        let (listener, info) = ProxyRunner::initialize_proxy::<TcpListener>(config, toxics)
            .await
            .map_err(|source| Error::Listen {
                addr: listen.into(),
                source,
            })?;
        let (events, receiver) = bmrng::channel(4);
        let (stop, stopper) = Stop::new();
        let (_closed, closer) = Close::new();
        tokio::spawn(ProxyRunner::run_proxy(
            listener, info, receiver, stop, closer,
        ));
        Ok(Self {
            addr,
            name,
            events,
            stopper: Some(stopper),
            relay,
            shape,
        })
    }

    /// Where the link listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shape in force.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Gives the link a new shape, for the connections open now and the ones to come.
    pub async fn reshape(&mut self, shape: Shape) -> Result<(), Error> {
        // One by one: noxious's "remove all" clears only the upstream direction.
        for toxic in self.shape.toxics() {
            self.send(ToxicEventKind::RemoveToxic(toxic.name)).await?;
        }
        for toxic in shape.toxics() {
            self.send(ToxicEventKind::AddToxic(toxic)).await?;
        }
        self.relay.set_close_hold(shape.close_hold());
        self.shape = shape;
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
    }
}
