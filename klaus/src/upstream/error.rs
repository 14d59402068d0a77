//! The errors a call to Petra can end in, sorted out of the client's chain of causes, each
//! answered as an RFC 9457 problem whose `code` says what failed; and whether another attempt
//! may take the call.
//!
//! The client gets a detail that names nothing internal (no host, address, port, setting or
//! TLS state: [`ErrorDetail::Public`]); the log gets the whole cause, and an operator running
//! Klaus locally may ask for the detail that says what to fix ([`ErrorDetail::Verbose`]).

pub(crate) mod cause;

use std::borrow::Cow;

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rustls::{AlertDescription, CertificateError};

use super::config::ErrorDetail;
use super::transport::BoxError;

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
