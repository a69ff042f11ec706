use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

use super::interrupt::Interrupt;
use crate::lock::lock;
use crate::step_context::{StepSignals, first_reason};

/// What reaches a saga from outside: a cancel, the engine's shutdown, signals, and an
/// operator's pause, resume and retry-now.
#[derive(Debug)]
pub(crate) struct Control {
    pub cancel: watch::Sender<Option<String>>,
    /// Whether the saga is paused: its operations and compensations wait before they start.
    pub paused: watch::Sender<bool>,
    /// The sequence number of the last journaled `RetryNowRequested` (0: none in this
    /// process): a retry whose failure was journaled before it is due at once, as replay
    /// decides from the journal.
    pub retry_now: watch::Sender<u64>,
    /// Step and compensation attempts waiting out a backoff now: what a retry-now can cut.
    pub backoffs: watch::Sender<usize>,
    /// Held by whoever journals an operator's request (cancel, pause, resume, retry now),
    /// so that the order of their events is the order in which the saga sees them.
    pub requests: tokio::sync::Mutex<()>,
    pub shutdown: watch::Receiver<bool>,
    /// Set when this driver hands the saga over (a shared store): another engine took it, or
    /// a failed write stops it until it is resumed from the database's journal. What its
    /// attempts started goes on for the next driver, which re-attaches to it. Shared with the
    /// journal, whose halt is how the driver itself learns it.
    pub handed_over: Arc<watch::Sender<bool>>,
    /// Signals journaled for this saga, by sequence number: (name, payload). Consumed ones
    /// stay; [`SagaShared::consumed`](super::SagaShared::consumed) tells them apart.
    pub inbox: Mutex<BTreeMap<u64, (String, Vec<u8>)>>,
    /// Bumped after each signal is added to the inbox.
    pub arrivals: watch::Sender<u64>,
    /// The durable timers the saga waits on now ([`Control::timer_waiting`]).
    timers: AtomicUsize,
}

/// Counts one timer wait while it lasts: dropped when it fires, or with its cancelled saga.
pub(crate) struct TimerWaiting<'a>(&'a AtomicUsize);

impl Drop for TimerWaiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Control {
    pub fn new(shutdown: watch::Receiver<bool>, handed_over: Arc<watch::Sender<bool>>) -> Self {
        Self {
            cancel: watch::Sender::new(None),
            paused: watch::Sender::new(false),
            retry_now: watch::Sender::new(0),
            backoffs: watch::Sender::new(0),
            requests: tokio::sync::Mutex::new(()),
            shutdown,
            handed_over,
            inbox: Mutex::default(),
            arrivals: watch::Sender::new(0),
            timers: AtomicUsize::new(0),
        }
    }

    /// Counts a live timer wait until the guard is dropped.
    pub fn timer_waiting(&self) -> TimerWaiting<'_> {
        self.timers.fetch_add(1, Ordering::Relaxed);
        TimerWaiting(&self.timers)
    }

    /// How many durable timers the saga waits on now.
    pub fn timers_waiting(&self) -> usize {
        self.timers.load(Ordering::Relaxed)
    }

    /// How many signal waits the saga has now: a wait holds a subscription to
    /// [`arrivals`](Self::arrivals) for as long as it waits, and nothing else subscribes.
    pub fn signal_waits(&self) -> usize {
        self.arrivals.receiver_count()
    }

    /// How many step and compensation attempts wait out a backoff now.
    pub fn backoffs_waiting(&self) -> usize {
        *self.backoffs.borrow()
    }

    /// Adds a journaled signal and wakes the saga's waits.
    pub fn deliver(&self, seq: u64, name: String, payload: Vec<u8>) {
        lock(&self.inbox).insert(seq, (name, payload));
        self.arrivals.send_modify(|n| *n += 1);
    }

    pub(super) fn cancelled(&self) -> Option<String> {
        self.cancel.borrow().clone()
    }

    pub fn signals(&self, stop: watch::Receiver<Option<String>>) -> StepSignals {
        StepSignals {
            cancel: self.cancel.subscribe(),
            stop,
            shutdown: self.shutdown.clone(),
            handed_over: self.handed_over.subscribe(),
        }
    }

    /// Resolves with the reason once a cancel is requested.
    pub(super) async fn cancel_requested(&self) -> String {
        first_reason(self.cancel.subscribe()).await
    }

    pub(super) fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Resolves once the saga is not paused.
    pub(super) async fn resumed(&self) {
        // The sender lives as long as `self`, so the wait ends only when the value does.
        let _ = self.paused.subscribe().wait_for(|paused| !paused).await;
    }

    /// Resolves once a retry-now is journaled after the event at `seq`.
    pub(super) async fn retry_now_after(&self, seq: u64) {
        let _ = self.retry_now.subscribe().wait_for(|last| *last > seq).await;
    }

    pub(super) fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when a cancel arrives (if `watch_cancel`) or shutdown begins.
    pub(super) async fn stopped(&self, watch_cancel: bool) -> Interrupt {
        let mut cancel = self.cancel.subscribe();
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            Ok(reason) = cancel.wait_for(Option::is_some), if watch_cancel => {
                Interrupt::Cancelled(reason.clone().unwrap_or_default())
            }
            _ = shutdown.wait_for(|s| *s) => Interrupt::Suspended,
        }
    }
}
