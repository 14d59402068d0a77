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
}

fn main() -> ExitCode {
    let args = Args::parse();
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
