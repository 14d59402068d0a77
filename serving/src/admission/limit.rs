//! The adaptive limit's rule: from what one adjustment window saw (queueing delay, CPU use,
//! whether requests met the limit) to the next limit.

use std::time::Duration;

/// The queueing delay above which the service counts as saturated. A runtime with CPU to spare
/// runs a woken task within tens of microseconds; a saturated one makes it wait for every task
/// ahead of it, milliseconds at the request rates here.
pub const QUEUEING_TARGET: Duration = Duration::from_millis(2);

/// The smallest limit the adaptation goes to.
const FLOOR: usize = 16;

/// What one adjustment window saw.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    /// The mean queueing delay.
    pub(super) delay: Duration,
    /// The share of the serving threads' time spent on a CPU or waiting for one.
    pub(super) busy: f64,
    /// Whether requests met the limit.
    pub(super) limited: bool,
}

/// The share of the serving threads' time on a CPU or waiting for one above which, with a queueing delay above
/// [`QUEUEING_TARGET`], the service counts as saturated.
const BUSY: f64 = 0.9;

/// The limit after `window`. Both signals must say saturated for it to shrink: a long queueing
/// delay alone also comes from a burst of new connections' requests, which the limit does not
/// control (they are read before they meet it), and shrinking for it would leave the CPU idle
/// with requests waiting.
pub(super) fn next_limit(limit: usize, window: Window, ceiling: usize) -> usize {
    let floor = FLOOR.min(ceiling);
    if window.delay > QUEUEING_TARGET && window.busy >= BUSY {
        (limit - limit / 10).max(floor)
    } else if window.limited {
        (limit + limit / 5 + 1).min(ceiling)
    } else {
        limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_shrinks_when_saturated_and_grows_only_when_it_was_met() {
        let window = |ms: u64, busy: f64, limited: bool| Window {
            delay: Duration::from_micros(ms * 1000),
            busy,
            limited,
        };
        // Saturated: a long queueing delay on a busy thread.
        assert_eq!(next_limit(100, window(5, 0.95, true), 1000), 90);
        assert_eq!(next_limit(100, window(5, 0.95, false), 1000), 90);
        // A long delay on a thread with time to spare (a burst of new connections): not
        // saturated, so the limit grows when it was met.
        assert_eq!(next_limit(100, window(20, 0.6, true), 1000), 121);
        // A busy thread with no queue: requests wait on something else.
        assert_eq!(next_limit(100, window(0, 0.99, true), 1000), 121);
        assert_eq!(next_limit(100, window(0, 0.2, false), 1000), 100);
        assert_eq!(next_limit(990, window(0, 0.2, true), 1000), 1000);
        assert_eq!(next_limit(16, window(50, 1.0, true), 1000), 16);
        assert_eq!(next_limit(4, window(50, 1.0, true), 4), 4);
    }
}
