//! Step failures and the retry policy that decides what happens next.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a step or compensation failed: retryable (it may work next time) or terminal.
///
/// Any `std::error::Error` converts into a retryable `StepError`, so `?` works in step bodies;
/// use [`StepError::terminal`] for failures that retrying cannot fix. Like Restate's
/// `HandlerError`, this type deliberately does not implement `std::error::Error`, which is what
/// makes the blanket conversion possible.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    message: String,
    retryable: bool,
}

impl StepError {
    /// A failure that may go away: the step is retried under its policy.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self { message: message.to_string(), retryable: true }
    }

    /// A failure that retrying cannot fix: the step fails at once.
    pub fn terminal(message: impl fmt::Display) -> Self {
        Self { message: message.to_string(), retryable: false }
    }

    /// Whether the failure is retryable.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The failure's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self { message, retryable: true }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable { "retryable" } else { "terminal" };
        write!(f, "StepError({kind}: {:?})", self.message)
    }
}

/// When to try a failed step again.
///
/// Out-of-range values are clamped rather than refused, so every policy is valid: at least one
/// attempt, a multiplier of at least 1, jitter between 0 and 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    multiplier: f64,
    max_backoff: Duration,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// Three attempts, 1 s then 2 s apart, with 20 % jitter.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(60),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// The default policy with another attempt count.
    pub fn attempts(max_attempts: u32) -> Self {
        Self::default().max_attempts(max_attempts)
    }

    /// Total attempts, the first included (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The wait before the second attempt.
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    /// How much each wait grows over the previous one (at least 1).
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = if m.is_finite() { m.max(1.0) } else { 1.0 };
        self
    }

    /// The longest wait.
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// The fraction of each wait that is randomised, from 0 (none) to 1.
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() { j.clamp(0.0, 1.0) } else { 0.0 };
        self
    }

    /// Total attempts allowed.
    pub fn get_max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether another attempt may follow attempt `attempt` (counted from 1).
    pub fn allows_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The wait after attempt `attempt` (from 1) failed. `seed` spreads the jitter: the engine
    /// passes the step's idempotency key, so the wait is reproducible for one step and
    /// decorrelated across steps. It is journaled as a due time, so replay never recomputes it.
    pub fn backoff(&self, attempt: u32, seed: &str) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (seed, attempt).hash(&mut hasher);
        let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64; // in [0, 1)
        let factor = 1.0 - self.jitter * unit;
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::attempts(10)
            .initial_backoff(Duration::from_millis(100))
            .multiplier(2.0)
            .max_backoff(Duration::from_millis(500))
            .jitter(0.0);
        let waits: Vec<_> = (1..=5).map(|a| p.backoff(a, "s").as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_is_reproducible() {
        let p = RetryPolicy::attempts(5).initial_backoff(Duration::from_secs(1)).jitter(0.5);
        for seed in ["a", "b", "c", "d"] {
            let w = p.backoff(1, seed);
            assert!(w <= Duration::from_secs(1) && w >= Duration::from_millis(500), "{w:?}");
            assert_eq!(w, p.backoff(1, seed));
        }
        assert_ne!(p.backoff(1, "a"), p.backoff(1, "b"));
    }

    #[test]
    fn out_of_range_values_are_clamped() {
        let p = RetryPolicy::none().max_attempts(0).multiplier(f64::NAN).jitter(7.0);
        assert_eq!(p.get_max_attempts(), 1);
        assert!(!p.allows_after(1));
        assert_eq!(p.multiplier, 1.0);
        assert_eq!(p.jitter, 1.0);
    }

    #[test]
    fn errors_convert_as_retryable_with_their_chain() {
        let io = std::io::Error::other("disk full");
        let e: StepError = io.into();
        assert!(e.is_retryable());
        assert_eq!(e.message(), "disk full");
        assert!(!StepError::terminal("bad config").is_retryable());
    }
}
