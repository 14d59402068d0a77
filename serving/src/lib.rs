//! What Petra and Klaus share: configuration, TLS, the HTTP server, the admin port, metrics,
//! telemetry and graceful shutdown.
//!
//! A service built on this crate reads one typed configuration at startup ([`config`]), loads
//! and checks its TLS files before binding ([`tls`]), binds its listeners ([`server::Bound`]),
//! and runs until a signal asks it to stop ([`shutdown`]): readiness turns false at once, the
//! main listener keeps serving for a delay, then drains under a deadline.

pub mod admin;
pub mod admission;
#[cfg(feature = "certs")]
pub mod certs;
pub mod config;
pub mod contract;
pub mod error;
pub mod expiry;
pub mod healthcheck;
pub mod memory;
pub mod metrics;
pub mod observe;
pub mod process;
pub mod propagate;
pub mod server;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod tls;
pub mod trace;

pub use config::ServeArgs;
pub use error::ConfigError;
pub use server::{Bound, Service};

use std::process::ExitCode;

/// Runs a service the way both binaries do: logging, then the service built and bound (a
/// configuration error exits with status 2 and one line naming the variable), then serving
/// until SIGTERM or SIGINT. Returns the exit status: 0 after a graceful shutdown.
pub fn run(build: impl FnOnce() -> Result<Service, ConfigError>, args: &ServeArgs) -> ExitCode {
    if let Err(err) = telemetry::init(args.log_format) {
        return err.exit();
    }
    let service = match build() {
        Ok(service) => service,
        Err(err) => return err.exit(),
    };
    let runtime = match runtime(args.worker_threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let status = runtime.block_on(async {
        // Before the service binds and says it is serving, so that an early SIGTERM still
        // drains instead of killing the process.
        let signals = shutdown::Signals::listen();
        let bound = match service.bind().await {
            Ok(bound) => bound,
            Err(err) => return err.exit(),
        };
        bound.serve(signals.first()).await;
        ExitCode::SUCCESS
    });
    // Tasks still running on other worker threads may log until the runtime is gone.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    // The spans of the last requests, sent while the process can still wait a little.
    trace::shutdown(std::time::Duration::from_secs(2));
    telemetry::flush();
    status
}

/// The async runtime for `workers` threads: one thread runs a current-thread runtime (no work
/// stealing, no wake-ups across threads), more a multi-threaded one.
fn runtime(workers: u16) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(workers));
        builder
    };
    builder.enable_all().build()
}
