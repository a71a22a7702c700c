//! Pacing of the request loops: a token bucket bounds the query rate, and failures back
//! off exponentially with jitter.

use rand::Rng;
use std::{future::Future, time::Duration};
use tokio::time::Instant;

/// A token bucket: up to `burst` requests at once, `rate` per second sustained. A loop
/// whose queries return at once (an index that changes all the time, or a server that
/// does not block) is held to the rate; a loop that blocks as intended never waits.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// The slowest rate a bucket runs at: a rate of 0, negative or NaN (never accepted by
/// the configuration, but the type allows it) means this, not a division by zero.
const MIN_RATE: f64 = 1e-3;
/// The longest a bucket ever makes a caller wait for one token.
const MAX_WAIT: Duration = Duration::from_secs(3600);

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        // `f64::max` ignores NaN; infinity is a bucket that never makes anyone wait.
        let rate = if rate.is_nan() {
            MIN_RATE
        } else {
            rate.max(MIN_RATE)
        };
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// How long until a token is available (zero when one is), taking it.
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let refill = elapsed * self.rate;
        // 0 × ∞ is NaN: an infinite rate refills to the brim whatever the elapsed time.
        let refill = if refill.is_nan() { self.burst } else { refill };
        // The debt never grows past what `MAX_WAIT` repays, so it cannot overflow.
        let floor = -(MAX_WAIT.as_secs_f64() * self.rate);
        self.tokens = ((self.tokens + refill).min(self.burst) - 1.0).max(floor);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            // The debt is paid by the refill during the wait.
            Duration::try_from_secs_f64(-self.tokens / self.rate)
                .map_or(MAX_WAIT, |d| d.min(MAX_WAIT))
        }
    }

    /// Waits for a token.
    pub(crate) async fn acquire(&mut self) {
        let wait = self.take(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Exponential backoff with "equal jitter": the n-th consecutive failure waits between
/// half and all of `min(max, base × 2^(n-1))`, so a fleet that lost its agent at the
/// same moment does not come back in lockstep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    pub(crate) fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let ceiling = self.base.saturating_mul(1 << exp).min(self.max);
        let half = ceiling / 2;
        // Saturating: with a `max` near `Duration::MAX` the float product can round up.
        half.saturating_add(half.mul_f64(rand::rng().random::<f64>()))
            .min(ceiling)
    }
}

/// How a supervised task's run ended, when it ended without panicking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Its work is over: the supervisor returns.
    Done,
    /// It should not have ended: started again like after a panic.
    Restart,
}

/// A task that ran this long before failing starts over with the shortest backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `start()`'s future in a task of its own, and again after a backoff whenever it
/// panics or returns [`Exit::Restart`], telling `failed` why ("panicked: …" or
/// "ended"), the restart count and the delay first. A loop that should run for the life
/// of the process must not silently stop on a bug. Returns when a run returns
/// [`Exit::Done`] or the runtime cancels the task; dropping the supervisor stops it.
pub(crate) async fn supervise<F, Fut>(
    backoff: Backoff,
    mut start: F,
    mut failed: impl FnMut(&str, u32, Duration),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Exit> + Send + 'static,
{
    /// Aborts the task when the supervisor goes away.
    struct Abort(tokio::task::JoinHandle<Exit>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    let mut restarts = 0u32;
    loop {
        let started = Instant::now();
        let mut task = Abort(tokio::spawn(start()));
        let why = match (&mut task.0).await {
            Ok(Exit::Done) => return,
            Ok(Exit::Restart) => "ended".to_string(),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                format!("panicked: {message}")
            }
            // Cancelled: only the runtime shutting down does that.
            Err(_) => return,
        };
        if started.elapsed() >= HEALTHY_RUN {
            restarts = 0;
        }
        restarts = restarts.saturating_add(1);
        let delay = backoff.delay(restarts);
        failed(&why, restarts, delay);
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_holds_the_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10.0, 3);
        for _ in 0..3 {
            assert_eq!(b.take(start), Duration::ZERO);
        }
        // The fourth at once owes a tenth of a second, the fifth two tenths.
        let w = b.take(start);
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-9, "{w:?}");
        let w = b.take(start);
        assert!((w.as_secs_f64() - 0.2).abs() < 1e-9, "{w:?}");
        // After a long quiet time the bucket is full again, never fuller.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(later), Duration::ZERO);
        }
        assert!(b.take(later) > Duration::ZERO);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        for (failures, ceiling) in [(1, 100), (2, 200), (3, 400), (7, 5000), (40, 5000)] {
            let ceiling = Duration::from_millis(ceiling);
            for _ in 0..50 {
                let d = b.delay(failures);
                assert!(d >= ceiling / 2 && d <= ceiling, "{failures}: {d:?}");
            }
        }
    }

    #[test]
    fn degenerate_rates_neither_panic_nor_wait_forever() {
        let start = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::NEG_INFINITY, f64::MIN_POSITIVE] {
            let mut b = TokenBucket::new(rate, 1);
            assert_eq!(b.take(start), Duration::ZERO, "rate {rate}: the burst");
            // Over the (minimum) rate: a finite wait, never more than the cap, however
            // deep in debt the callers go.
            let first = b.take(start);
            assert!(
                first > Duration::ZERO && first <= MAX_WAIT,
                "rate {rate}: {first:?}"
            );
            for _ in 0..10_000 {
                assert!(b.take(start) <= MAX_WAIT, "rate {rate}");
            }
            let capped = b.take(start);
            assert!(
                capped >= MAX_WAIT - Duration::from_millis(1),
                "rate {rate}: {capped:?}"
            );
            // And the bucket recovers once the debt is repaid.
            let later = start + MAX_WAIT * 3;
            assert_eq!(b.take(later), Duration::ZERO, "rate {rate}: refilled");
        }
        // An infinite rate never waits.
        let mut b = TokenBucket::new(f64::INFINITY, 1);
        for _ in 0..100 {
            assert_eq!(b.take(start), Duration::ZERO);
        }
        // A zero burst still lets one through.
        assert_eq!(TokenBucket::new(1.0, 0).take(start), Duration::ZERO);
    }

    #[test]
    fn backoff_with_extreme_settings_does_not_panic() {
        let b = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        for failures in [0, 1, 2, 31, u32::MAX] {
            assert!(b.delay(failures) >= Duration::MAX / 2 - Duration::from_secs(1));
        }
        let zero = Backoff {
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(zero.delay(u32::MAX), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_only_when_over_the_rate() {
        let mut b = TokenBucket::new(2.0, 1);
        let t0 = Instant::now();
        b.acquire().await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        b.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_supervised_task_is_restarted_after_a_panic_and_not_after_it_is_done() {
        use std::sync::{
            atomic::{AtomicU32, Ordering},
            Arc, Mutex,
        };
        let starts = Arc::new(AtomicU32::new(0));
        let failures = Mutex::new(Vec::new());
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let begun = Instant::now();
        supervise(
            backoff,
            || {
                let n = starts.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    match n {
                        1 => panic!("a bug"),
                        2 => Exit::Restart,
                        _ => Exit::Done,
                    }
                }
            },
            |why, restarts, delay| {
                failures
                    .lock()
                    .unwrap()
                    .push((why.to_string(), restarts, delay))
            },
        )
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 3, "ran until done, no more");
        let failures = failures.into_inner().unwrap();
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert_eq!(failures[0].0, "panicked: a bug");
        assert_eq!(failures[1].0, "ended");
        assert_eq!((failures[0].1, failures[1].1), (1, 2));
        // Jittered exponential backoff: 50–100 ms, then 100–200 ms, both slept.
        assert!(
            failures[0].2 >= Duration::from_millis(50)
                && failures[0].2 <= Duration::from_millis(100)
        );
        assert!(
            failures[1].2 >= Duration::from_millis(100)
                && failures[1].2 <= Duration::from_millis(200)
        );
        assert!(begun.elapsed() >= failures[0].2 + failures[1].2);
    }
}
