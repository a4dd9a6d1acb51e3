//! One retry policy for every retry: how many tries, and the pause before
//! each next one (doubling from `first_pause`, at most `max_pause`).
//!
//! Each caller decides what is worth another try (a deadlock PostgreSQL
//! rolled back, a lock it could not have at once, a Redis write that
//! missed); the policy decides how often and how long apart. A retried
//! operation must be safe to run again: a transaction rolled back whole, a
//! version-guarded write.

use std::time::Duration;

/// How often, and how far apart, an operation is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all (the first included); at least 1.
    pub attempts: u32,
    /// The pause after the first failed try.
    pub first_pause: Duration,
    /// The longest pause.
    pub max_pause: Duration,
}

impl Retry {
    /// `attempts` tries, pauses doubling from `first_pause` up to `max_pause`.
    pub const fn new(attempts: u32, first_pause: Duration, max_pause: Duration) -> Retry {
        Retry {
            attempts,
            first_pause,
            max_pause,
        }
    }

    /// `attempts` tries, the same pause between each.
    pub const fn steady(attempts: u32, pause: Duration) -> Retry {
        Retry::new(attempts, pause, pause)
    }

    /// The pause after failed try number `attempt` (1-based).
    pub fn pause(&self, attempt: u32) -> Duration {
        let doubled = self
            .first_pause
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        doubled.min(self.max_pause)
    }

    /// True when try number `attempt` (1-based) may be followed by another.
    pub fn again(&self, attempt: u32) -> bool {
        attempt < self.attempts
    }

    /// Runs `op` until it succeeds, fails with an error `retryable` does
    /// not take, or the tries run out (the last error is returned).
    pub async fn run<T, E, F, Fut>(&self, mut op: F, retryable: impl Fn(&E) -> bool) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if retryable(&e) && self.again(attempt) => {
                    tokio::time::sleep(self.pause(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_longest() {
        let r = Retry::new(6, Duration::from_millis(20), Duration::from_millis(100));
        let pauses: Vec<u128> = (1..=5).map(|a| r.pause(a).as_millis()).collect();
        assert_eq!(pauses, vec![20, 40, 80, 100, 100]);
        assert!(r.again(5) && !r.again(6));
        assert_eq!(
            Retry::steady(3, Duration::from_secs(1)).pause(3),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_at_success_at_a_final_error_and_when_tries_run_out() {
        let r = Retry::steady(3, Duration::from_secs(1));
        let mut calls = 0;
        let ok: Result<u32, &str> = r
            .run(
                || {
                    calls += 1;
                    let n = calls;
                    async move { if n < 2 { Err("busy") } else { Ok(n) } }
                },
                |e| *e == "busy",
            )
            .await;
        assert_eq!(ok, Ok(2));
        let mut calls = 0;
        let fatal: Result<(), &str> = r
            .run(
                || {
                    calls += 1;
                    async { Err("fatal") }
                },
                |e| *e == "busy",
            )
            .await;
        assert_eq!((fatal, calls), (Err("fatal"), 1));
        let mut calls = 0;
        let busy: Result<(), &str> = r
            .run(
                || {
                    calls += 1;
                    async { Err("busy") }
                },
                |e| *e == "busy",
            )
            .await;
        assert_eq!((busy, calls), (Err("busy"), 3));
    }
}
