//! The engine's due-time index: every durable wait (a timer, a signal wait's timeout, a retry's
//! backoff) of every saga sits in one ordered map, and one scheduler task sleeps until the
//! nearest due time. Thousands of sleeping sagas cost one parked task and one map entry each:
//! nothing polls.
//!
//! The index lives in memory. What makes a timer durable is its journaled due time: on
//! recovery every saga in flight replays, and its wait re-enters the index with the due time
//! from its journal, so it fires at the original time, not at restart plus its length.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot, watch};

use crate::clock::Clock;
use crate::event::Timestamp;
use crate::lock::lock;

/// The due-time index and the wake-up of its scheduler.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    /// What "due" is measured against: the wall clock, or a test's virtual one.
    clock: Clock,
    /// (due, arrival number) → who to wake. The arrival number keeps equal due times apart.
    due: Mutex<Index>,
    /// Woken when a new entry becomes the nearest one.
    earlier: Notify,
}

#[derive(Debug, Default)]
struct Index {
    entries: BTreeMap<(Timestamp, u64), oneshot::Sender<()>>,
    next: u64,
}

/// Removes a wait's entry when the wait is dropped before it fires (a cancelled saga, a signal
/// that came first), so the index holds only live waits.
struct Entry<'a> {
    timers: &'a Timers,
    key: (Timestamp, u64),
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        lock(&self.timers.due).entries.remove(&self.key);
    }
}

impl Timers {
    /// Starts the scheduler task; it ends when the engine shuts down.
    pub fn start(shutdown: watch::Receiver<bool>, clock: Clock) -> Arc<Self> {
        let timers = Arc::new(Self { clock, ..Self::default() });
        tokio::spawn(timers.clone().schedule(shutdown));
        timers
    }

    /// The engine's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The current time on the engine's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Resolves at `due` on the engine's clock, or at once if it has passed.
    pub async fn sleep_until(&self, due: Timestamp) {
        if due <= self.now() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let (key, nearest) = {
            let mut index = lock(&self.due);
            let key = (due, index.next);
            index.next += 1;
            index.entries.insert(key, tx);
            (key, index.entries.first_key_value().is_some_and(|(first, _)| *first == key))
        };
        let _entry = Entry { timers: self, key };
        if nearest {
            self.earlier.notify_one();
        }
        // An error means the scheduler is gone (the engine shut down): the saga is being
        // suspended, so the wait simply never ends.
        if rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// How many waits the index holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.due).entries.len()
    }

    async fn schedule(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let nearest = {
                let mut index = lock(&self.due);
                let now = self.now();
                while let Some(entry) = index.entries.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let _ = entry.remove().send(());
                }
                index.entries.first_key_value().map(|(key, _)| key.0)
            };
            let sleep = async {
                match nearest {
                    Some(due) => self.clock.sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.earlier.notified() => {}
                _ = shutdown.wait_for(|stopping| *stopping) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::{Future, poll_fn};
    use std::pin::{Pin, pin};
    use std::task::Poll;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

    #[tokio::test]
    async fn waits_fire_in_due_order_and_dropped_waits_leave_the_index() {
        let (_stop, shutdown) = watch::channel(false);
        let timers = Timers::start(shutdown, Clock::System);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let now = Timestamp::now();
        let mut waits: Vec<Wait> = Vec::new();
        for (label, ms) in [("late", 300u64), ("early", 100), ("middle", 200)] {
            let (timers, tx) = (timers.clone(), tx.clone());
            let due = now.after(Duration::from_millis(ms));
            waits.push(Box::pin(async move {
                timers.sleep_until(due).await;
                let woke = Timestamp::now();
                // The scheduler takes due entries off the index in due order before it wakes
                // them, so no earlier wait may still be in it, whichever task runs first.
                let earlier_waiting = lock(&timers.due).entries.keys().filter(|(d, _)| *d < due).count();
                let _ = tx.send((label, due, woke, earlier_waiting));
            }));
        }
        let dropped: Wait = {
            let timers = timers.clone();
            Box::pin(async move { timers.sleep_until(now.after(Duration::from_secs(3600))).await })
        };
        waits.push(dropped);
        // Every wait enters the index here, before this task lets the scheduler or any other
        // task run, and well before the first is due: which fires first is then up to their
        // due times alone, not to when each got to register.
        poll_fn(|cx| {
            for wait in &mut waits {
                assert!(wait.as_mut().poll(cx).is_pending(), "a wait was due before it was registered");
            }
            Poll::Ready(())
        })
        .await;
        assert_eq!(timers.len(), 4, "every wait is in the index before the first is due");
        let dropped = tokio::spawn(waits.pop().unwrap());
        for wait in waits {
            tokio::spawn(wait);
        }
        let mut fired = Vec::new();
        for _ in 0..3 {
            let (label, due, woke, earlier_waiting) = rx.recv().await.unwrap();
            assert!(woke >= due, "{label} woke at {woke:?}, before it was due at {due:?}");
            assert_eq!(earlier_waiting, 0, "{label} fired while an earlier wait was still waiting");
            fired.push(label);
        }
        fired.sort_unstable();
        assert_eq!(fired, ["early", "late", "middle"], "each wait fires once");
        assert_eq!(timers.len(), 1, "fired waits leave the index");
        dropped.abort();
        let _ = dropped.await;
        assert_eq!(timers.len(), 0, "an aborted wait must leave the index");
    }

    #[test]
    fn due_times_round_up_to_the_next_millisecond() {
        let base = UNIX_EPOCH + Duration::from_millis(1_000);
        assert_eq!(Timestamp::at_or_after(base), Timestamp(1_000));
        assert_eq!(Timestamp::at_or_after(base + Duration::from_nanos(1)), Timestamp(1_001));
        assert_eq!(Timestamp::at_or_after(base + Duration::from_micros(999)), Timestamp(1_001));
    }

    #[tokio::test]
    async fn a_past_due_time_resolves_at_once() {
        let (_stop, shutdown) = watch::channel(false);
        let timers = Timers::start(shutdown, Clock::System);
        // At once: on its first poll, without entering the index or waiting for the scheduler.
        let mut wait = pin!(timers.sleep_until(Timestamp(0)));
        let first_poll = poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx))).await;
        assert!(first_poll.is_ready(), "a past due time must not wait");
        assert_eq!(timers.len(), 0);
    }
}
