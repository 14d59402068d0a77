//! What Petra and Klaus share: configuration, TLS, the HTTP server, the admin port, metrics,
//! telemetry and graceful shutdown.
//!
//! A service built on this crate reads one typed configuration at startup ([`config`]), loads
//! and checks its TLS files before binding ([`tls`]), binds its listeners ([`server::Bound`]),
//! and runs until a signal asks it to stop ([`shutdown`]): readiness turns false at once, the
//! main listener keeps serving for a delay, then drains under a deadline.

pub mod admin;
#[cfg(feature = "certs")]
pub mod certs;
pub mod config;
pub mod contract;
pub mod healthcheck;
pub mod metrics;
pub mod observe;
pub mod server;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod tls;

pub use config::{ConfigError, ServeArgs};
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
        // Before the service binds and says it is serving, so that an early SIGTERM still
        // drains instead of killing the process.
        let signals = shutdown::Signals::listen();
        let bound = match service.bind().await {
            Ok(bound) => bound,
            Err(err) => return err.exit(),
        };
        bound.serve(signals.first()).await;
        ExitCode::SUCCESS
    })
}
