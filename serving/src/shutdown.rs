//! One shutdown path for SIGTERM and SIGINT: the first signal starts a graceful shutdown, a
//! second one ends the process at once.

use std::time::Duration;

/// The exit status when a second signal cuts the graceful shutdown short (128 + SIGTERM).
pub const EXIT_FORCED: i32 = 143;

/// How a graceful shutdown is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long the main listener keeps serving after the signal, while readiness is false.
    pub delay: Duration,
    /// How long requests in flight may take to finish once the listener stops accepting.
    pub drain_timeout: Duration,
}

/// Resolves on the first SIGTERM or SIGINT. From then on, a second signal exits the process
/// immediately with [`EXIT_FORCED`].
pub async fn signal() {
    let name = next_signal().await;
    tracing::info!(
        signal = name,
        "shutdown requested; a second signal stops at once"
    );
    tokio::spawn(async {
        let name = next_signal().await;
        tracing::warn!(signal = name, "second signal; exiting without draining");
        std::process::exit(EXIT_FORCED);
    });
}

/// Waits for the next SIGTERM or SIGINT and names it.
async fn next_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(stream) => Some(stream),
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM");
            None
        }
    };
    let sigterm = async {
        match term.as_mut() {
            Some(stream) => {
                stream.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = sigterm => "SIGTERM",
        result = tokio::signal::ctrl_c() => match result {
            Ok(()) => "SIGINT",
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGINT");
                std::future::pending().await
            }
        },
    }
}
