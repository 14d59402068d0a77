//! The errors a call to Petra can end in, sorted out of the client's chain of causes, each
//! answered as an RFC 9457 problem whose `code` says what failed; and whether another attempt
//! may take the call.
//!
//! The client gets a detail that names nothing internal (no host, address, port, setting or
//! TLS state: [`ErrorDetail::Public`]); the log gets the whole cause, and an operator running
//! Klaus locally may ask for the detail that says what to fix ([`ErrorDetail::Verbose`]).

use std::borrow::Cow;

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rustls::{AlertDescription, CertificateError};

use super::config::ErrorDetail;
use super::transport::{BoxError, ConnectTimeout, Gone};

/// The largest body Klaus accepts from Petra.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Checks Petra's body: at most [`MAX_BODY_BYTES`], UTF-8 text.
pub fn body_text(body: Vec<u8>) -> Result<String, PetraError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(PetraError::TooLarge);
    }
    String::from_utf8(body).map_err(|_| PetraError::NotText)
}

/// What went wrong with a TLS connection to Petra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsProblem {
    /// Petra's certificate does not chain to a trusted CA.
    UnknownCa,
    /// Petra's certificate is not valid for the host in PETRA_URL.
    WrongName,
    /// Petra's certificate has expired.
    Expired,
    /// Petra's certificate is not valid yet.
    NotYetValid,
    /// Petra asked for a client certificate and Klaus has none.
    ClientCertRequired,
    /// Petra refused Klaus's client certificate.
    ClientCertRefused,
    /// Any other handshake failure.
    Other,
}

impl TlsProblem {
    fn of(err: &rustls::Error) -> Self {
        match err {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Self::WrongName,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                _ => Self::Other,
            },
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
                Self::ClientCertRequired
            }
            rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied,
            ) => Self::ClientCertRefused,
            _ => Self::Other,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Self::UnknownCa => "petra_tls_unknown_ca",
            Self::WrongName => "petra_tls_wrong_name",
            Self::Expired => "petra_tls_expired",
            Self::NotYetValid => "petra_tls_not_yet_valid",
            Self::ClientCertRequired => "petra_tls_client_cert_required",
            Self::ClientCertRefused => "petra_tls_client_cert_refused",
            Self::Other => "petra_tls_failed",
        }
    }

    /// What went wrong, for any client: no name, address, setting or TLS term.
    fn public_detail(self) -> &'static str {
        match self {
            Self::UnknownCa => "Klaus does not trust Petra's certificate",
            Self::WrongName => "Petra's certificate is not valid for the name Klaus calls it by",
            Self::Expired => "Petra's certificate has expired",
            Self::NotYetValid => "Petra's certificate is not valid yet",
            Self::ClientCertRequired => "Petra asked for a client certificate and Klaus has none",
            Self::ClientCertRefused => "Petra refused Klaus's client certificate",
            Self::Other => "Klaus could not open a secure connection to Petra",
        }
    }

    /// What went wrong and what to fix, for an operator: names `target` and the setting.
    fn verbose_detail(self, target: &str) -> String {
        match self {
            Self::UnknownCa => format!(
                "Petra's certificate at {target} is not signed by a CA Klaus trusts; put Petra's CA in PETRA_CA_FILE"
            ),
            Self::WrongName => format!(
                "Petra's certificate is not valid for {target}; make PETRA_URL use a name the certificate carries, or reissue it"
            ),
            Self::Expired => format!("Petra's certificate at {target} has expired; renew it"),
            Self::NotYetValid => {
                format!(
                    "Petra's certificate at {target} is not valid yet; check its dates and the clocks"
                )
            }
            Self::ClientCertRequired => format!(
                "Petra at {target} requires a client certificate; set PETRA_CLIENT_CERT_FILE and PETRA_CLIENT_KEY_FILE"
            ),
            Self::ClientCertRefused => format!(
                "Petra at {target} refused Klaus's client certificate; it must be issued by the CA in Petra's TLS_CLIENT_CA_FILE and be valid"
            ),
            Self::Other => format!("the TLS handshake with Petra at {target} failed"),
        }
    }
}

/// Why a call to Petra failed. Each variant's doc names the status Klaus answers with.
#[derive(Debug, thiserror::Error)]
pub enum PetraError {
    /// 504: Petra did not answer within PETRA_TIMEOUT_MS.
    #[error("Petra did not answer within {timeout_ms} ms")]
    Timeout {
        /// The deadline.
        timeout_ms: u64,
        /// Whether it was connecting that took too long, so that the request was not sent.
        connecting: bool,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// 502: Petra's certificate, or Klaus's, was not accepted.
    #[error("TLS with Petra failed: {problem:?}")]
    Tls {
        /// What went wrong.
        problem: TlsProblem,
        /// Where Klaus tried to connect.
        target: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// 502: Petra could not be reached, or the connection broke.
    #[error("{detail}")]
    Unreachable {
        /// What happened, for an operator: names hosts and settings.
        detail: String,
        /// What happened, for any client.
        public: &'static str,
        /// Whether the request surely did not reach Petra's handler, or the connection died
        /// under it, so that another attempt on a fresh connection may succeed.
        retryable: bool,
        /// Whether the connection closed under the request with no reason given: over HTTP/2
        /// that is how a client certificate refused after the handshake can look, so a retry
        /// goes over a fresh HTTP/1.1 connection, where the refusal is named.
        unexplained: bool,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// 503: Petra shed the request (503, as its admission control answers when it is full):
    /// the client is told to come back after `retry_after` seconds, Petra's own hint.
    #[error("Petra is overloaded: it answered 503, Retry-After {retry_after} s")]
    Overloaded {
        /// Seconds, from Petra's `Retry-After`, within [`RETRY_AFTER_SECONDS`].
        retry_after: u64,
    },
    /// 502: Petra answered with a status other than 2xx (and other than 503).
    #[error("Petra answered with status {0}")]
    Status(StatusCode),
    /// 502: Petra's body was over [`MAX_BODY_BYTES`].
    #[error("Petra's answer is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// 502: Petra's body was not UTF-8 text.
    #[error("Petra's answer is not UTF-8 text")]
    NotText,
}

/// The range Klaus keeps Petra's `Retry-After` in: at least a second, and no more than 30, so
/// that neither a missing or odd value nor a large one (from Petra or anything in front of
/// it) tells clients to hammer or to stay away for long over a queue that empties in
/// `REQUEST_QUEUE_TIMEOUT_MS`.
pub const RETRY_AFTER_SECONDS: std::ops::RangeInclusive<u64> = 1..=30;

/// The `Retry-After` Klaus passes on for Petra's 503: Petra's delay in seconds, within
/// [`RETRY_AFTER_SECONDS`]; the smallest when Petra gave none or a date (Petra sends seconds).
pub fn retry_after(headers: &HeaderMap) -> u64 {
    let (min, max) = (*RETRY_AFTER_SECONDS.start(), *RETRY_AFTER_SECONDS.end());
    headers
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map_or(min, |seconds| seconds.clamp(min, max))
}

/// Where a failed attempt may be tried again: it did not reach Petra's handler, as far as
/// Klaus can tell (a reset or an early end of the connection could in principle come after
/// Petra handled the request; for `GET /` a second answer does no harm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// On another endpoint, or on a fresh connection to the same one: the connection was
    /// refused, reset or closed under the request, or Petra refused the stream unprocessed.
    Anywhere,
    /// On another endpoint only: connecting timed out, the TLS handshake failed, or Petra shed
    /// the request. The same endpoint would most likely do the same again.
    Elsewhere,
}

impl PetraError {
    /// Where another attempt may take the call, if anywhere.
    pub fn retry(&self) -> Option<Retry> {
        match self {
            Self::Unreachable {
                retryable: true, ..
            } => Some(Retry::Anywhere),
            // A shed request was not worked on: another replica may have room. The retry
            // budget keeps these retries from adding more than a tenth to a Petra that is
            // full everywhere.
            Self::Timeout {
                connecting: true, ..
            }
            | Self::Tls { .. }
            | Self::Overloaded { .. } => Some(Retry::Elsewhere),
            _ => None,
        }
    }

    /// Whether a retry should go over a fresh HTTP/1.1 connection rather than the next
    /// endpoint's pooled one.
    pub fn wants_fresh_connection(&self) -> bool {
        matches!(
            self,
            Self::Unreachable {
                unexplained: true,
                ..
            }
        )
    }

    /// Whether the failure counts against the endpoint in outlier detection: it could not be
    /// reached, failed the handshake, was too slow, or answered 5xx. A shed request does not:
    /// a replica that is merely full is healthy, and ejecting it would pour its share onto the
    /// others, which are likely just as full (a cascade).
    pub fn counts_against_endpoint(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Tls { .. } | Self::Unreachable { .. } => true,
            Self::Status(status) => status.is_server_error(),
            Self::Overloaded { .. } | Self::TooLarge | Self::NotText => false,
        }
    }

    /// The outcome label in the metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Tls { .. } => "tls_error",
            Self::Unreachable { .. } => "unreachable",
            Self::Overloaded { .. } => "overloaded",
            Self::Status(_) => "bad_status",
            Self::TooLarge | Self::NotText => "bad_body",
        }
    }

    /// The status Klaus answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// A machine-readable code for the problem body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "petra_timeout",
            Self::Tls { problem, .. } => problem.code(),
            Self::Unreachable { .. } => "petra_unreachable",
            Self::Overloaded { .. } => "petra_overloaded",
            Self::Status(_) => "petra_bad_status",
            Self::TooLarge => "petra_body_too_large",
            Self::NotText => "petra_body_not_text",
        }
    }

    /// The problem's detail. [`ErrorDetail::Public`]: what failed, naming no host, address,
    /// port, setting or TLS state. [`ErrorDetail::Verbose`]: what failed and what to fix, in
    /// words an operator can act on.
    pub fn detail(&self, level: ErrorDetail) -> Cow<'static, str> {
        match level {
            ErrorDetail::Public => Cow::Borrowed(self.public_detail()),
            ErrorDetail::Verbose => Cow::Owned(self.verbose_detail()),
        }
    }

    fn public_detail(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "Petra did not answer in time",
            Self::Tls { problem, .. } => problem.public_detail(),
            Self::Unreachable { public, .. } => public,
            Self::Overloaded { .. } => {
                "Petra is overloaded; try again after the delay in Retry-After"
            }
            Self::Status(_) => "Petra answered with an error",
            Self::TooLarge => "Petra's answer is too large",
            Self::NotText => "Petra's answer is not text",
        }
    }

    fn verbose_detail(&self) -> String {
        match self {
            Self::Timeout { timeout_ms, .. } => {
                format!("Petra did not answer within {timeout_ms} ms (PETRA_TIMEOUT_MS)")
            }
            Self::Tls {
                problem, target, ..
            } => problem.verbose_detail(target),
            other => other.to_string(),
        }
    }

    /// The answer to the client: an RFC 9457 problem with the detail `level` allows, and for
    /// a shed request Petra's `Retry-After`. The whole cause goes to the log at warn.
    pub fn response(self, level: ErrorDetail) -> Response {
        let status = self.status();
        tracing::warn!(code = self.code(), status = status.as_u16(), error = %Chain(&self), "call to Petra failed");
        let body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Bad Gateway"),
            "status": status.as_u16(),
            "detail": self.detail(level),
            "code": self.code(),
        });
        let mut response = (
            status,
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body.to_string(),
        )
            .into_response();
        if let Self::Overloaded { retry_after } = self {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after));
        }
        response
    }
}

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

/// The cause chain of an error on one line, for the log.
pub(crate) struct Chain<'a>(pub(crate) &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(current) = cause {
            write!(f, ": {current}")?;
            cause = current.source();
        }
        Ok(())
    }
}

/// The public answer ([`PetraError::response`] with [`ErrorDetail::Public`]).
impl IntoResponse for PetraError {
    fn into_response(self) -> Response {
        self.response(ErrorDetail::Public)
    }
}

#[cfg(test)]
mod tests;
