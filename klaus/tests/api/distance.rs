//! The placement assertions at three distances: Klaus calls Petra through a [`Link`] (noxious,
//! the Rust port of Toxiproxy) with no delay, at 50 ± 10 ms and at 150 ± 30 ms round trip, and
//! gets the same answers and the same problem codes at each; a deadline fires only where the
//! distance makes it right; the HTTP/2 ping keeps a healthy slow link open; and connecting fits
//! in its share of the deadline.
//!
//! Loss is not simulated here. noxious cannot drop single segments: its toxics apply to whole
//! connections (`toxicity` picks connections), and a proxy above TCP never sees a segment. The
//! compose distance topology drops packets below TCP with iptables; these tests do not fake it.

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use serving::testing::{Running, TestPki, foreign_client, wait_until};
use slowlink::{Link, Shape};

use crate::helpers::{
    get as http_get, petra_args, spawn_fake_petra, spawn_klaus, spawn_petra, spawn_petra_at,
};
use crate::upstream::value;

/// Petra in the same place as Klaus: no delay, but still through the link, so that the link is
/// the only thing that differs between the distances.
const CO_LOCATED: Shape = Shape::NONE;
/// Petra in a neighbouring region.
const NEAR: Shape = Shape::new(Duration::from_millis(50), Duration::from_millis(10));
/// Petra on another continent, or in another cloud.
const FAR: Shape = Shape::new(Duration::from_millis(150), Duration::from_millis(30));

/// A deadline that a cold call can meet co-located but not over [`FAR`]: a cold call crosses
/// the link at least twice (the TLS 1.3 handshake, then the request; the proxy accepts TCP
/// itself, where a real network would add a third round trip for TCP's handshake), which at
/// 150 ± 30 ms is at least 240 ms. Co-located, the same call takes a few milliseconds.
const TIGHT_TIMEOUT_MS: u64 = 200;

/// How much later than its deadline a 504 may arrive: Klaus answering, the test's client, a
/// busy machine.
const LATE: Duration = Duration::from_millis(500);

/// The shortest round trip over the link: every delay drawn at its least.
fn least_round_trip(shape: Shape) -> Duration {
    shape.round_trip.saturating_sub(shape.jitter)
}

/// What a cold call with [`TIGHT_TIMEOUT_MS`] must end in over a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tight {
    /// The link's delay alone exceeds the deadline: 504 `petra_timeout`.
    Fires,
    /// Even the worst draw of the link leaves room: 200.
    Fits,
    /// Either, depending on the draw: 200 or 504 `petra_timeout`, nothing else.
    Either,
}

impl Tight {
    fn over(shape: Shape) -> Self {
        let deadline = Duration::from_millis(TIGHT_TIMEOUT_MS);
        // Two crossings: the TLS handshake and the request, each at worst as long as the link
        // can hold a chunk. Co-located, the call's own work (a handshake in a debug build on a
        // busy machine) must fit in what is left.
        let local_work = Duration::from_millis(100);
        if 2 * least_round_trip(shape) > deadline {
            Self::Fires
        } else if 2 * shape.longest_hold() + local_work < deadline {
            Self::Fits
        } else {
            Self::Either
        }
    }
}

/// What Klaus answered to one `GET /`, and how long it took.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The problem's `code`, or the body when the answer is not a problem.
    said: String,
    took: Duration,
}

impl Answer {
    fn is(&self, status: u16, said: &str) -> bool {
        self.status == status && self.said == said
    }
}

/// Calls Klaus once.
async fn call(klaus: &Running) -> Answer {
    let started = Instant::now();
    let (status, content_type, body) = http_get(&klaus.http_url()).await;
    let took = started.elapsed();
    let said = if content_type == "application/problem+json" {
        let problem: serde_json::Value = serde_json::from_str(&body).expect("a problem is JSON");
        problem["code"].as_str().unwrap_or_default().to_owned()
    } else {
        body
    };
    Answer { status, said, took }
}

/// Klaus's PETRA_URL for Petra behind `link`: the link's port under the name Petra's test
/// certificate carries (`localhost`), so that the certificate is checked as it is for Petra
/// itself.
fn url_of(link: &Link) -> String {
    format!("https://localhost:{}", link.addr().port())
}

/// The placement assertions over a link shaped by `shape`; prints the figures.
async fn placement(shape: Shape) {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let link = Link::start(petra.main_addr, shape)
        .await
        .expect("the link starts");
    let url = url_of(&link);
    // PETRA_TIMEOUT_MS at its default.
    let args = petra_args(&url, Some(pki.ca_file.clone()), Some(&pki.klaus));
    let deadline = args.timeout();
    let klaus = spawn_klaus(&args).await;

    // The answer. The first call connects (the TLS handshake crosses the link) and must fit
    // in connecting's share of the deadline, with the request on top.
    let first = call(&klaus).await;
    assert!(
        first.is(200, "hello world"),
        "{shape}: first call {first:?}"
    );
    assert!(
        first.took < args.connect_timeout(),
        "{shape}: the first call took {:?}, more than connecting's share {:?}",
        first.took,
        args.connect_timeout()
    );
    let warm = call(&klaus).await;
    assert!(warm.is(200, "hello world"), "{shape}: second call {warm:?}");

    // A Klaus whose client certificate Petra refuses: TLS 1.3 checks it after the client's
    // handshake, so the refusal crosses the link once more, after the request was sent.
    let foreign = foreign_client(pki.dir.path());
    let stranger = spawn_klaus(&petra_args(&url, Some(pki.ca_file.clone()), Some(&foreign))).await;
    let refused = call(&stranger).await;
    assert!(
        refused.is(502, "petra_tls_client_cert_refused"),
        "{shape}: refused certificate {refused:?}"
    );
    assert!(refused.took < deadline, "{shape}: {refused:?}");
    stranger.stop().await;

    // A deadline that fires only where the distance makes it right: a fresh Klaus, so that
    // its first call is cold.
    let mut tight_args = args.clone();
    tight_args.petra_timeout_ms = TIGHT_TIMEOUT_MS;
    let tight = spawn_klaus(&tight_args).await;
    let hurried = call(&tight).await;
    let timed_out = hurried.is(504, "petra_timeout");
    match Tight::over(shape) {
        Tight::Fits => assert!(hurried.is(200, "hello world"), "{shape}: {hurried:?}"),
        Tight::Fires => assert!(timed_out, "{shape}: {hurried:?}"),
        Tight::Either => assert!(
            timed_out || hurried.is(200, "hello world"),
            "{shape}: {hurried:?}"
        ),
    }
    if timed_out {
        assert!(
            hurried.took < tight_args.timeout() + LATE,
            "{shape}: {hurried:?}"
        );
    }
    tight.stop().await;

    // Petra stopped: the link still accepts, then closes each connection it cannot take to
    // Petra, as a refused connection would end.
    let addr = petra.main_addr;
    petra.stop().await;
    let down = call(&klaus).await;
    assert!(
        down.is(502, "petra_unreachable"),
        "{shape}: Petra stopped {down:?}"
    );
    assert!(down.took < deadline, "{shape}: {down:?}");

    // Petra back on the same address, behind the same link: 200 again within one call's
    // deadline of its return.
    let back = spawn_petra_at(&pki, addr).await;
    let returned = Instant::now();
    wait_until(
        "Klaus answers hello world again",
        Duration::from_secs(10),
        || async { call(&klaus).await.is(200, "hello world") },
    )
    .await;
    let recovered = returned.elapsed();
    assert!(
        recovered < deadline,
        "{shape}: hello world again only {recovered:?} after Petra returned"
    );

    // The deadline: a Petra that takes the request and never answers.
    let silent = spawn_fake_petra(
        &pki,
        &pki.petra,
        Router::new().route("/", get(std::future::pending::<&'static str>)),
    )
    .await;
    let silent_link = Link::start(silent.main_addr, shape)
        .await
        .expect("the link starts");
    let waiting = spawn_klaus(&petra_args(
        &url_of(&silent_link),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    ))
    .await;
    let late = call(&waiting).await;
    assert!(late.is(504, "petra_timeout"), "{shape}: {late:?}");
    assert!(
        late.took >= deadline && late.took < deadline + LATE,
        "{shape}: 504 after {:?}, the deadline is {deadline:?}",
        late.took
    );

    println!(
        "distance {shape}: first answer {:?} (cold), then {:?}; refused certificate 502 after {:?}; \
         {TIGHT_TIMEOUT_MS} ms deadline: {} {} after {:?}; Petra stopped: 502 after {:?}; \
         back: 200 {recovered:?} after Petra returned; silent Petra: 504 after {:?}",
        first.took,
        warm.took,
        refused.took,
        hurried.status,
        hurried.said,
        hurried.took,
        down.took,
        late.took,
    );
    waiting.stop().await;
    silent.stop().await;
    klaus.stop().await;
    back.stop().await;
}

#[tokio::test]
async fn the_same_answers_and_codes_co_located() {
    assert_eq!(Tight::over(CO_LOCATED), Tight::Fits);
    placement(CO_LOCATED).await;
}

#[tokio::test]
async fn the_same_answers_and_codes_at_50_ms() {
    placement(NEAR).await;
}

#[tokio::test]
async fn the_same_answers_and_codes_at_150_ms() {
    assert_eq!(Tight::over(FAR), Tight::Fires);
    placement(FAR).await;
}

#[test]
fn connecting_gets_enough_of_the_default_deadline_for_the_slowest_link() {
    // Over a real network, connecting is TCP's handshake and TLS 1.3's, a round trip each; at
    // 150 ± 30 ms that is at most 360 ms. Its share must cover it twice over.
    let args = klaus::PetraArgs::for_url("https://petra:8443");
    let longest = FAR.round_trip + FAR.jitter;
    assert!(
        args.connect_timeout() >= 2 * (2 * longest),
        "connecting gets {:?} of PETRA_TIMEOUT_MS, TCP and TLS over {FAR} need up to {:?}",
        args.connect_timeout(),
        2 * longest
    );
}

#[tokio::test]
async fn the_http2_ping_never_closes_a_healthy_150_ms_link() {
    let pki = TestPki::new();
    let petra = spawn_petra(&pki).await;
    let link = Link::start(petra.main_addr, FAR)
        .await
        .expect("the link starts");
    let klaus = spawn_klaus(&petra_args(
        &url_of(&link),
        Some(pki.ca_file.clone()),
        Some(&pki.klaus),
    ))
    .await;
    assert!(call(&klaus).await.is(200, "hello world"));
    let accepted = |text: String| value(&text, "connections_accepted_total");
    assert_eq!(accepted(petra.metrics().await), 1.0);

    // The passage of time is what is tested: the connection stays idle while Klaus pings
    // Petra every 5 s (counted from the last frame read) and gives each ping 3 s. By the
    // end, two pings have been sent and the second one's timeout has passed; a ping that took
    // the slow link for a dead one would have closed the connection, and the next call would
    // open another.
    let ping_interval = Duration::from_secs(5);
    let ping_timeout = Duration::from_secs(3);
    let idle = 2 * (ping_interval + FAR.longest_hold()) + ping_timeout;
    tokio::time::sleep(idle).await;

    let after = call(&klaus).await;
    assert!(after.is(200, "hello world"), "{after:?}");
    assert_eq!(
        accepted(petra.metrics().await),
        1.0,
        "Petra accepted another connection: the first was closed while idle"
    );
    println!(
        "distance {FAR}: one connection kept through {idle:?} idle; the call after took {:?}",
        after.took
    );
    klaus.stop().await;
    petra.stop().await;
}
