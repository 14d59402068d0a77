//! The built `petra` binary: every invalid configuration exits 2 with one line naming the
//! variable, and SIGTERM shuts it down gracefully.

use std::time::Duration;

use reqwest::StatusCode;
use serving::testing::{Binary, TestPki, assert_config_errors, client, plain_client};

const EXE: &str = env!("CARGO_BIN_EXE_petra");

#[test]
fn invalid_configuration_exits_2_with_one_line_naming_the_variable() {
    let pki = TestPki::new();
    let garbage = pki.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let cert = pki.petra.cert.to_str().expect("utf-8 path");
    let key = pki.petra.key.to_str().expect("utf-8 path");
    let other_key = pki.klaus.key.to_str().expect("utf-8 path");
    let garbage = garbage.to_str().expect("utf-8 path");
    let empty = empty.to_str().expect("utf-8 path");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "TLS_CERT_FILE, TLS_KEY_FILE: not set"),
        (&[("TLS_CERT_FILE", cert)], "TLS_KEY_FILE: is not set"),
        (
            &[("TLS_CERT_FILE", "/nonexistent.pem"), ("TLS_KEY_FILE", key)],
            "TLS_CERT_FILE: cannot read /nonexistent.pem",
        ),
        (
            &[("TLS_CERT_FILE", garbage), ("TLS_KEY_FILE", key)],
            "TLS_CERT_FILE: ",
        ),
        (
            &[("TLS_CERT_FILE", empty), ("TLS_KEY_FILE", key)],
            "holds no PEM certificate",
        ),
        (
            &[("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", cert)],
            "TLS_KEY_FILE: ",
        ),
        (
            &[("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", other_key)],
            "does not match the certificate",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("TLS_CLIENT_CA_FILE", empty),
            ],
            "TLS_CLIENT_CA_FILE: ",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("LISTEN_ADDR", "nowhere"),
            ],
            "LISTEN_ADDR",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("ADMIN_ADDR", "1.2.3.4:99999"),
            ],
            "ADMIN_ADDR",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("LOG_FORMAT", "xml"),
            ],
            "LOG_FORMAT",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("RUST_LOG", "=["),
            ],
            "RUST_LOG",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("SHUTDOWN_DELAY_SECONDS", "-1"),
            ],
            "SHUTDOWN_DELAY_SECONDS",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("WORKER_THREADS", "0"),
            ],
            "WORKER_THREADS",
        ),
    ];
    assert_config_errors(EXE, cases);
}

#[test]
fn help_and_version_exit_0() {
    for flag in ["--help", "--version"] {
        let output = std::process::Command::new(EXE)
            .arg(flag)
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(0), "{flag}");
    }
    let help = std::process::Command::new(EXE)
        .arg("--help")
        .output()
        .expect("run");
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "LISTEN_ADDR",
        "ADMIN_ADDR",
        "TLS_CERT_FILE",
        "TLS_KEY_FILE",
        "TLS_CLIENT_CA_FILE",
        "SHUTDOWN_DELAY_SECONDS",
        "SHUTDOWN_TIMEOUT_SECONDS",
        "LOG_FORMAT",
        "WORKER_THREADS",
    ] {
        assert!(help.contains(var), "--help does not document {var}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_turns_unready_keeps_serving_through_the_delay_then_exits_0() {
    graceful_shutdown("1").await;
}

/// The same on the multi-threaded runtime, which more than one worker thread selects.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_same_with_four_worker_threads() {
    graceful_shutdown("4").await;
}

async fn graceful_shutdown(worker_threads: &str) {
    let pki = TestPki::new();
    let env = [
        ("TLS_CERT_FILE", pki.petra.cert.to_str().expect("path")),
        ("TLS_KEY_FILE", pki.petra.key.to_str().expect("path")),
        ("TLS_CLIENT_CA_FILE", pki.ca_file.to_str().expect("path")),
        ("SHUTDOWN_DELAY_SECONDS", "2"),
        ("WORKER_THREADS", worker_threads),
    ];
    let mut petra = Binary::start(EXE, &env);
    let admin = plain_client();
    let readyz = petra.admin_url("/readyz");
    assert_eq!(
        admin.get(&readyz).send().await.expect("readyz").status(),
        StatusCode::OK
    );
    // healthcheck probes the same admin port.
    let health = std::process::Command::new(EXE)
        .arg("healthcheck")
        .env("ADMIN_ADDR", petra.admin_addr.to_string())
        .status()
        .expect("healthcheck");
    assert!(health.success());

    petra.signal("TERM");
    petra.wait_unready().await;
    let url = format!("https://localhost:{}", petra.main_addr.port());
    let hello = client(&pki.ca_file, Some(&pki.klaus))
        .get(&url)
        .send()
        .await
        .expect("served during the delay");
    assert_eq!(hello.text().await.expect("body"), "hello");

    let status = tokio::task::block_in_place(|| petra.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0));
    // Every line reached stdout before the exit, the request's among them (lines are
    // written in batches).
    let mut lines = Vec::new();
    while let Ok(line) = petra.lines.recv_timeout(Duration::from_secs(5)) {
        lines.push(line);
    }
    assert!(
        lines
            .iter()
            .any(|line| line.contains(r#""message":"request""#)),
        "{lines:?}"
    );
    assert!(
        lines.last().is_some_and(|line| line.contains("stopped")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once() {
    let pki = TestPki::new();
    let env = [
        ("TLS_CERT_FILE", pki.petra.cert.to_str().expect("path")),
        ("TLS_KEY_FILE", pki.petra.key.to_str().expect("path")),
        ("SHUTDOWN_DELAY_SECONDS", "60"),
    ];
    let mut petra = Binary::start(EXE, &env);
    petra.signal("TERM");
    petra.wait_unready().await;
    petra.signal("INT");
    let status = tokio::task::block_in_place(|| petra.wait_exit(Duration::from_secs(5)));
    assert_eq!(status.code(), Some(143));
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_a_burst_of_connections_freed_goes_back_to_the_system() {
    const CONNECTIONS: usize = 800;
    let pki = TestPki::new();
    let env = [
        ("TLS_CERT_FILE", pki.petra.cert.to_str().expect("path")),
        ("TLS_KEY_FILE", pki.petra.key.to_str().expect("path")),
        ("TLS_CLIENT_CA_FILE", pki.ca_file.to_str().expect("path")),
    ];
    let petra = Binary::start(EXE, &env);
    let pid = petra.child.id();
    let url = format!("https://localhost:{}", petra.main_addr.port());
    let idle = rss_kib(pid);

    // Every client holds its own connection, with one request answered on it.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let client = client(&pki.ca_file, Some(&pki.klaus));
        let url = url.clone();
        calls.spawn(async move {
            let answer = client.get(&url).send().await.expect("hello");
            assert_eq!(answer.text().await.expect("body"), "hello");
            client
        });
    }
    let mut clients = Vec::new();
    while let Some(client) = calls.join_next().await {
        clients.push(client.expect("call"));
    }
    let loaded = rss_kib(pid);
    assert!(
        loaded > idle + 8 * 1024,
        "{CONNECTIONS} connections should take memory: {idle} -> {loaded} KiB"
    );
    drop(clients);

    // Once the connections are gone, the trimmer gives the memory back (it looks every 2 s).
    let metrics = plain_client();
    let started = std::time::Instant::now();
    let mut now = loaded;
    while now > idle + (loaded - idle) / 3 {
        if started.elapsed() > Duration::from_secs(20) {
            let text = metrics
                .get(petra.admin_url("/metrics"))
                .send()
                .await
                .expect("metrics");
            panic!(
                "resident memory stayed at {now} KiB after the connections closed (idle {idle}, loaded {loaded}): {}",
                text.text().await.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = rss_kib(pid);
    }
    // The counter goes up just after the trim returns.
    let mut trims = 0;
    while trims == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "memory_trims_total stayed 0"
        );
        let text = metrics
            .get(petra.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        trims = text
            .lines()
            .find_map(|line| line.strip_prefix("memory_trims_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if trims == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
