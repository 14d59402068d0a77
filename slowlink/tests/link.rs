//! The link delays each round trip by its shape, and a new shape takes effect on open
//! connections.

use std::time::{Duration, Instant};

use slowlink::{Link, Shape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on a free port.
async fn echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    stream.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");
    started.elapsed()
}

#[tokio::test]
async fn a_round_trip_takes_the_shape_and_a_new_shape_applies_to_open_connections() {
    let upstream = echo().await;
    let mut link = Link::start(
        upstream,
        Shape::new(Duration::from_millis(60), Duration::ZERO),
    )
    .await
    .expect("link");
    let mut stream = TcpStream::connect(link.addr()).await.expect("connect");
    for _ in 0..3 {
        let rtt = round_trip(&mut stream).await;
        assert!(
            rtt >= Duration::from_millis(60) && rtt < Duration::from_millis(200),
            "a 60 ms link took {rtt:?}"
        );
    }
    link.reshape(Shape::NONE).await.expect("reshape");
    // The first round trip may still meet a toxic that was holding a chunk when it was removed.
    round_trip(&mut stream).await;
    let rtt = round_trip(&mut stream).await;
    assert!(
        rtt < Duration::from_millis(30),
        "an undelayed link took {rtt:?}"
    );
    link.reshape(Shape::new(
        Duration::from_millis(100),
        Duration::from_millis(40),
    ))
    .await
    .expect("reshape");
    let rtts: Vec<_> = round_trips(&mut stream, 5).await;
    for rtt in &rtts {
        assert!(
            *rtt >= Duration::from_millis(60) && *rtt < Duration::from_millis(300),
            "a 100 ± 40 ms link took {rtt:?}"
        );
    }
}

async fn round_trips(stream: &mut TcpStream, n: usize) -> Vec<Duration> {
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        rtts.push(round_trip(stream).await);
    }
    rtts
}

/// A server that reads what the client sends first, answers `last words` and closes at once, as
/// a TLS server does when it refuses a client's certificate.
async fn answers_and_closes() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 5];
            if stream.read_exact(&mut buf).await.is_ok() {
                let _ = stream.write_all(b"last words").await;
            }
        }
    });
    addr
}

#[tokio::test]
async fn what_the_server_sends_before_it_closes_crosses_the_link() {
    // noxious alone drops the chunk its toxic holds when the server closes; the client would
    // read an end of stream and nothing else.
    let link = Link::start(
        answers_and_closes().await,
        Shape::new(Duration::from_millis(100), Duration::from_millis(20)),
    )
    .await
    .expect("link");
    let mut stream = TcpStream::connect(link.addr()).await.expect("connect");
    // More than the server reads, as a client that sends its request right after its
    // handshake: the server's system answers them with a reset when it closes.
    stream.write_all(b"hello").await.expect("write");
    stream.write_all(b" and more").await.expect("write");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got).await;
    assert_eq!(got, b"last words");
}
