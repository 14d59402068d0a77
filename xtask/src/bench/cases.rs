//! The cases: which URL is loaded, over how many connections and in which way, and in what
//! order they run.

use super::options::Options;
use super::stack::{
    KLAUS_HTTP, KLAUS_HTTPS, KLAUS_WARN, NGINX_KLAUS, NGINX_KLAUS_HTTP, NGINX_KLAUS_HTTPS,
    NGINX_PETRA, PETRA, PETRA_WARN,
};

/// The concurrency levels every keep-alive case runs at.
pub(super) const CONNECTIONS: [usize; 3] = [1, 64, 512];

/// Connections of the churn, logging and HTTP/2 cases, and of the budget's comparisons.
pub(super) const BUDGET_CONNECTIONS: usize = 64;

/// How a case's client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// HTTP/1.1, keep-alive.
    KeepAlive,
    /// A new connection (and TLS handshake) for every request.
    Churn,
    /// HTTP/2, one stream per connection at a time.
    Http2,
}

/// A URL under load and the processes that serve it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
    /// The URL's key in [`Stack::urls`](super::stack::Stack::urls).
    pub(super) key: &'static str,
    /// The service measured, for `--only`.
    pub(super) service: &'static str,
    /// Our code (its errors count against the budget) or the nginx reference.
    pub(super) ours: bool,
    /// The process groups whose CPU time a request costs.
    pub(super) cpu: &'static [&'static str],
}

pub(super) const fn target(
    key: &'static str,
    service: &'static str,
    ours: bool,
    cpu: &'static [&'static str],
) -> Target {
    Target {
        key,
        service,
        ours,
        cpu,
    }
}

/// The main targets, ours and the reference's alternating.
pub(super) const TARGETS: [Target; 6] = [
    target(PETRA, "petra", true, &[PETRA]),
    target(NGINX_PETRA, "petra", false, &[NGINX_PETRA]),
    target(KLAUS_HTTPS, "klaus", true, &[KLAUS_HTTPS, PETRA]),
    target(
        NGINX_KLAUS_HTTPS,
        "klaus",
        false,
        &[NGINX_KLAUS, NGINX_PETRA],
    ),
    target(KLAUS_HTTP, "klaus", true, &[KLAUS_HTTP, PETRA]),
    target(
        NGINX_KLAUS_HTTP,
        "klaus",
        false,
        &[NGINX_KLAUS, NGINX_PETRA],
    ),
];

/// One measured load.
#[derive(Debug, Clone)]
pub(super) struct Case {
    pub(super) id: String,
    pub(super) target: Target,
    pub(super) conns: usize,
    pub(super) mode: Mode,
}

/// Every case. Ours and the reference's run next to each other at each step, so that a change
/// in the machine's load hits both.
pub(super) fn cases(options: &Options) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut push = |target: Target, conns: usize, mode: Mode| {
        if options.measures(target.service) {
            let kind = match mode {
                Mode::KeepAlive => "c",
                Mode::Churn => "churn-c",
                Mode::Http2 => "h2-c",
            };
            cases.push(Case {
                id: format!("{}/{kind}{conns}", target.key),
                target,
                conns,
                mode,
            });
        }
    };
    // The budget's cases first, while the machine is most likely as quiet as it was when the
    // run started; logging's cost (RUST_LOG=warn) and Petra's HTTP/2 path right beside them.
    for t in TARGETS {
        push(t, BUDGET_CONNECTIONS, Mode::KeepAlive);
    }
    let petra_warn = target(PETRA_WARN, "petra", true, &[PETRA_WARN]);
    let klaus_warn = target(KLAUS_WARN, "klaus", true, &[KLAUS_WARN, PETRA_WARN]);
    push(petra_warn, BUDGET_CONNECTIONS, Mode::KeepAlive);
    push(klaus_warn, BUDGET_CONNECTIONS, Mode::KeepAlive);
    push(TARGETS[0], BUDGET_CONNECTIONS, Mode::Http2);
    for conns in CONNECTIONS.into_iter().filter(|&c| c != BUDGET_CONNECTIONS) {
        for t in TARGETS {
            push(t, conns, Mode::KeepAlive);
        }
    }
    for t in TARGETS {
        push(t, BUDGET_CONNECTIONS, Mode::Churn);
    }
    cases
}

/// A case in words, for the table.
pub(super) fn describe(case: &Case) -> String {
    let what = match case.target.key {
        PETRA => "Petra direct (mTLS)",
        PETRA_WARN => "Petra direct (mTLS), RUST_LOG=warn",
        KLAUS_HTTPS => "Klaus e2e, HTTPS front",
        KLAUS_HTTP => "Klaus e2e, HTTP front",
        KLAUS_WARN => "Klaus e2e, HTTPS front, RUST_LOG=warn",
        NGINX_PETRA => "nginx as Petra (mTLS)",
        NGINX_KLAUS_HTTPS => "nginx pair e2e, HTTPS front",
        NGINX_KLAUS_HTTP => "nginx pair e2e, HTTP front",
        other => other,
    };
    match case.mode {
        Mode::KeepAlive => what.to_owned(),
        Mode::Churn => format!("{what}, new connection per request"),
        Mode::Http2 => format!("{what}, HTTP/2"),
    }
}
