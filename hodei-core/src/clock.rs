//! The engine's clock: the wall clock, or a virtual one that time-skipping tests move.
//!
//! Every time the engine journals (an event's stamp, a timer's due time, a signal wait's
//! deadline, a retry's backoff) is read from its clock, and every durable wait sleeps on it, so
//! that a test engine whose clock is virtual runs a day-long saga in milliseconds with the same
//! code and the same journal as production.

use std::time::{Duration, SystemTime};

use crate::event::Timestamp;

/// What Tokio adds to a deadline to round it up to its next millisecond.
const TOKIO_ROUNDING: Duration = Duration::from_nanos(999_999);

/// Where an engine reads the time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum Clock {
    /// The machine's wall clock.
    #[default]
    System,
    /// Starts at `epoch` and moves with Tokio's clock from `origin`. Under Tokio's paused clock
    /// (a time-skipping test) it stands still while any task has work, and Tokio moves it to
    /// the next due timer as soon as every task waits: time skips exactly when every saga is
    /// blocked.
    #[cfg_attr(not(any(feature = "testing", test)), allow(dead_code))]
    Virtual { epoch: SystemTime, origin: tokio::time::Instant },
}

impl Clock {
    /// A virtual clock that reads `epoch`, to the millisecond, now.
    #[cfg_attr(not(any(feature = "testing", test)), allow(dead_code))]
    pub fn starting_at(epoch: SystemTime) -> Self {
        // On a whole millisecond, every due time is a whole number of milliseconds away,
        // which is what lets a sleep land on it exactly (see `sleep_until`).
        let epoch = Timestamp::of(epoch).as_system_time();
        Clock::Virtual { epoch, origin: tokio::time::Instant::now() }
    }

    /// The current time, to the nanosecond the clock has.
    pub fn system_time(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Virtual { epoch, origin } => *epoch + origin.elapsed(),
        }
    }

    /// The current time, as the journal stamps it.
    pub fn now(&self) -> Timestamp {
        Timestamp::of(self.system_time())
    }

    /// The due time of a wait of `length` that starts now: rounded up to the journal's
    /// millisecond, so that it never ends early.
    pub fn due_after(&self, length: Duration) -> Timestamp {
        match length.is_zero() {
            true => self.now(),
            false => Timestamp::at_or_after(self.system_time() + length),
        }
    }

    /// Resolves once this clock reads `due` or later.
    pub async fn sleep_until(&self, due: Timestamp) {
        match self {
            Clock::System => tokio::time::sleep(due.remaining()).await,
            Clock::Virtual { epoch, origin } => {
                let since_epoch = due.as_system_time().duration_since(*epoch).unwrap_or_default();
                // Tokio rounds a deadline up to the next millisecond of its own clock, whose
                // milliseconds need not begin where ours do, and a paused clock jumps by whole
                // milliseconds: the sleep would end up to a millisecond late. Asking for just
                // under a millisecond less lands the jump on the due time itself.
                let target = *origin + since_epoch;
                let early = target.checked_sub(TOKIO_ROUNDING).unwrap_or(*origin).max(*origin);
                tokio::time::sleep_until(early).await;
                // Short only if time was moved by a fraction of a millisecond by hand.
                if self.system_time() < due.as_system_time() {
                    tokio::time::sleep_until(target).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_virtual_clock_moves_only_with_tokios_clock() {
        let epoch = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Clock::starting_at(epoch);
        assert_eq!(clock.now(), Timestamp(1_000_000_000));
        let due = clock.due_after(Duration::from_secs(86_400));
        assert_eq!(due, Timestamp(1_000_000_000 + 86_400_000));
        // Tokio's paused clock jumps straight to the sleep's deadline: nothing else is waiting.
        clock.sleep_until(due).await;
        assert_eq!(clock.now(), due, "the clock reads the due time once the sleep ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_after_time_moved_by_a_fraction_of_a_millisecond_still_ends_on_time() {
        let clock = Clock::starting_at(UNIX_EPOCH + Duration::from_secs(1_000));
        tokio::time::advance(Duration::from_micros(500)).await;
        let due = clock.due_after(Duration::from_secs(60));
        clock.sleep_until(due).await;
        let late =
            clock.system_time().duration_since(due.as_system_time()).expect("a sleep never ends early");
        assert!(late < Duration::from_millis(1), "ended {late:?} after its due time");
    }

    #[test]
    fn a_wait_of_a_fraction_of_a_millisecond_rounds_up() {
        let clock = Clock::System;
        let before = clock.now();
        let due = clock.due_after(Duration::from_nanos(1));
        assert!(due > before, "a wait of 1 ns must end after the millisecond it started in");
    }
}
