//! Sorting a client error into a [`PetraError`] by walking its chain of causes: timeouts, TLS
//! problems (also when only an alert's text survives), the innermost I/O error, and whether
//! Petra refused a request unprocessed.

use rustls::AlertDescription;

use super::{PetraError, TlsProblem};
use crate::upstream::transport::{BoxError, ConnectTimeout, Gone};

/// Whether Petra refused the request unprocessed, so that it may be sent again at once: a
/// stream Petra reset with `REFUSED_STREAM`, or one a graceful `GOAWAY` came before.
pub(crate) fn is_refused(err: &hyper_util::client::legacy::Error) -> bool {
    use std::error::Error as _;
    // The client's error wraps hyper's, which wraps h2's.
    let Some(h2) = err
        .source()
        .and_then(|hyper| hyper.source())
        .and_then(|cause| cause.downcast_ref::<h2::Error>())
    else {
        return false;
    };
    h2.is_remote()
        && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
            || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Whether `err` is a timeout: connecting took longer than its share of the deadline, or an
/// HTTP/2 ping went unanswered.
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if current.is::<tokio::time::error::Elapsed>()
            || current.is::<ConnectTimeout>()
            || current
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
            || current
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Whether connecting timed out somewhere in `err`'s chain.
fn is_connect_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    find::<ConnectTimeout>(err).is_some()
}

/// The first error of type `E` in `err`'s chain of causes.
fn find<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        cause = current.source();
    }
    None
}

/// The public details of [`PetraError::Unreachable`].
pub(crate) const UNREACHABLE: &str = "Petra could not be reached";
const REFUSED: &str = "Petra refused the connection";
const CLOSED: &str = "the connection to Petra closed before Petra answered";
const FAILED: &str = "the call to Petra failed before Petra answered";

/// Sorts a client error into a [`PetraError`] by looking through its chain of causes.
pub(crate) fn classify(err: BoxError, target: String, timeout_ms: u64) -> PetraError {
    if find::<Gone>(&*err).is_some() {
        return PetraError::Unreachable {
            detail: format!(
                "the Petra endpoint Klaus tried is no longer an address of {target}; Petra may be restarting or scaled down"
            ),
            public: UNREACHABLE,
            retryable: true,
            unexplained: false,
            source: err,
        };
    }
    if is_timeout(&*err) {
        return PetraError::Timeout {
            timeout_ms,
            connecting: is_connect_timeout(&*err),
            source: err,
        };
    }
    let mut io_kind = None;
    let mut closed = false;
    let mut unexplained = false;
    let mut connect = false;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    while let Some(current) = cause {
        if let Some(client) = current.downcast_ref::<hyper_util::client::legacy::Error>() {
            connect |= client.is_connect();
        }
        if let Some(problem) = tls_problem(current) {
            return PetraError::Tls {
                problem,
                target,
                source: err,
            };
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(innermost_kind(io));
        }
        if let Some(hyper) = current.downcast_ref::<hyper::Error>() {
            let ended = hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed();
            closed |= ended;
            unexplained |= ended;
        }
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            // Petra never started on a stream it refused, or one above the last it accepted
            // before going away (a replica draining for a restart).
            closed |= h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        cause = current.source();
    }
    use std::io::ErrorKind;
    let retryable = closed
        || matches!(
            io_kind,
            Some(
                ErrorKind::ConnectionRefused
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            )
        );
    let (public, detail) = match io_kind {
        Some(ErrorKind::ConnectionRefused) => (
            REFUSED,
            format!(
                "Petra refused the connection at {target}; is Petra running, and is PETRA_URL right?"
            ),
        ),
        Some(
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof,
        ) => (
            CLOSED,
            format!("the connection to Petra at {target} was closed before Petra answered"),
        ),
        _ if connect => (
            UNREACHABLE,
            format!("Klaus could not connect to Petra at {target}"),
        ),
        _ if closed => (
            CLOSED,
            format!("the connection to Petra at {target} was closed before Petra answered"),
        ),
        _ => (
            FAILED,
            format!("the call to Petra at {target} failed before Petra answered"),
        ),
    };
    PetraError::Unreachable {
        detail,
        public,
        retryable,
        unexplained: unexplained && io_kind.is_none(),
        source: err,
    }
}

/// The TLS problem `err` reports, also when it sits inside (nested) `io::Error`s, whose
/// `source` skips the error they wrap.
fn tls_problem(err: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(TlsProblem::of(tls));
    }
    let io = err.downcast_ref::<std::io::Error>()?;
    match io.get_ref() {
        Some(inner) if inner.is::<rustls::Error>() || inner.is::<std::io::Error>() => {
            tls_problem(inner)
        }
        // An alert that arrives after the handshake (TLS 1.3 checks the client certificate
        // then) ends the HTTP/2 connection; h2 hands it to each stream as an `io::Error` that
        // keeps only the alert's text. That text is rustls's own, so it is compared with what
        // rustls writes for each alert rather than with a copy of it.
        Some(inner) => {
            let text = inner.to_string();
            ALERTS_AFTER_HANDSHAKE.into_iter().find_map(|alert| {
                let received = rustls::Error::AlertReceived(alert);
                (received.to_string() == text).then(|| TlsProblem::of(&received))
            })
        }
        None => None,
    }
}

/// The alerts a server sends about the client's certificate, once the client has finished
/// its side of the handshake.
const ALERTS_AFTER_HANDSHAKE: [AlertDescription; 8] = [
    AlertDescription::CertificateRequired,
    AlertDescription::BadCertificate,
    AlertDescription::UnknownCA,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateRevoked,
    AlertDescription::AccessDenied,
];

/// The kind of the innermost `io::Error` in `io`: the connector wraps a reset or an early EOF
/// in the handshake as `Other`, and `source` skips the error an `io::Error` wraps.
fn innermost_kind(io: &std::io::Error) -> std::io::ErrorKind {
    match io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<std::io::Error>())
    {
        Some(inner) => innermost_kind(inner),
        None => io.kind(),
    }
}
