//! Waiting on a condition under a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `condition` every few milliseconds until it holds, panicking with `what` when
/// `timeout` passes first.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
