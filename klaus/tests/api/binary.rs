//! The built `klaus` binary: invalid configuration exits 2 with one line naming the variable,
//! and a request in flight when SIGTERM arrives still completes.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use serving::testing::{Binary, TestPki, assert_config_errors, plain_client, wait_until};
use tokio::sync::Notify;

use crate::helpers::spawn_fake_petra;

const EXE: &str = env!("CARGO_BIN_EXE_klaus");

#[test]
fn invalid_configuration_exits_2_with_one_line_naming_the_variable() {
    let pki = TestPki::new();
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let empty = empty.to_str().expect("path");
    let cert = pki.klaus.cert.to_str().expect("path");
    let key = pki.klaus.key.to_str().expect("path");
    let wrong_key = pki.petra.key.to_str().expect("path");
    let url = ("PETRA_URL", "https://petra:8443");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "PETRA_URL"),
        (
            &[("PETRA_URL", "http://petra:8443")],
            "PETRA_URL: 'http://petra:8443' uses http",
        ),
        (&[("PETRA_URL", "petra")], "PETRA_URL"),
        (&[("PETRA_URL", "https://")], "PETRA_URL"),
        (
            &[url, ("PETRA_CA_FILE", "/nonexistent.pem")],
            "PETRA_CA_FILE: cannot read /nonexistent.pem",
        ),
        (&[url, ("PETRA_CA_FILE", empty)], "PETRA_CA_FILE: "),
        (
            &[url, ("PETRA_CLIENT_CERT_FILE", cert)],
            "PETRA_CLIENT_KEY_FILE: is not set",
        ),
        (
            &[
                url,
                ("PETRA_CLIENT_CERT_FILE", cert),
                ("PETRA_CLIENT_KEY_FILE", wrong_key),
            ],
            "does not match",
        ),
        (
            &[
                url,
                ("PETRA_CLIENT_CERT_FILE", cert),
                ("PETRA_CLIENT_KEY_FILE", empty),
            ],
            "PETRA_CLIENT_KEY_FILE: ",
        ),
        (&[url, ("PETRA_TIMEOUT_MS", "soon")], "PETRA_TIMEOUT_MS"),
        (
            &[("PETRA_URL", "https://petra:8443,,https://petra.other:8443")],
            "PETRA_URL: has an empty entry at position 2",
        ),
        (
            &[("PETRA_URL", "https://petra:8443,http://petra.other:8443")],
            "PETRA_URL: 'http://petra.other:8443' uses http",
        ),
        (&[url, ("PETRA_EJECT_AFTER", "0")], "PETRA_EJECT_AFTER"),
        // Numbers that overflowed a duration once used (a panic, and panic = abort).
        (
            &[url, ("MAX_CONNECTION_AGE_SECONDS", "18446744073709551615")],
            "MAX_CONNECTION_AGE_SECONDS",
        ),
        (
            &[url, ("TLS_RELOAD_INTERVAL_SECONDS", "18446744073709551615")],
            "TLS_RELOAD_INTERVAL_SECONDS",
        ),
        (&[url, ("MAX_CONNECTIONS", "0")], "MAX_CONNECTIONS"),
        (
            &[url, ("PETRA_EJECTION_MS", "forever")],
            "PETRA_EJECTION_MS",
        ),
        (
            &[url, ("PETRA_RESOLVE_INTERVAL_SECONDS", "0")],
            "PETRA_RESOLVE_INTERVAL_SECONDS",
        ),
        (&[url, ("LISTEN_ADDR", "localhost")], "LISTEN_ADDR"),
        (&[url, ("TLS_KEY_FILE", key)], "TLS_CERT_FILE: is not set"),
        (&[url, ("LOG_FORMAT", "yaml")], "LOG_FORMAT"),
    ];
    assert_config_errors(EXE, cases);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_at_sigterm_completes_and_klaus_exits_0() {
    let pki = TestPki::new();
    // A Petra that holds each answer until the test lets it go.
    let arrived = std::sync::Arc::new(Notify::new());
    let release = std::sync::Arc::new(Notify::new());
    let (on_arrival, on_release) = (arrived.clone(), release.clone());
    let fake = Router::new().route(
        "/",
        get(move || {
            let (on_arrival, on_release) = (on_arrival.clone(), on_release.clone());
            async move {
                on_arrival.notify_one();
                on_release.notified().await;
                "hello"
            }
        }),
    );
    let petra = spawn_fake_petra(&pki, &pki.petra, fake).await;
    let url = petra.https_url();
    let env = [
        ("PETRA_URL", url.as_str()),
        ("PETRA_CA_FILE", pki.ca_file.to_str().expect("path")),
        (
            "PETRA_CLIENT_CERT_FILE",
            pki.klaus.cert.to_str().expect("path"),
        ),
        (
            "PETRA_CLIENT_KEY_FILE",
            pki.klaus.key.to_str().expect("path"),
        ),
        ("PETRA_TIMEOUT_MS", "20000"),
        ("SHUTDOWN_DELAY_SECONDS", "0"),
        ("SHUTDOWN_TIMEOUT_SECONDS", "20"),
    ];
    let mut klaus = Binary::start(EXE, &env);
    let in_flight = tokio::spawn(
        plain_client()
            .get(format!("http://{}/", klaus.main_addr))
            .send(),
    );
    arrived.notified().await;

    klaus.signal("TERM");
    klaus.wait_unready().await;
    // The listener stops accepting, but the request in flight is still being served.
    wait_until(
        "the main listener stops accepting",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(klaus.main_addr)
                .await
                .is_err()
        },
    )
    .await;
    assert!(
        klaus.child.try_wait().expect("try_wait").is_none(),
        "Klaus exited with a request in flight"
    );
    release.notify_one();
    let response = in_flight
        .await
        .expect("task")
        .expect("the request in flight completes");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await.expect("body"), "hello world");
    let status = tokio::task::block_in_place(|| klaus.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0));
    petra.stop().await;
}
