//! The reconnection delays: the policy, and a backoff in progress.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The reconnection delays: exponential from `initial`, capped at `max`, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The delay before the first retry.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self { initial: Duration::from_millis(500), max: Duration::from_secs(30) }
    }
}

impl BackoffPolicy {
    /// The delay before retry number `attempt` (from 0), given `jitter` in `[0, 1]`: between half
    /// and all of `min(max, initial × 2^attempt)`. Half is kept so that the delay still grows;
    /// the other half is random so that workers cut off together do not reconnect together.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self.initial.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(self.max);
        base / 2 + base.div_f64(2.0).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// A backoff in progress: the policy and the number of failures since the last success.
#[derive(Debug)]
pub(super) struct Backoff {
    pub(super) policy: BackoffPolicy,
    pub(super) attempt: u32,
}

impl Backoff {
    pub(super) fn next(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt, jitter());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub(super) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A number in `[0, 1]`, random enough to spread reconnects: std's hasher keys are random per
/// process, and the clock differs per call. No random-number crate is needed for this.
fn jitter() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jitters_in_its_upper_half() {
        let policy = BackoffPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
        assert_eq!(policy.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(policy.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(policy.delay(1, 1.0), Duration::from_millis(200));
        assert_eq!(policy.delay(3, 0.5), Duration::from_millis(600));
        assert_eq!(policy.delay(4, 1.0), Duration::from_secs(1), "capped");
        assert_eq!(policy.delay(u32::MAX, 1.0), Duration::from_secs(1), "no overflow");
        assert_eq!(policy.delay(2, 7.0), policy.delay(2, 1.0), "jitter is clamped");

        let mut backoff = Backoff { policy, attempt: 0 };
        let delays: Vec<_> = (0..6).map(|_| backoff.next()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(50) && *d <= Duration::from_secs(1)));
        assert!(delays[5] >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100), "reset starts over");
    }

    #[test]
    fn jitter_is_in_range() {
        assert!((0..100).map(|_| jitter()).all(|j| (0.0..=1.0).contains(&j)));
    }
}
