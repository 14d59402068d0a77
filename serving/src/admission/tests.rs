//! Admission under load: waiting in order, running out of time, a fixed limit, and the limit
//! adapting to an idle and to a saturated runtime.

use std::future::Future;

use super::*;

fn admission(settings: Settings) -> Arc<Admission> {
    Admission::new(settings, &mut Registry::default())
}

#[tokio::test]
async fn requests_over_the_limit_wait_in_order_and_get_room_as_it_frees() {
    let admission = admission(Settings {
        max_queued: 2,
        ..Settings::adaptive(1, Duration::from_secs(5))
    });
    let first = admission.acquire().await.expect("room");
    let second = tokio::spawn({
        let admission = Arc::clone(&admission);
        async move { admission.acquire().await }
    });
    let third = tokio::spawn({
        let admission = Arc::clone(&admission);
        async move { admission.acquire().await }
    });
    while admission.lock().queued < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(admission.acquire().await.err(), Some(Shed::QueueFull));
    drop(first);
    let second = second.await.expect("task").expect("room after the first");
    assert!(!third.is_finished());
    drop(second);
    third.await.expect("task").expect("room after the second");
    assert_eq!(admission.lock().in_flight, 0);
}

#[tokio::test]
async fn a_wait_that_runs_out_is_refused_and_its_room_goes_to_the_next() {
    let admission = admission(Settings::adaptive(1, Duration::from_millis(50)));
    let held = admission.acquire().await.expect("room");
    let started = Instant::now();
    assert_eq!(admission.acquire().await.err(), Some(Shed::QueueTimeout));
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(admission.lock().queued, 0);
    drop(held);
    admission
        .acquire()
        .await
        .expect("room once the holder is done");
}

#[tokio::test]
async fn a_fixed_limit_refuses_at_once() {
    let admission = admission(Settings::fixed(1));
    let _held = admission.acquire().await.expect("room");
    assert_eq!(admission.acquire().await.err(), Some(Shed::OverLimit));
}

#[tokio::test]
async fn the_limit_grows_while_requests_wait_on_an_idle_runtime() {
    let admission = admission(Settings {
        initial: 4,
        ..Settings::adaptive(64, Duration::from_secs(10))
    });
    let stop = CancellationToken::new();
    admission.spawn_adaptation(stop.clone());
    // Twenty requests held, as if waiting on a distant peer: only four fit at first.
    let (release, _) = tokio::sync::broadcast::channel::<()>(1);
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..20 {
        let (admission, held) = (Arc::clone(&admission), Arc::clone(&held));
        let mut released = release.subscribe();
        tokio::spawn(async move {
            let _permit = admission.acquire().await;
            held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = released.recv().await;
        });
    }
    let started = Instant::now();
    while held.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the limit stayed at {} with requests waiting",
            admission.limit()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(admission.limit() >= 20);
    stop.cancel();
}

/// Keeps the runtime's thread on the CPU 5 ms at a time, as a saturated service does, and
/// reports whether the adaptive limit shrank within 5 s.
async fn the_limit_shrinks_under_a_busy_runtime() -> bool {
    let admission = admission(Settings::adaptive(1024, Duration::from_secs(1)));
    let before = admission.limit();
    let stop = CancellationToken::new();
    admission.spawn_adaptation(stop.clone());
    let busy = tokio::spawn(async {
        loop {
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(5) {
                std::hint::spin_loop();
            }
            tokio::task::yield_now().await;
        }
    });
    let started = Instant::now();
    let shrunk = loop {
        if admission.limit() < before {
            break true;
        }
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
        tokio::task::yield_now().await;
    };
    busy.abort();
    stop.cancel();
    shrunk
}

#[tokio::test]
async fn the_limit_shrinks_when_the_runtime_is_saturated() {
    assert!(
        the_limit_shrinks_under_a_busy_runtime().await,
        "the limit stayed where it was on a saturated runtime"
    );
}

/// Pins the calling thread to the first CPU it may run on.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn pin_to_one_cpu() {
    // SAFETY: the set is a plain bitmask owned by this frame; the call reads it and affects
    // only the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| libc::CPU_ISSET(cpu, &set))
            .expect("a CPU this thread may run on");
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(first, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// A runtime that gets only half a CPU because another process spins on the same one is as
/// saturated as one that has the CPU to itself: more requests in flight would not get it more.
/// (With the CPU time alone as the measure, it looks half idle and the limit never shrinks.)
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_limit_shrinks_when_the_runtime_waits_for_a_cpu_it_shares() {
    pin_to_one_cpu();
    // The neighbour inherits this thread's single CPU.
    /// Killed however the test ends, so that a failure leaves no spinning process behind.
    struct Neighbour(std::process::Child);
    impl Drop for Neighbour {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let neighbour = Neighbour(
        std::process::Command::new("yes")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("yes, the spinning neighbour"),
    );
    let shrunk = the_limit_shrinks_under_a_busy_runtime().await;
    drop(neighbour);
    assert!(
        shrunk,
        "the limit stayed where it was on a runtime sharing its CPU"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_while_waiting_leaves_the_queue() {
    let admission = admission(Settings::adaptive(1, Duration::from_secs(10)));
    let held = admission.acquire().await.expect("room");
    let waiting = tokio::spawn({
        let admission = Arc::clone(&admission);
        async move { admission.acquire().await }
    });
    while admission.lock().queued == 0 {
        tokio::task::yield_now().await;
    }
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(admission.lock().queued, 0);
    drop(held);
    admission.acquire().await.expect("room");
}

#[tokio::test]
async fn room_left_when_the_queue_drains_goes_to_a_held_connection() {
    let admission = admission(Settings::adaptive(2, Duration::from_secs(30)));
    let first = admission.acquire().await.expect("room");
    let second = admission.acquire().await.expect("room");
    let queued = tokio::spawn({
        let admission = Arc::clone(&admission);
        async move { admission.acquire().await }
    });
    while admission.lock().queued < 1 {
        tokio::task::yield_now().await;
    }
    // A connection behind the read gate, after the queued request.
    let (readers, _) = admission.read_gate();
    let _held = admission.read_paused();
    let notified = readers.notified_owned();
    tokio::pin!(notified);
    notified.as_mut().enable();
    // Both releases come before the queued request runs: one room is its, the other the held
    // connection's.
    drop(first);
    drop(second);
    let _queued = queued.await.expect("task").expect("room");
    tokio::time::timeout(Duration::from_secs(5), notified)
        .await
        .expect("room was left and the held connection was never woken");
}

#[tokio::test]
async fn a_release_with_nobody_held_leaves_no_wake_up_behind() {
    let admission = admission(Settings::adaptive(1, Duration::from_secs(30)));
    drop(admission.acquire().await.expect("room"));
    let _in_flight = admission.acquire().await.expect("room");
    assert!(!admission.may_read());
    let (readers, _) = admission.read_gate();
    let notified = readers.notified_owned();
    tokio::pin!(notified);
    notified.as_mut().enable();
    let woken =
        std::future::poll_fn(|cx| std::task::Poll::Ready(notified.as_mut().poll(cx).is_ready()))
            .await;
    assert!(
        !woken,
        "a connection held while the limit was reached was let through by an old wake-up"
    );
}

#[tokio::test]
async fn a_new_connection_does_not_pass_one_already_held() {
    let admission = admission(Settings::adaptive(1, Duration::from_secs(30)));
    let permit = admission.acquire().await.expect("room");
    let _held = admission.read_paused();
    drop(permit);
    // Room, but it is the held connection's.
    assert!(!admission.may_read());
}

#[tokio::test]
async fn a_connection_held_by_the_read_gate_lets_the_limit_grow() {
    let admission = admission(Settings {
        initial: 4,
        ..Settings::adaptive(64, Duration::from_secs(10))
    });
    let stop = CancellationToken::new();
    admission.spawn_adaptation(stop.clone());
    // Three requests in flight (as if waiting on a distant peer) and a connection held behind
    // the gate: the limit was met, though at the end of a window one permit may be between a
    // request that ended and the held connection it went to.
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        in_flight.push(admission.acquire().await.expect("room"));
    }
    let _held = admission.read_paused();
    let started = Instant::now();
    while admission.limit() <= 4 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the limit stayed at 4 with a connection held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
}
