//! One shutdown path for SIGTERM and SIGINT: the first signal starts a graceful shutdown, a
//! second one ends the process at once.

use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

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

/// SIGTERM and SIGINT, listened for from the moment [`Signals::listen`] returns: a signal
/// that arrives before the service is ready to wait for it is kept, not lost to the default
/// action (which would kill the process without a graceful shutdown).
#[derive(Debug)]
pub struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Signals {
    /// Starts listening. Call it inside the runtime, before the service says it is serving.
    pub fn listen() -> Self {
        let listen = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|err| tracing::error!(error = %err, "cannot listen for {name}"))
                .ok()
        };
        Self {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            int: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves on the first SIGTERM or SIGINT. From then on, a second signal exits the
    /// process immediately with [`EXIT_FORCED`].
    pub async fn first(mut self) {
        let name = self.next().await;
        tracing::info!(
            signal = name,
            "shutdown requested; a second signal stops at once"
        );
        tokio::spawn(async move {
            let name = self.next().await;
            tracing::warn!(signal = name, "second signal; exiting without draining");
            std::process::exit(EXIT_FORCED);
        });
    }

    /// Waits for the next SIGTERM or SIGINT and names it.
    async fn next(&mut self) -> &'static str {
        async fn recv(stream: Option<&mut Signal>) {
            match stream {
                Some(stream) => {
                    stream.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(self.term.as_mut()) => "SIGTERM",
            () = recv(self.int.as_mut()) => "SIGINT",
        }
    }
}
