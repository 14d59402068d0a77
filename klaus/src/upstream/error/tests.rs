//! How causes are sorted into codes, and what each kind of problem tells a client.

use std::time::Duration;

use super::cause::classify;
use super::*;
use crate::upstream::transport::{ConnectTimeout, Gone};

const TARGET: &str = "petra.internal.example:8443";

fn tls(err: rustls::Error) -> BoxError {
    Box::new(err)
}

/// An alert after the handshake, as h2 hands it on: an `io::Error` keeping only the text.
fn alert_text(alert: AlertDescription) -> BoxError {
    let text = rustls::Error::AlertReceived(alert).to_string();
    Box::new(std::io::Error::other(text))
}

fn io(kind: std::io::ErrorKind) -> BoxError {
    Box::new(std::io::Error::from(kind))
}

/// Every kind of cause Klaus meets, as rustls, h2, the connector and the OS report them,
/// and what each is sorted into: (what, cause, code, where it may be retried).
fn table() -> Vec<(&'static str, BoxError, &'static str, Option<Retry>)> {
    use std::io::ErrorKind::*;
    let cert = |err| tls(rustls::Error::InvalidCertificate(err));
    vec![
        (
            "unknown issuer",
            cert(CertificateError::UnknownIssuer),
            "petra_tls_unknown_ca",
            Some(Retry::Elsewhere),
        ),
        (
            "bad signature",
            cert(CertificateError::BadSignature),
            "petra_tls_unknown_ca",
            Some(Retry::Elsewhere),
        ),
        (
            "wrong name",
            cert(CertificateError::NotValidForName),
            "petra_tls_wrong_name",
            Some(Retry::Elsewhere),
        ),
        (
            "expired",
            cert(CertificateError::Expired),
            "petra_tls_expired",
            Some(Retry::Elsewhere),
        ),
        (
            "not valid yet",
            cert(CertificateError::NotValidYet),
            "petra_tls_not_yet_valid",
            Some(Retry::Elsewhere),
        ),
        (
            "revoked",
            cert(CertificateError::Revoked),
            "petra_tls_failed",
            Some(Retry::Elsewhere),
        ),
        (
            "certificate required, in the handshake",
            tls(rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired,
            )),
            "petra_tls_client_cert_required",
            Some(Retry::Elsewhere),
        ),
        (
            "bad certificate, in the handshake",
            tls(rustls::Error::AlertReceived(
                AlertDescription::BadCertificate,
            )),
            "petra_tls_client_cert_refused",
            Some(Retry::Elsewhere),
        ),
        (
            "rustls inside io::Error, as tokio-rustls wraps it",
            Box::new(std::io::Error::other(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))),
            "petra_tls_unknown_ca",
            Some(Retry::Elsewhere),
        ),
        (
            "certificate required, after the handshake (text only)",
            alert_text(AlertDescription::CertificateRequired),
            "petra_tls_client_cert_required",
            Some(Retry::Elsewhere),
        ),
        (
            "unknown CA, after the handshake (text only)",
            alert_text(AlertDescription::UnknownCA),
            "petra_tls_client_cert_refused",
            Some(Retry::Elsewhere),
        ),
        (
            "access denied, after the handshake (text only)",
            alert_text(AlertDescription::AccessDenied),
            "petra_tls_client_cert_refused",
            Some(Retry::Elsewhere),
        ),
        (
            "another alert's text is no TLS problem",
            alert_text(AlertDescription::DecodeError),
            "petra_unreachable",
            None,
        ),
        (
            "other handshake failure",
            tls(rustls::Error::General("odd".into())),
            "petra_tls_failed",
            Some(Retry::Elsewhere),
        ),
        (
            "connection refused",
            io(ConnectionRefused),
            "petra_unreachable",
            Some(Retry::Anywhere),
        ),
        (
            "connection reset",
            io(ConnectionReset),
            "petra_unreachable",
            Some(Retry::Anywhere),
        ),
        (
            "early EOF",
            io(UnexpectedEof),
            "petra_unreachable",
            Some(Retry::Anywhere),
        ),
        (
            "reset inside the connector's Other",
            Box::new(std::io::Error::other(std::io::Error::from(ConnectionReset))),
            "petra_unreachable",
            Some(Retry::Anywhere),
        ),
        (
            "permission denied",
            io(PermissionDenied),
            "petra_unreachable",
            None,
        ),
        ("OS timeout", io(TimedOut), "petra_timeout", None),
        (
            "connect timeout",
            Box::new(ConnectTimeout(Duration::from_millis(500))),
            "petra_timeout",
            Some(Retry::Elsewhere),
        ),
        (
            "stream refused by Petra (h2)",
            Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)),
            "petra_unreachable",
            Some(Retry::Anywhere),
        ),
        (
            "stream reset for another reason (h2)",
            Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)),
            "petra_unreachable",
            None,
        ),
        (
            "endpoint gone",
            Box::new(Gone {
                ip: [10, 0, 0, 7].into(),
                host: "petra.internal.example".into(),
            }),
            "petra_unreachable",
            Some(Retry::Anywhere),
        ),
    ]
}

#[test]
fn causes_are_sorted_into_codes() {
    for (what, cause, code, retry) in table() {
        let err = classify(cause, TARGET.to_owned(), 2000);
        assert_eq!((err.code(), err.retry()), (code, retry), "{what}: {err:?}");
    }
}

/// What must never reach a client: the configured host and port, Klaus's settings and
/// TLS terms.
const INTERNAL: &[&str] = &[
    "petra.internal.example",
    "8443",
    "10.0.0.7",
    "PETRA_",
    "TLS_",
    "_FILE",
    "_MS",
    "TLS",
    "CA",
    "handshake",
    "alert",
    "os error",
    "rustls",
    "2000",
];

/// One failure of each kind, with the body it is answered with at `level`.
fn bodies(level: ErrorDetail) -> Vec<(String, serde_json::Value)> {
    let mut errors: Vec<PetraError> = table()
        .into_iter()
        .map(|(_, cause, _, _)| classify(cause, TARGET.to_owned(), 2000))
        .collect();
    errors.extend([
        PetraError::Status(StatusCode::INTERNAL_SERVER_ERROR),
        PetraError::Overloaded { retry_after: 1 },
        PetraError::TooLarge,
        PetraError::NotText,
    ]);
    errors
        .into_iter()
        .map(|err| {
            let what = format!("{err:?}");
            let response = err.response(level);
            let body = body_bytes(response);
            (what, serde_json::from_slice(&body).expect("problem JSON"))
        })
        .collect()
}

fn body_bytes(response: Response) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use http_body_util::BodyExt;
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec()
    })
}

#[test]
fn public_details_name_nothing_internal() {
    for (what, problem) in bodies(ErrorDetail::Public) {
        let text = problem.to_string();
        for word in INTERNAL {
            assert!(!text.contains(word), "{what}: {word:?} in {text}");
        }
        assert!(
            problem["code"]
                .as_str()
                .is_some_and(|code| code.starts_with("petra_"))
        );
    }
}

#[test]
fn verbose_details_name_the_target_and_the_setting() {
    let bodies = bodies(ErrorDetail::Verbose);
    let details: Vec<&str> = bodies
        .iter()
        .map(|(_, problem)| problem["detail"].as_str().unwrap_or_default())
        .collect();
    for (code, needle) in [
        ("petra_tls_unknown_ca", "PETRA_CA_FILE"),
        ("petra_tls_unknown_ca", TARGET),
        ("petra_tls_client_cert_required", "PETRA_CLIENT_CERT_FILE"),
        ("petra_tls_client_cert_refused", "TLS_CLIENT_CA_FILE"),
        ("petra_unreachable", "PETRA_URL"),
        ("petra_unreachable", TARGET),
        ("petra_timeout", "PETRA_TIMEOUT_MS"),
        ("petra_bad_status", "500"),
    ] {
        assert!(
            bodies
                .iter()
                .zip(&details)
                .any(|((_, problem), detail)| problem["code"] == code && detail.contains(needle)),
            "no verbose {code} detail names {needle:?}: {details:#?}"
        );
    }
}

#[test]
fn a_shed_request_is_answered_503_with_a_bounded_retry_after() {
    let mut headers = HeaderMap::new();
    assert_eq!(retry_after(&headers), 1, "none given");
    for (given, passed) in [("1", 1), ("7", 7), ("0", 1), ("3600", 30), ("soon", 1)] {
        headers.insert(RETRY_AFTER, HeaderValue::from_static(given));
        assert_eq!(retry_after(&headers), passed, "{given}");
    }
    headers.insert(
        RETRY_AFTER,
        HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
    );
    assert_eq!(retry_after(&headers), 1, "a date");

    let err = PetraError::Overloaded { retry_after: 7 };
    assert_eq!(err.retry(), Some(Retry::Elsewhere));
    assert!(!err.counts_against_endpoint());
    let response = err.response(ErrorDetail::Public);
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[RETRY_AFTER], "7");
}
