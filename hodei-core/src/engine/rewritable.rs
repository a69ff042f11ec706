//! Resuming the sagas a failed write stopped, on a store that says when it takes writes again
//! (the sled store on a full disk: [`EventStore::writable`]).
//!
//! Such a saga is not parked: it stops, writing nothing more, as on a shared store whose
//! database went away, and is resumed from the store's journal once the store takes writes
//! again. A step whose end was not written runs again, as any step interrupted before its end is
//! journaled.
//!
//! [`EventStore::writable`]: crate::store::EventStore::writable

use std::sync::Arc;

use tokio::sync::watch;

use super::state::Inner;
use crate::lock::lock;

/// Starts the task that resumes them; it ends with the engine's shutdown, or once the engine
/// is gone.
pub(super) fn start(inner: &Arc<Inner>, mut writable: watch::Receiver<bool>) {
    // A dropped engine drops its shutdown sender too, which ends the waits below.
    let mut shutdown = inner.shutdown.subscribe();
    let halted = inner.halted.clone();
    let inner = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stopping| *stopping) => return,
                () = halted.notified() => {}
            }
            // A saga stops when a write is refused, and the refusal says the store takes no
            // writes before it returns: this waits for the store to take them again.
            tokio::select! {
                _ = shutdown.wait_for(|stopping| *stopping) => return,
                takes = writable.wait_for(|takes| *takes) => if takes.is_err() { return },
            }
            let Some(inner) = inner.upgrade() else { return };
            // Resuming reads journals: off the runtime's workers.
            let resuming = inner.clone();
            let resumed = tokio::task::spawn_blocking(move || {
                let _one_at_a_time = lock(&resuming.resuming);
                resuming.resume_unwritten(&[])
            })
            .await;
            if let Err(e) = resumed {
                tracing::error!(error = %e, "the task resuming stopped sagas failed");
            }
            // Whoever waits for one of them looks again.
            inner.beats.send_modify(|rounds| *rounds += 1);
        }
    });
}
