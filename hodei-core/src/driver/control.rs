use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;

use super::interrupt::Interrupt;
use crate::lock::lock;
use crate::step_context::{StepSignals, first_reason};

/// What reaches a saga from outside: a cancel, the engine's shutdown, and signals.
#[derive(Debug)]
pub(crate) struct Control {
    pub cancel: watch::Sender<Option<String>>,
    pub shutdown: watch::Receiver<bool>,
    /// Signals journaled for this saga, by sequence number: (name, payload). Consumed ones
    /// stay; [`SagaShared::consumed`](super::SagaShared::consumed) tells them apart.
    pub inbox: Mutex<BTreeMap<u64, (String, Vec<u8>)>>,
    /// Bumped after each signal is added to the inbox.
    pub arrivals: watch::Sender<u64>,
}

impl Control {
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self {
            cancel: watch::Sender::new(None),
            shutdown,
            inbox: Mutex::default(),
            arrivals: watch::Sender::new(0),
        }
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
        StepSignals { cancel: self.cancel.subscribe(), stop, shutdown: self.shutdown.clone() }
    }

    /// Resolves with the reason once a cancel is requested.
    pub(super) async fn cancel_requested(&self) -> String {
        first_reason(self.cancel.subscribe()).await
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
