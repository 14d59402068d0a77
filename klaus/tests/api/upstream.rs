//! Klaus's upstream: every endpoint of a name balanced, failing endpoints ejected and brought
//! back, failover to the next priority and back, a call moved to another endpoint within its
//! deadline, DNS answers followed, and names that do not resolve. Petra's host names are
//! answered by a table the test changes, standing in for a headless Service's DNS.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use klaus::PetraArgs;
use klaus::upstream::{Resolution, Resolve};
use serving::certs::Usage;
use serving::testing::{Files, Running, TestPki, loopback, spawn, wait_until};

use crate::helpers::{get, petra_args, serve_args, silent_listener};

/// Petra's host names, as the test sets them; a name not set does not resolve.
#[derive(Debug, Default)]
pub(crate) struct Dns {
    table: Mutex<HashMap<String, Vec<IpAddr>>>,
}

impl Dns {
    pub(crate) fn set(&self, host: &str, ips: &[IpAddr]) {
        self.table
            .lock()
            .expect("table")
            .insert(host.to_owned(), ips.to_vec());
    }
}

impl Resolve for Dns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = Resolution> + Send + 'a>> {
        let ips = self.table.lock().expect("table").get(host).cloned();
        Box::pin(async move {
            match ips {
                Some(ips) if !ips.is_empty() => Resolution::Addresses(ips),
                _ => Resolution::NotFound,
            }
        })
    }
}

/// `127.0.1.N`: loopback addresses no other test uses, so that several Petras can share a port.
pub(crate) fn ip(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 1, n])
}

/// A port free on every address in `ips`.
pub(crate) fn shared_port(ips: &[IpAddr]) -> u16 {
    'search: loop {
        let first = std::net::TcpListener::bind((ips[0], 0)).expect("bind");
        let port = first.local_addr().expect("addr").port();
        for ip in &ips[1..] {
            if std::net::TcpListener::bind((*ip, port)).is_err() {
                continue 'search;
            }
        }
        return port;
    }
}

/// The PKI with a server certificate for `names` too.
pub(crate) fn server_cert(pki: &TestPki, names: &[&str]) -> Files {
    let now = time::OffsetDateTime::now_utc();
    pki.issue(
        "named-petra",
        names,
        Usage::Server,
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
}

/// The real Petra at `addr` with `cert`, requiring client certificates from `pki`'s CA.
pub(crate) async fn petra_at(pki: &TestPki, cert: &Files, addr: SocketAddr) -> Running {
    let mut args = serve_args();
    args.tls_cert_file = Some(cert.cert.clone());
    args.tls_key_file = Some(cert.key.clone());
    args.tls_client_ca_file = Some(pki.ca_file.clone());
    spawn(petra::service(addr, &args).expect("valid Petra configuration")).await
}

/// Klaus calling `urls`, with `dns` for Petra's names and `tune` applied to its settings.
pub(crate) async fn klaus_with(
    pki: &TestPki,
    urls: &str,
    dns: &Arc<Dns>,
    tune: impl FnOnce(&mut PetraArgs),
) -> Running {
    let mut args = petra_args(urls, Some(pki.ca_file.clone()), Some(&pki.klaus));
    tune(&mut args);
    let resolver: Arc<dyn Resolve> = dns.clone();
    spawn(klaus::service_with(loopback(), &serve_args(), &args, resolver).expect("configuration"))
        .await
}

/// The value of one series in Prometheus text (0 when it is not there).
pub(crate) fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// How many `GET /` Petra answered with 200.
async fn served(petra: &Running) -> f64 {
    value(
        &petra.metrics().await,
        r#"http_requests_total{route="/",method="GET",status="200"}"#,
    )
}

/// Klaus's attempts on `addr` that ended in `outcome`.
pub(crate) async fn attempts(
    klaus: &Running,
    priority: usize,
    addr: SocketAddr,
    outcome: &str,
) -> f64 {
    value(
        &klaus.metrics().await,
        &format!(
            r#"petra_attempts_total{{priority="{priority}",endpoint="{addr}",outcome="{outcome}"}}"#
        ),
    )
}

/// `n` calls to Klaus, `parallel` at a time; the statuses, in no order.
async fn calls(klaus: &Running, n: usize, parallel: usize) -> Vec<u16> {
    Load::start_limited(klaus.http_url(), parallel, Some(n))
        .finished()
        .await
}

pub(crate) fn failed(statuses: &[u16]) -> usize {
    statuses.iter().filter(|&&s| s != 200).count()
}

#[tokio::test]
async fn calls_spread_evenly_over_three_replicas_behind_one_name() {
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["petra.test"]);
    let ips = [ip(1), ip(2), ip(3)];
    let port = shared_port(&ips);
    let mut replicas = Vec::new();
    for ip in ips {
        replicas.push(petra_at(&pki, &cert, SocketAddr::new(ip, port)).await);
    }
    let dns = Arc::new(Dns::default());
    dns.set("petra.test", &ips);
    let klaus = klaus_with(&pki, &format!("https://petra.test:{port}"), &dns, |_| {}).await;

    let statuses = calls(&klaus, 1500, 16).await;
    assert_eq!(failed(&statuses), 0, "{statuses:?}");
    let mut shares = Vec::new();
    for replica in &replicas {
        shares.push(served(replica).await);
    }
    let total: f64 = shares.iter().sum();
    eprintln!("figure: 1,500 calls, 16 at a time, per replica {shares:?}");
    assert_eq!(total, 1500.0, "{shares:?}");
    for share in &shares {
        let third = total / 3.0;
        assert!(
            (share - third).abs() <= 0.15 * third,
            "each replica must get a third ±15 %: {shares:?}"
        );
    }
    // One connection per replica, not one for the name.
    let text = klaus.metrics().await;
    assert_eq!(
        value(&text, r#"petra_endpoints{priority="0",state="active"}"#),
        3.0,
        "{text}"
    );
    klaus.stop().await;
    for replica in replicas {
        replica.stop().await;
    }
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_comes_back_when_it_answers_again() {
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["petra.test"]);
    let (up, down) = (ip(11), ip(12));
    let port = shared_port(&[up, down]);
    let healthy = petra_at(&pki, &cert, SocketAddr::new(up, port)).await;
    let dns = Arc::new(Dns::default());
    dns.set("petra.test", &[up, down]);
    let klaus = klaus_with(&pki, &format!("https://petra.test:{port}"), &dns, |args| {
        args.petra_ejection_ms = 1000;
    })
    .await;
    let down_addr = SocketAddr::new(down, port);

    // Nothing listens at `down`: its attempts are refused and moved to `up`, so no call fails.
    let statuses = calls(&klaus, 40, 1).await;
    assert_eq!(failed(&statuses), 0, "{statuses:?}");
    let text = klaus.metrics().await;
    let ejection = format!(r#"petra_ejections_total{{priority="0",endpoint="{down_addr}"}}"#);
    assert_eq!(value(&text, &ejection), 1.0, "{text}");
    assert_eq!(
        value(
            &text,
            &format!(
                r#"petra_attempts_total{{priority="0",endpoint="{down_addr}",outcome="unreachable"}}"#
            )
        ),
        3.0,
        "three failures in a row eject it; ejected, it gets no more calls: {text}"
    );
    assert_eq!(
        value(&text, r#"petra_endpoints{priority="0",state="ejected"}"#),
        1.0,
        "{text}"
    );

    // It comes back once it answers: its ejection ends and calls reach it again.
    let revived = petra_at(&pki, &cert, down_addr).await;
    let started = Instant::now();
    wait_until(
        "the revived endpoint serves calls",
        Duration::from_secs(10),
        || async {
            assert_eq!(get(&klaus.http_url()).await.0, 200);
            attempts(&klaus, 0, down_addr, "ok").await > 0.0
        },
    )
    .await;
    assert!(served(&revived).await > 0.0);
    eprintln!(
        "figure: 40 calls, 0 failed, the dead endpoint ejected after 3 refusals; back in use {:?} after it answered",
        started.elapsed()
    );
    klaus.stop().await;
    healthy.stop().await;
    revived.stop().await;
}

#[tokio::test]
async fn klaus_fails_over_to_the_second_priority_and_back_without_a_failed_call() {
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["petra-a.test", "petra-b.test"]);
    let (a, b) = (SocketAddr::new(ip(21), 0), SocketAddr::new(ip(22), 0));
    let port = shared_port(&[a.ip(), b.ip()]);
    let (a, b) = (SocketAddr::new(a.ip(), port), SocketAddr::new(b.ip(), port));
    let cloud_a = petra_at(&pki, &cert, a).await;
    let cloud_b = petra_at(&pki, &cert, b).await;
    let dns = Arc::new(Dns::default());
    dns.set("petra-a.test", &[a.ip()]);
    dns.set("petra-b.test", &[b.ip()]);
    let urls = format!("https://petra-a.test:{port},https://petra-b.test:{port}");
    let klaus = klaus_with(&pki, &urls, &dns, |args| args.petra_ejection_ms = 200).await;
    let in_use = |text: &str| value(text, "petra_priority_in_use");

    // Both up: the first priority takes every call.
    assert_eq!(failed(&calls(&klaus, 20, 2).await), 0);
    assert_eq!(served(&cloud_b).await, 0.0);
    assert_eq!(in_use(&klaus.metrics().await), 0.0);

    // Cloud A goes away: cloud B serves, and no call fails on the way.
    cloud_a.stop().await;
    let statuses = calls(&klaus, 40, 2).await;
    assert_eq!(failed(&statuses), 0, "{statuses:?}");
    assert!(served(&cloud_b).await >= 38.0);
    assert_eq!(in_use(&klaus.metrics().await), 1.0);

    // Cloud A is back: once its ejection ends, calls return to it.
    let cloud_a = petra_at(&pki, &cert, a).await;
    let returned = Instant::now();
    wait_until(
        "calls return to the first priority",
        Duration::from_secs(10),
        || async {
            assert_eq!(get(&klaus.http_url()).await.0, 200);
            served(&cloud_a).await > 0.0 && in_use(&klaus.metrics().await) == 0.0
        },
    )
    .await;
    let before = served(&cloud_b).await;
    eprintln!(
        "figure: cloud A stopped: 40 calls, 0 failed, {before} served by B; failed back {:?} after A returned",
        returned.elapsed()
    );
    assert_eq!(failed(&calls(&klaus, 20, 2).await), 0);
    assert_eq!(
        served(&cloud_b).await,
        before,
        "failed back: B gets nothing"
    );
    klaus.stop().await;
    cloud_a.stop().await;
    cloud_b.stop().await;
}

#[tokio::test]
async fn a_call_moves_to_another_endpoint_within_its_deadline() {
    // The first priority accepts TCP and never answers the TLS handshake: a replica that hangs.
    let (silent_ip, good_ip) = (ip(31), ip(32));
    let port = shared_port(&[silent_ip, good_ip]);
    let (_, held) = silent_listener((silent_ip, port)).await;
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["hung.test", "petra.test"]);
    let petra = petra_at(&pki, &cert, SocketAddr::new(good_ip, port)).await;
    let dns = Arc::new(Dns::default());
    dns.set("hung.test", &[silent_ip]);
    dns.set("petra.test", &[good_ip]);
    let urls = format!("https://hung.test:{port},https://petra.test:{port}");
    let klaus = klaus_with(&pki, &urls, &dns, |args| {
        args.petra_timeout_ms = 1000;
        args.petra_ejection_ms = 60_000;
    })
    .await;

    let mut took = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(get(&klaus.http_url()).await.0, 200);
        took.push(started.elapsed());
    }
    // The first three wait out the connect timeout (half the deadline) and are answered by
    // the second priority within the deadline; then the hung endpoint is ejected.
    for first in &took[..3] {
        assert!(
            *first >= Duration::from_millis(450) && *first < Duration::from_millis(1000),
            "{took:?}"
        );
    }
    for later in &took[3..] {
        assert!(*later < Duration::from_millis(400), "{took:?}");
    }
    eprintln!("figure: call durations with a hung first priority {took:?}");
    let hung = SocketAddr::new(silent_ip, port);
    assert_eq!(attempts(&klaus, 0, hung, "timeout").await, 3.0);
    let text = klaus.metrics().await;
    assert_eq!(
        value(&text, r#"petra_retries_total{result="attempted"}"#),
        3.0,
        "{text}"
    );
    klaus.stop().await;
    petra.stop().await;
    held.abort();
}

#[tokio::test]
async fn dns_answers_that_change_are_followed_without_a_restart() {
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["petra.test"]);
    let (first, second) = (ip(41), ip(42));
    let port = shared_port(&[first, second]);
    let one = petra_at(&pki, &cert, SocketAddr::new(first, port)).await;
    let two = petra_at(&pki, &cert, SocketAddr::new(second, port)).await;
    let dns = Arc::new(Dns::default());
    dns.set("petra.test", &[first]);
    let klaus = klaus_with(&pki, &format!("https://petra.test:{port}"), &dns, |args| {
        args.petra_resolve_interval_seconds = 1;
    })
    .await;
    assert_eq!(failed(&calls(&klaus, 10, 1).await), 0);
    assert_eq!(served(&two).await, 0.0, "not in the answers yet");

    // A replica is added.
    dns.set("petra.test", &[first, second]);
    wait_until(
        "the added replica gets calls",
        Duration::from_secs(5),
        || async {
            assert_eq!(get(&klaus.http_url()).await.0, 200);
            served(&two).await > 0.0
        },
    )
    .await;

    // One is removed: it gets no more calls, and its series go.
    dns.set("petra.test", &[second]);
    wait_until(
        "the removed replica is dropped",
        Duration::from_secs(5),
        || async {
            let text = klaus.metrics().await;
            value(&text, r#"petra_endpoints{priority="0",state="active"}"#) == 1.0
        },
    )
    .await;
    let text = klaus.metrics().await;
    let removed = format!("endpoint=\"{}\"", SocketAddr::new(first, port));
    assert!(!text.contains(&removed), "{text}");
    let before = served(&one).await;
    assert_eq!(failed(&calls(&klaus, 20, 2).await), 0);
    assert_eq!(served(&one).await, before);
    klaus.stop().await;
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn a_name_without_addresses_is_a_clear_502_until_it_resolves() {
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["late.test"]);
    let addr = SocketAddr::new(ip(51), shared_port(&[ip(51)]));
    let petra = petra_at(&pki, &cert, addr).await;
    let dns = Arc::new(Dns::default());
    let klaus = klaus_with(
        &pki,
        &format!("https://late.test:{}", addr.port()),
        &dns,
        |args| {
            // Not the interval: a call that found no address asks for a new resolution.
            args.petra_resolve_interval_seconds = 3600;
            args.petra_timeout_ms = 5000;
            args.error_detail = klaus::ErrorDetail::Verbose;
        },
    )
    .await;
    // Not the deadline: as soon as the name is known to have no address.
    let started = Instant::now();
    let (status, _, body) = get(&klaus.http_url()).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status, 502, "{body}");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem JSON");
    assert_eq!(problem["code"], "petra_unreachable");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("late.test:{}", addr.port()))
            && detail.contains("does not resolve"),
        "{detail}"
    );
    assert_eq!(value(&klaus.metrics().await, "petra_priority_in_use"), -1.0);
    // Klaus stays ready, and serves once the name resolves.
    assert_eq!(get(&format!("{}/readyz", klaus.admin_url())).await.0, 200);
    dns.set("late.test", &[addr.ip()]);
    wait_until("the name resolves", Duration::from_secs(2), || async {
        get(&klaus.http_url()).await.2 == "hello world"
    })
    .await;
    klaus.stop().await;
    petra.stop().await;
}

/// Keeps calling Klaus until stopped; the statuses seen.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl Load {
    /// `parallel` callers, each calling one after the other until stopped.
    pub(crate) fn start(url: String, parallel: usize) -> Self {
        Self::start_limited(url, parallel, None)
    }

    /// As [`Load::start`], and all of them together stop after `limit` calls.
    fn start_limited(url: String, parallel: usize, limit: Option<usize>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let tasks = (0..parallel)
            .map(|_| {
                let (url, stop, sent) = (url.clone(), stop.clone(), sent.clone());
                tokio::spawn(async move {
                    let client = serving::testing::plain_client();
                    let mut statuses = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && limit.is_none_or(|limit| sent.fetch_add(1, Ordering::Relaxed) < limit)
                    {
                        statuses.push(match client.get(&url).send().await {
                            Ok(response) => response.status().as_u16(),
                            Err(_) => 0,
                        });
                    }
                    statuses
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the callers; every status they saw.
    pub(crate) async fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        self.finished().await
    }

    /// Waits until the callers have stopped by themselves; every status they saw.
    async fn finished(self) -> Vec<u16> {
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.expect("caller"));
        }
        all
    }
}

#[tokio::test]
async fn a_replica_gone_from_the_dns_is_not_dialled() {
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["petra.test"]);
    let (stays, goes) = (ip(61), ip(62));
    let port = shared_port(&[stays, goes]);
    let staying = petra_at(&pki, &cert, SocketAddr::new(stays, port)).await;
    let going = petra_at(&pki, &cert, SocketAddr::new(goes, port)).await;
    let dns = Arc::new(Dns::default());
    dns.set("petra.test", &[stays, goes]);
    let klaus = klaus_with(&pki, &format!("https://petra.test:{port}"), &dns, |args| {
        args.petra_resolve_interval_seconds = 3600;
    })
    .await;
    assert_eq!(failed(&calls(&klaus, 20, 2).await), 0);
    assert!(served(&going).await > 0.0);

    // The replica goes and its address stops answering altogether (a pod's address after the
    // pod is gone: packets go nowhere), and the DNS no longer names it. Klaus still has it
    // until it resolves again; a new connection to it would wait for the connect timeout.
    going.stop().await;
    let (_, held) = silent_listener((goes, port)).await;
    dns.set("petra.test", &[stays]);
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(get(&klaus.http_url()).await.0, 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a call waited {:?}: the gone address was dialled",
            started.elapsed()
        );
    }
    wait_until(
        "the gone endpoint is dropped",
        Duration::from_secs(5),
        || async {
            value(
                &klaus.metrics().await,
                r#"petra_endpoints{priority="0",state="active"}"#,
            ) == 1.0
        },
    )
    .await;

    klaus.stop().await;
    staying.stop().await;
    held.abort();
}

#[tokio::test]
async fn a_retry_finds_a_replica_the_dns_has_just_added() {
    // A rolling restart faster than the resolve interval: the replica Klaus knows goes away
    // just after another has come up, which Klaus has not resolved yet.
    let pki = TestPki::new();
    let cert = server_cert(&pki, &["petra.test"]);
    let (old, new) = (ip(71), ip(72));
    let port = shared_port(&[old, new]);
    let leaving = petra_at(&pki, &cert, SocketAddr::new(old, port)).await;
    let dns = Arc::new(Dns::default());
    dns.set("petra.test", &[old]);
    let klaus = klaus_with(&pki, &format!("https://petra.test:{port}"), &dns, |args| {
        args.petra_resolve_interval_seconds = 3600;
    })
    .await;
    assert_eq!(failed(&calls(&klaus, 5, 1).await), 0);

    let arrived = petra_at(&pki, &cert, SocketAddr::new(new, port)).await;
    dns.set("petra.test", &[old, new]);
    leaving.stop().await;
    // The first call finds the old replica refusing; its retry looks again and finds the new.
    let (status, _, body) = get(&klaus.http_url()).await;
    assert_eq!((status, body.as_str()), (200, "hello world"));
    assert_eq!(failed(&calls(&klaus, 10, 1).await), 0);
    assert!(served(&arrived).await >= 11.0);
    klaus.stop().await;
    arrived.stop().await;
}
