//! The state a saga body shares with its steps, and what every operation does first.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use super::control::Control;
use super::host::Host;
use super::interrupt::Interrupt;
use super::journal::Journal;
use super::scope::Scope;
use super::spec::CompensationSpec;
use crate::event::{Event, RecordedEvent, SagaId};
use crate::lock::lock;
use crate::replay::{RecordedOp, Replay};

/// A compensation on the stack: pushed when its step starts, its output filled in when the
/// step completes.
pub(super) struct Pending {
    pub(super) step: u32,
    /// The step's idempotency key.
    pub(super) key: String,
    pub(super) name: String,
    pub(super) input: Vec<u8>,
    pub(super) output: Option<Vec<u8>>,
    pub(super) spec: CompensationSpec,
}

/// The state a saga body shares with its steps.
pub(crate) struct SagaShared {
    pub id: SagaId,
    pub host: Host,
    pub(super) journal: Arc<Journal>,
    pub(super) replay: Replay,
    /// The number the next live step gets.
    pub(super) next_step: AtomicU32,
    /// Per recorded operation (in journal order): whether the code has reached it again.
    pub(super) visited: Vec<AtomicBool>,
    /// How many recorded operations the code has not reached again.
    pub(super) unreached: AtomicUsize,
    /// Set once the code has reached every recorded operation: from then on the compensation
    /// stack holds every step the journal says started.
    pub(super) replayed: watch::Sender<bool>,
    /// The signals taken by some wait, recorded or live.
    pub(super) consumed: Mutex<HashSet<u64>>,
    pub(super) stack: Mutex<Vec<Pending>>,
    /// Step attempts running now.
    pub(super) attempts: watch::Sender<usize>,
    pub(super) interrupt: Mutex<Option<oneshot::Sender<Interrupt>>>,
    pub(super) control: Arc<Control>,
}

impl SagaShared {
    /// Stops the body: reports why to the driver, which drops the body future. Never returns.
    pub(super) async fn suspend<T>(&self, why: Interrupt) -> T {
        if let Some(tx) = lock(&self.interrupt).take() {
            let _ = tx.send(why);
        }
        std::future::pending().await
    }

    /// Stops the body because its code does not match its journal.
    pub async fn park<T>(&self, reason: String) -> T {
        self.suspend(Interrupt::Nondeterminism(reason)).await
    }

    pub(super) fn cancel_reason(&self) -> Option<String> {
        self.replay.cancel.clone().or_else(|| self.control.cancelled())
    }

    /// The operation the journal records at `key`, marked as reached.
    pub(super) fn recorded(&self, key: &str) -> Option<&RecordedOp> {
        let (position, op) = self.replay.op(key)?;
        if !self.visited[*position].swap(true, Ordering::SeqCst)
            && self.unreached.fetch_sub(1, Ordering::SeqCst) == 1
        {
            self.replayed.send_replace(true);
        }
        Some(op)
    }

    /// The first recorded operation the code has not reached again, if any.
    pub(super) fn unvisited(&self) -> Option<(&str, &'static str)> {
        let position = self.visited.iter().position(|v| !v.load(Ordering::Relaxed))?;
        let key = &self.replay.keys[position];
        Some((key, self.replay.op(key).map_or("an operation", |(_, op)| op.kind())))
    }

    /// Why the saga parks if its body ends now: it did not reach every operation the journal
    /// records, or the journal says it failed and it no longer does.
    pub(super) fn ending_mismatch(&self, completed: bool) -> Option<String> {
        if let Some((key, kind)) = self.unvisited() {
            return Some(format!(
                "the body now ends without reaching operation {key} ({kind}) that the journal records"
            ));
        }
        (completed && self.replay.body_failed.is_some())
            .then(|| "the journal says the body failed, but it now completes".to_string())
    }

    /// Parks the saga because the code calls another kind of operation at `key`.
    pub(super) async fn mismatch<T>(&self, key: &str, now: String, recorded: &RecordedOp) -> T {
        let reason = format!(
            "operation {key}: the code now {now}, but the journal recorded {} there",
            recorded.kind()
        );
        self.park(reason).await
    }

    /// Called before anything runs live (past the journal). Returns only if it may: a frozen
    /// branch stops here forever, a cancelled saga is interrupted, a saga whose journal says
    /// its body already failed is parked, and a paused saga waits here until it is resumed.
    pub(super) async fn go_live(&self, scope: &Scope, what: &str) {
        // A branch its group cancelled starts nothing more: no step of it is journaled as
        // started that could not run.
        if scope.frozen || scope.cancelled().is_some() {
            return scope.stop().await;
        }
        if let Some(reason) = self.cancel_reason() {
            if let Some(probe) = &self.host.probe {
                // A check runs no compensation either: it only notes that the run goes on.
                probe.reached_live(what);
                return std::future::pending().await;
            }
            return self.suspend(Interrupt::Cancelled(reason)).await;
        }
        if self.replay.body_failed.is_some() {
            let reason = format!(
                "{what}: the journal says the body failed before reaching it, but the code now goes on"
            );
            return self.park(reason).await;
        }
        if let Some(probe) = &self.host.probe {
            probe.reached_live(what);
            return std::future::pending().await;
        }
        if self.control.is_paused() {
            // Paused: what is running finishes, nothing new starts. A cancel lifts the pause
            // and is seen below; shutdown and a branch's cancel stop the wait as any other.
            tracing::info!(next = %what, "paused; waiting to be resumed");
            self.interruptible(scope, self.control.resumed()).await;
            if let Some(reason) = self.cancel_reason() {
                return self.suspend(Interrupt::Cancelled(reason)).await;
            }
            tracing::info!(next = %what, "resumed");
        }
    }

    /// Waits for `wait`, unless the saga or `scope`'s branch is cancelled or the engine shuts
    /// down first.
    pub(super) async fn interruptible<T>(&self, scope: &Scope, wait: impl Future<Output = T>) -> T {
        tokio::select! {
            value = wait => value,
            why = self.control.stopped(true) => self.suspend(why).await,
            _ = scope.cancel_requested() => scope.stop().await,
        }
    }

    pub(super) async fn durably(&self, event: Event) -> RecordedEvent {
        match self.journal.append_durable(event).await {
            Ok(recorded) => recorded,
            Err(e) => self.suspend(Interrupt::Storage(e.to_string())).await,
        }
    }

    pub(super) async fn staged(&self, event: Event) {
        if let Err(e) = self.journal.stage(event) {
            self.suspend(Interrupt::Storage(e.to_string())).await
        }
    }
}
