//! Faults between Klaus and Petra: Petra killed hard under load, and the network between
//! them cut (simulated by a TCP proxy that stops forwarding without closing anything, as a
//! dropped link does).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serving::testing::{Binary, TestPki, loopback, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};

use crate::helpers::{get as http_get, petra_args, spawn_klaus};

/// The `petra` binary, built beside `klaus` by `cargo build --workspace` / nextest.
pub(crate) fn petra_exe() -> String {
    let path: PathBuf = std::path::Path::new(env!("CARGO_BIN_EXE_klaus")).with_file_name("petra");
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo build -p petra)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

fn start_petra(pki: &TestPki, listen: &str) -> Binary {
    crate::traces::start_petra(pki, &petra_extra(listen))
}

/// [`start_petra`] again on the port a killed Petra listened on: tried again for up to 5 s
/// while something else still holds the port (seen once in CI: `Address already in use`).
fn restart_petra(pki: &TestPki, listen: &str) -> Binary {
    let env = crate::traces::petra_env(pki, &petra_extra(listen));
    Binary::start_within(&petra_exe(), &env, Duration::from_secs(5))
}

fn petra_extra(listen: &str) -> [(&'static str, &str); 3] {
    [
        ("LISTEN_ADDR", listen),
        ("SHUTDOWN_DELAY_SECONDS", "1"),
        ("RUST_LOG", "warn,serving=info"),
    ]
}

/// One response seen by the load: when it ended, its status (0 for a client error) and how
/// long it took.
type Seen = Arc<Mutex<Vec<(Instant, u16, Duration)>>>;

/// Runs `tasks` loops of requests against `url` until `stop` is set.
fn load(
    url: String,
    tasks: usize,
    stop: Arc<AtomicBool>,
    seen: Seen,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|_| {
            let (url, stop, seen) = (url.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let client = serving::testing::plain_client();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let status = match client.get(&url).send().await {
                        Ok(response) => response.status().as_u16(),
                        Err(_) => 0,
                    };
                    seen.lock()
                        .await
                        .push((Instant::now(), status, started.elapsed()));
                }
            })
        })
        .collect()
}

async fn count(seen: &Seen, after: Instant, status: u16) -> usize {
    seen.lock()
        .await
        .iter()
        .filter(|(at, s, _)| *at > after && *s == status)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn petra_killed_under_load_gives_fast_502s_and_klaus_recovers_within_2_s() {
    let pki = TestPki::new();
    let mut petra = start_petra(&pki, "127.0.0.1:0");
    let port = petra.main_addr.port();
    let timeout_ms = 1000;
    let mut args = petra_args(
        &format!("https://localhost:{port}"),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    args.petra_timeout_ms = timeout_ms;
    let klaus = spawn_klaus(&args).await;

    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks = load(klaus.http_url(), 4, stop.clone(), seen.clone());
    wait_until(
        "50 answers before the kill",
        Duration::from_secs(20),
        || async { count(&seen, started, 200).await >= 50 },
    )
    .await;

    petra.signal("KILL");
    petra.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    wait_until(
        "20 answers of 502 while Petra is gone",
        Duration::from_secs(10),
        || async { count(&seen, killed, 502).await >= 20 },
    )
    .await;

    let back = restart_petra(&pki, &format!("127.0.0.1:{port}"));
    let returned = Instant::now();
    wait_until(
        "Klaus answers 200 again",
        Duration::from_secs(5),
        || async { count(&seen, returned, 200).await >= 1 },
    )
    .await;
    let recovered = {
        let seen = seen.lock().await;
        seen.iter()
            .find(|(at, s, _)| *at > returned && *s == 200)
            .map(|(at, _, _)| *at - returned)
    };
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }

    let seen = seen.lock().await;
    let slowest = seen
        .iter()
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();
    let failures: Vec<_> = seen.iter().filter(|(_, s, _)| *s != 200).collect();
    let slowest_failure = failures
        .iter()
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();
    println!(
        "hard kill: {} answers, {} failed (all 502), slowest failure {slowest_failure:?}, slowest answer {slowest:?}, recovered {recovered:?} after Petra returned",
        seen.len(),
        failures.len()
    );
    assert!(
        failures.iter().all(|(_, s, _)| *s == 502),
        "only 502s expected: {:?}",
        failures.iter().map(|f| f.1).collect::<Vec<_>>()
    );
    assert!(
        slowest < Duration::from_millis(timeout_ms + 100),
        "a request took {slowest:?}"
    );
    assert!(
        recovered.is_some_and(|r| r < Duration::from_secs(2)),
        "recovered after {recovered:?}"
    );
    drop(back);
    klaus.stop().await;
}

/// A TCP proxy whose link can be cut: while cut it forwards nothing in either direction and
/// connects nothing new, but closes nothing either, as a dropped network link does.
struct Link {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
}

impl Link {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(loopback()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, up) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let up = up.clone();
                tokio::spawn(async move {
                    let mut state = up.clone();
                    if state.wait_for(|cut| !cut).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pipe(client_read, server_write, up.clone()),
                        pipe(server_read, client_write, up)
                    );
                });
            }
        });
        Self { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        let _ = self.cut.send(cut);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut up: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // While the link is cut, what was read is held back, never delivered late.
        if *up.borrow() {
            if up.wait_for(|cut| !cut).await.is_err() {
                return;
            }
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_gives_504_by_the_deadline_and_klaus_recovers_when_it_returns() {
    let pki = TestPki::new();
    let petra = crate::helpers::spawn_petra(&pki).await;
    let link = Link::start(petra.main_addr).await;
    let timeout_ms = 600;
    let mut args = petra_args(
        &format!("https://localhost:{}", link.addr.port()),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    args.petra_timeout_ms = timeout_ms;
    let klaus = spawn_klaus(&args).await;
    assert_eq!(http_get(&klaus.http_url()).await.2, "hello world");

    link.set_cut(true);
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let (status, content_type, body) = http_get(&klaus.http_url()).await;
        took.push(started.elapsed());
        assert_eq!(
            (status, content_type.as_str()),
            (504, "application/problem+json"),
            "{body}"
        );
    }
    println!("partition: 504 after {took:?} (deadline {timeout_ms} ms)");
    for elapsed in &took {
        // The first call hangs on the pooled connection until the deadline; later ones may
        // hit the shorter connect timeout (half the deadline). None may run past the deadline.
        assert!(
            *elapsed >= Duration::from_millis(timeout_ms / 2 - 50),
            "too early: {elapsed:?}"
        );
        assert!(
            *elapsed < Duration::from_millis(timeout_ms + 300),
            "past the deadline: {elapsed:?}"
        );
    }

    link.set_cut(false);
    let healed = Instant::now();
    wait_until(
        "Klaus answers hello world again",
        Duration::from_secs(5),
        || async { http_get(&klaus.http_url()).await.2 == "hello world" },
    )
    .await;
    println!(
        "partition: recovered {:?} after the link returned",
        healed.elapsed()
    );
    klaus.stop().await;
    petra.stop().await;
}

/// A stand-in for a Kubernetes Service: a TCP balancer that polls each Petra replica's
/// `/readyz` and sends new connections round-robin to the ready ones only, as kube-proxy does
/// with the endpoints the endpoints controller keeps.
struct Balancer {
    addr: SocketAddr,
    /// Each replica's main and admin address.
    replicas: Arc<std::sync::Mutex<Vec<(SocketAddr, SocketAddr)>>>,
}

impl Balancer {
    async fn start(replicas: Vec<(SocketAddr, SocketAddr)>) -> Self {
        let listener = TcpListener::bind(loopback()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let replicas = Arc::new(std::sync::Mutex::new(replicas));
        let ready: Arc<std::sync::Mutex<Vec<SocketAddr>>> = Arc::default();
        let (watched, ready_set) = (replicas.clone(), ready.clone());
        tokio::spawn(async move {
            let client = serving::testing::plain_client();
            loop {
                let current = watched.lock().expect("lock").clone();
                let mut now_ready = Vec::new();
                for (main, admin) in current {
                    let probe = client
                        .get(format!("http://{admin}/readyz"))
                        .timeout(Duration::from_millis(200))
                        .send()
                        .await;
                    if probe.is_ok_and(|r| r.status().is_success()) {
                        now_ready.push(main);
                    }
                }
                *ready_set.lock().expect("lock") = now_ready;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        // A Service sends traffic once it has ready endpoints; before that, this one would
        // drop connections (Klaus's first calls would fail for the harness's sake).
        let first_probe = ready.clone();
        wait_until(
            "the balancer sees a ready replica",
            Duration::from_secs(10),
            || {
                let ready = first_probe.clone();
                async move { !ready.lock().expect("lock").is_empty() }
            },
        )
        .await;
        tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                let ready = ready.lock().expect("lock").clone();
                if ready.is_empty() {
                    continue;
                }
                let backend = ready[next % ready.len()];
                next = next.wrapping_add(1);
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, replicas }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_two_petra_replicas_loses_no_request() {
    let pki = TestPki::new();
    let mut replicas = [
        start_petra(&pki, "127.0.0.1:0"),
        start_petra(&pki, "127.0.0.1:0"),
    ];
    let balancer = Balancer::start(
        replicas
            .iter()
            .map(|r| (r.main_addr, r.admin_addr))
            .collect(),
    )
    .await;
    let mut args = petra_args(
        &format!("https://localhost:{}", balancer.addr.port()),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    );
    args.petra_timeout_ms = 2000;
    let klaus = spawn_klaus(&args).await;

    // About 200 requests per second: 4 clients, one request each every 20 ms.
    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop, seen) = (klaus.http_url(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let client = serving::testing::plain_client();
                let mut ticks = tokio::time::interval(Duration::from_millis(20));
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    let started = Instant::now();
                    let status = client
                        .get(&url)
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16());
                    seen.lock()
                        .await
                        .push((Instant::now(), status, started.elapsed()));
                }
            })
        })
        .collect();
    let began = Instant::now();
    wait_until("traffic flows", Duration::from_secs(10), || async {
        count(&seen, began, 200).await >= 100
    })
    .await;

    for (index, replica) in replicas.iter_mut().enumerate() {
        let listen = replica.main_addr.to_string();
        replica.signal("TERM");
        let status = tokio::task::block_in_place(|| replica.wait_exit(Duration::from_secs(30)));
        assert_eq!(status.code(), Some(0));
        let fresh = start_petra(&pki, &listen);
        balancer.replicas.lock().expect("lock")[index] = (fresh.main_addr, fresh.admin_addr);
        let admin = fresh.admin_url("/readyz");
        wait_until(
            "the restarted replica is ready",
            Duration::from_secs(10),
            || async {
                serving::testing::plain_client()
                    .get(&admin)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        *replica = fresh;
    }
    let restarted = Instant::now();
    wait_until(
        "traffic flows after the restarts",
        Duration::from_secs(10),
        || async { count(&seen, restarted, 200).await >= 100 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }

    let seen = seen.lock().await;
    let failed: Vec<_> = seen
        .iter()
        .filter(|(_, s, _)| *s != 200)
        .map(|(_, s, _)| *s)
        .collect();
    let retries = klaus.metrics().await;
    let attempted = retries
        .lines()
        .find(|l| l.starts_with(r#"petra_retries_total{result="attempted"}"#))
        .unwrap_or("no retries")
        .to_owned();
    println!(
        "rolling restart: {} requests over {:?}, {} failed; {attempted}",
        seen.len(),
        began.elapsed(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed answers: {failed:?}");
    klaus.stop().await;
}
