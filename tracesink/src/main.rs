//! `tracesink`: an OTLP/HTTP trace receiver to look at the pair's traces locally.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

/// Receives OTLP/HTTP traces (protobuf or JSON) on POST /v1/traces, prints each span as a JSON
/// line and keeps the latest in memory: GET /api/traces lists the latest traces,
/// GET /traces/{trace_id} shows one as a text waterfall. Stops on SIGTERM or SIGINT.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (OTLP/HTTP's port is 4318).
    #[arg(long, env = "TRACESINK_LISTEN", default_value = "0.0.0.0:4318")]
    listen: SocketAddr,
    /// How many spans to keep; the oldest go first.
    #[arg(long, env = "TRACESINK_SPANS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    spans: u64,
    /// Do not print the spans received.
    #[arg(long, env = "TRACESINK_QUIET")]
    quiet: bool,
    /// Instead of receiving, check that a sink answers on LISTEN (on 127.0.0.1 when it names
    /// every address) and exit 0 if it does within 2 s, 1 if not: the image's health check.
    #[arg(long)]
    healthcheck: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
        if args.healthcheck {
            return healthcheck(args.listen).await;
        }
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("error: cannot listen on {} (TRACESINK_LISTEN): {err}", args.listen);
                return ExitCode::from(2);
            }
        };
        eprintln!("tracesink: receiving OTLP/HTTP traces on {}", args.listen);
        let store = tracesink::Store::new(usize::try_from(args.spans).unwrap_or(usize::MAX));
        let app = tracesink::router(store, !args.quiet);
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(term) => { term.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        match axum::serve(listener, app).with_graceful_shutdown(stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn healthcheck(listen: SocketAddr) -> ExitCode {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let connect = tokio::net::TcpStream::connect(addr);
    match tokio::time::timeout(std::time::Duration::from_secs(2), connect).await {
        Ok(Ok(_)) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
