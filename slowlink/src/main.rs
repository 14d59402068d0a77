//! `slowlink`: a TCP proxy that adds a round trip, with jitter, between two services.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// A TCP proxy that adds a round trip (half each way), with jitter, to every connection from
/// LISTEN to UPSTREAM, like a link between two clouds. Stops on SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SLOWLINK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: String,
    /// Where to forward connections (`host:port`, looked up for each connection).
    #[arg(long, env = "SLOWLINK_UPSTREAM")]
    upstream: String,
    /// Round trip to add, in milliseconds (half in each direction).
    #[arg(long, env = "SLOWLINK_RTT_MS", default_value_t = 0)]
    rtt_ms: u64,
    /// How much the round trip varies either way, in milliseconds; at most the round trip.
    #[arg(long, env = "SLOWLINK_JITTER_MS", default_value_t = 0)]
    jitter_ms: u64,
    /// Instead of proxying, check that a link listens at LISTEN (on 127.0.0.1 when it names
    /// every address) and exit 0 if it accepts a connection within 2 s, 1 if not: the image's
    /// health check, since it has no shell.
    #[arg(long)]
    healthcheck: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.healthcheck {
        return healthcheck(&args.listen);
    }
    if args.jitter_ms > args.rtt_ms {
        eprintln!(
            "error: SLOWLINK_JITTER_MS ({}) is larger than SLOWLINK_RTT_MS ({}): a round trip cannot be negative",
            args.jitter_ms, args.rtt_ms
        );
        return ExitCode::from(2);
    }
    let shape = slowlink::Shape::new(
        Duration::from_millis(args.rtt_ms),
        Duration::from_millis(args.jitter_ms),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let link = match slowlink::Link::bind(&args.listen, &args.upstream, shape).await {
            Ok(link) => link,
            Err(err) => {
                eprintln!("error: SLOWLINK_LISTEN: {err}");
                return ExitCode::from(2);
            }
        };
        println!(
            "slowlink: {} -> {}, {}",
            link.addr(),
            args.upstream,
            link.shape()
        );
        stopped().await;
        println!("slowlink: stopped");
        ExitCode::SUCCESS
    })
}

/// Connects to the link's own listening address.
fn healthcheck(listen: &str) -> ExitCode {
    let mut addr: std::net::SocketAddr = match listen.parse() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("error: SLOWLINK_LISTEN {listen:?} is not an address: {err}");
            return ExitCode::from(2);
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("unhealthy: nothing accepts connections at {addr}: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
