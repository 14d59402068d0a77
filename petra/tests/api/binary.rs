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
        // Numbers that overflowed a duration once used (a panic, and panic = abort).
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("MAX_CONNECTION_AGE_SECONDS", U64_MAX),
            ],
            "MAX_CONNECTION_AGE_SECONDS",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("TLS_RELOAD_INTERVAL_SECONDS", U64_MAX),
            ],
            "TLS_RELOAD_INTERVAL_SECONDS",
        ),
        (
            &[
                ("TLS_CERT_FILE", cert),
                ("TLS_KEY_FILE", key),
                ("MAX_CONNECTIONS", "0"),
            ],
            "MAX_CONNECTIONS",
        ),
    ];
    assert_config_errors(EXE, cases);
}

/// `u64::MAX`, the largest number a `u64` setting parses.
const U64_MAX: &str = "18446744073709551615";

#[test]
fn certs_days_out_of_range_is_a_usage_error_not_a_panic() {
    let pki = TestPki::new();
    let out = pki.path("certs");
    for days in ["9223372036854775807", "0", "-1"] {
        let output = std::process::Command::new(EXE)
            .args(["certs", "--out"])
            .arg(&out)
            .arg(format!("--days={days}"))
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "--days {days}: {stderr}");
        assert!(
            stderr.contains("--days") && !stderr.contains("panicked"),
            "--days {days}: {stderr}"
        );
    }
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
    let env = tls_env(&pki);
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
    let started = std::time::Instant::now();
    let mut now = loaded;
    while now > idle + (loaded - idle) / 3 {
        if started.elapsed() > Duration::from_secs(20) {
            panic!(
                "resident memory stayed at {now} KiB after the connections closed (idle {idle}, loaded {loaded}): {}",
                petra.metrics().await
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
        trims = petra
            .metrics()
            .await
            .lines()
            .find_map(|line| line.strip_prefix("memory_trims_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if trims == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An HTTP/2 connection over mutual TLS with one `GET /` answered on it, kept open (HTTP/2
/// has no idle timeout here, where an idle HTTP/1.1 connection is closed after 10 s).
async fn h2_served(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    identity: &serving::testing::Files,
) -> impl Send + use<> {
    let tls = serving::testing::tls_connect(
        addr,
        ca,
        Some(identity),
        &[&rustls::version::TLS13],
        &[b"h2"],
    )
    .await
    .expect("TLS connection");
    let (mut h2, connection) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let request = http::Request::get("https://localhost/")
        .body(())
        .expect("request");
    let (answer, _) = h2.send_request(request, true).expect("send");
    assert_eq!(answer.await.expect("answer").status().as_u16(), 200);
    h2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_at_four_times_the_connection_cap() {
    // 600 client sockets in this process and 150 in Petra's stay under the usual soft limit
    // of 1,024 open files.
    const CAP: usize = 150;
    let pki = TestPki::new();
    let cap = CAP.to_string();
    let env = [
        ("TLS_CERT_FILE", pki.petra.cert.to_str().expect("path")),
        ("TLS_KEY_FILE", pki.petra.key.to_str().expect("path")),
        ("TLS_CLIENT_CA_FILE", pki.ca_file.to_str().expect("path")),
        ("MAX_CONNECTIONS", cap.as_str()),
    ];
    let petra = Binary::start(EXE, &env);
    let pid = petra.child.id();
    let addr = petra.main_addr;
    let idle = rss_kib(pid);

    // Each connection sends one request and stays open, as in the attack: first up to the cap.
    let attempt = |count: usize| {
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..count {
            let (ca, klaus) = (pki.ca_file.clone(), pki.klaus.clone());
            attempts.spawn(async move { h2_served(addr, &ca, &klaus).await });
        }
        attempts
    };
    let mut held = Vec::new();
    let mut at_cap = attempt(CAP);
    while let Some(served) = at_cap.join_next().await {
        held.push(served.expect("served under the cap"));
    }
    let rss_at_cap = rss_kib(pid);

    // Then three times as many again: they wait in the backlog, unserved, costing nothing.
    // Those served within 3 s are counted as they are (without the cap, all of them).
    let served_over = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut over = tokio::task::JoinSet::new();
    for _ in 0..3 * CAP {
        let (ca, klaus) = (pki.ca_file.clone(), pki.klaus.clone());
        let served_over = std::sync::Arc::clone(&served_over);
        over.spawn(async move {
            let connection = h2_served(addr, &ca, &klaus).await;
            served_over.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            connection
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while over.join_next().await.is_some() {}
    })
    .await;
    let served_over = served_over.load(std::sync::atomic::Ordering::Relaxed);
    let rss_over = rss_kib(pid);
    let metrics = petra.metrics().await;
    println!(
        "resident memory: idle {idle} KiB, {CAP} connections {rss_at_cap} KiB, {} attempted {rss_over} KiB",
        4 * CAP
    );
    assert_eq!(served_over, 0, "connections over the cap were served");
    assert!(
        metrics.contains(&format!(
            "listener_connections_open{{listener=\"main\"}} {CAP}\n"
        )),
        "{metrics}"
    );
    let per_connection = (rss_at_cap.saturating_sub(idle) / CAP as u64).max(1);
    assert!(
        rss_over <= rss_at_cap + per_connection * CAP as u64 / 4,
        "resident memory grew from {rss_at_cap} to {rss_over} KiB with {} connections waiting \
         over the cap ({per_connection} KiB a served connection)",
        3 * CAP
    );
    over.abort_all();
    drop(held);
}

/// Starts `EXE` with `env` and stdout a pipe that is read up to the `serving` line and never
/// again, as a log collector that stopped reading. Returns the process, the pipe (kept open)
/// and the main and admin addresses. The caller kills and reaps the process; a failure here
/// ends the test process, and the child with its closed stdout.
#[allow(clippy::zombie_processes)]
fn start_with_stdout_unread(
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    use std::io::BufRead;
    let mut child = serving::testing::Binary::command(EXE, env)
        .spawn()
        .expect("start petra");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).expect("read stdout");
        assert!(n > 0, "petra exited before it served");
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "serving" {
            let addr = |key: &str| {
                event[key]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("address")
            };
            let (main, admin) = (addr("main_addr"), addr("admin_addr"));
            return (child, stdout, main, admin);
        }
    }
}

/// The value of an unlabelled metric in an OpenMetrics text, 0 when absent.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_nobody_reads_does_not_stop_serving() {
    let pki = TestPki::new();
    let env = tls_env(&pki);
    let (mut child, _unread, main_addr, admin_addr) = start_with_stdout_unread(&env);
    let url = format!("https://localhost:{}/", main_addr.port());
    let metrics_url = format!("http://{admin_addr}/metrics");
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let admin = plain_client();
    // Request lines of about 400 bytes (a 128-byte request id): the pipe's 64 KiB, the batch
    // stuck in the write and the full buffer behind it take under 2,000 of them.
    let id = "r".repeat(128);
    let bound = Duration::from_secs(5);
    let mut sent = 0;
    let dropped = loop {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let request = client.get(&url).header("x-request-id", &id).send();
            batch.spawn(async move { request.await.map(|r| r.status().as_u16()) });
        }
        let statuses = tokio::time::timeout(bound, batch.join_all())
            .await
            .unwrap_or_else(|_| panic!("requests stalled after {sent} with stdout unread"));
        assert!(
            statuses.iter().all(|s| matches!(s, Ok(200))),
            "{statuses:?}"
        );
        sent += statuses.len();
        let text = tokio::time::timeout(bound, admin.get(&metrics_url).send())
            .await
            .unwrap_or_else(|_| panic!("/metrics stalled after {sent} requests"))
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let dropped = counter(&text, "log_lines_dropped_total");
        if dropped > 0 {
            break dropped;
        }
        assert!(sent < 20_000, "no line dropped after {sent} requests");
    };
    // Serving and probes carry on with stdout still blocked.
    let started = std::time::Instant::now();
    let livez = tokio::time::timeout(
        bound,
        admin.get(format!("http://{admin_addr}/livez")).send(),
    )
    .await
    .expect("/livez answered with stdout blocked")
    .expect("/livez");
    assert_eq!(livez.status().as_u16(), 200);
    let hello = tokio::time::timeout(bound, client.get(&url).send())
        .await
        .expect("GET / answered with stdout blocked")
        .expect("GET /");
    assert_eq!(hello.text().await.expect("body"), "hello");
    println!(
        "stdout unread: {sent} requests served, {dropped} log lines dropped; /livez and GET / answered in {:?}",
        started.elapsed()
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_404s_logs_a_bounded_number_of_lines_and_a_summary() {
    const FLOOD: usize = 600;
    let pki = TestPki::new();
    let env = tls_env(&pki);
    let petra = Binary::start(EXE, &env);
    let url = format!("https://localhost:{}/nowhere", petra.main_addr.port());
    let client = client(&pki.ca_file, Some(&pki.klaus));
    let started = std::time::Instant::now();
    for _ in 0..FLOOD / 50 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let request = client.get(&url).send();
            batch.spawn(async move { request.await.expect("request").status().as_u16() });
        }
        assert!(batch.join_all().await.iter().all(|&s| s == 404));
    }
    let took = started.elapsed();
    // Every 404 is either logged or counted in a summary; summaries come once a second.
    let (mut logged, mut summarised) = (0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while logged + summarised < FLOOD {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = petra.lines.recv_timeout(left) else {
            panic!("{logged} 404s logged and {summarised} summarised of {FLOOD}");
        };
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        if event["message"] == "request" && event["status"] == 404 {
            logged += 1;
        } else if event["message"] == "suppressed similar request lines" {
            assert_eq!(event["status"], 404, "{line}");
            summarised += event["suppressed"].as_u64().expect("count") as usize;
        }
    }
    assert_eq!(logged + summarised, FLOOD);
    // At most 20 lines in each second the flood touched.
    let seconds = took.as_secs() as usize + 2;
    assert!(
        logged <= 20 * seconds,
        "{logged} of {FLOOD} 404s logged in {took:?}"
    );
    println!("{FLOOD} 404s in {took:?}: {logged} logged, {summarised} summarised");
}

/// The JSON request line is formatted off the request's path (`serving::telemetry`), but
/// RUST_LOG still decides whether it is written, and the line says what the request was.
#[tokio::test(flavor = "multi_thread")]
async fn rust_log_decides_whether_request_lines_are_written() {
    let pki = TestPki::new();
    for (filter, logged) in [("info", true), ("info,http=warn", false)] {
        let mut env = tls_env(&pki).to_vec();
        env.extend([("RUST_LOG", filter), ("SHUTDOWN_DELAY_SECONDS", "0")]);
        let mut petra = Binary::start(EXE, &env);
        let url = format!("https://localhost:{}/", petra.main_addr.port());
        let hello = client(&pki.ca_file, Some(&pki.klaus))
            .get(&url)
            .header("x-request-id", "rust-log-test")
            .send()
            .await
            .expect("request");
        assert_eq!(hello.status(), StatusCode::OK);
        petra.signal("TERM");
        let status = tokio::task::block_in_place(|| petra.wait_exit(Duration::from_secs(10)));
        assert_eq!(status.code(), Some(0));
        let mut lines = Vec::new();
        while let Ok(line) = petra.lines.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
        let requests: Vec<&String> = lines
            .iter()
            .filter(|line| line.contains("rust-log-test"))
            .collect();
        assert_eq!(requests.len(), usize::from(logged), "{filter}: {lines:?}");
        assert!(
            lines.iter().any(|line| line.contains("stopped")),
            "{filter}: {lines:?}"
        );
        if logged {
            let line: serde_json::Value = serde_json::from_str(requests[0]).expect("JSON line");
            assert_eq!(line["message"], "request", "{line}");
            assert_eq!(line["target"], "http", "{line}");
            assert_eq!(line["route"], "/", "{line}");
            assert_eq!(line["status"], 200, "{line}");
            assert!(
                line["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0),
                "{line}"
            );
            assert_eq!(line["trace_id"].as_str().map(str::len), Some(32), "{line}");
        }
    }
}

/// Petra's TLS files from `pki` as its environment: mutual TLS, as the manifests run it.
fn tls_env(pki: &TestPki) -> [(&'static str, &str); 3] {
    [
        ("TLS_CERT_FILE", pki.petra.cert.to_str().expect("path")),
        ("TLS_KEY_FILE", pki.petra.key.to_str().expect("path")),
        ("TLS_CLIENT_CA_FILE", pki.ca_file.to_str().expect("path")),
    ]
}
