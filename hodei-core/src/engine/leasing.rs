//! The beat of an engine that shares its store with others: renew the lease, take over the
//! sagas of engines whose lease lapsed, and let go of those taken from this one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::state::Inner;
use crate::store::Renewal;

/// Sagas claimed at one beat, at most: engines beating at once share out a dead engine's sagas
/// (claims skip the rows another engine is claiming) instead of the first taking them all.
const CLAIMS_PER_BEAT: usize = 256;

/// Starts the beat; it ends with the engine's shutdown, or once the engine is gone.
pub(super) fn start(inner: &Arc<Inner>, beat: Duration) {
    let mut shutdown = inner.shutdown.subscribe();
    let inner = Arc::downgrade(inner);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stopping| *stopping) => return,
                () = tokio::time::sleep(beat) => {}
            }
            if !beat_once(&inner).await {
                return;
            }
        }
    });
}

/// One beat; false once the engine is gone.
async fn beat_once(inner: &Weak<Inner>) -> bool {
    let Some(store) = inner.upgrade().map(|inner| inner.store.clone()) else { return false };
    // The renewal blocks on the database: off the runtime's workers.
    let renewed = tokio::task::spawn_blocking(move || match store.leases() {
        Some(leases) => leases.renew(CLAIMS_PER_BEAT),
        None => Ok(Renewal::default()),
    })
    .await;
    let Some(inner) = inner.upgrade() else { return false };
    match renewed {
        Ok(Ok(renewal)) => {
            for id in &renewal.lost {
                inner.lost(id);
            }
            for record in renewal.claimed {
                if inner.live(&record.id).is_some() {
                    continue;
                }
                let id = record.id.clone();
                tracing::info!(saga.id = %id, "taking over a saga whose engine's lease lapsed");
                if let Err(e) = inner.adopt(record) {
                    tracing::error!(saga.id = %id, error = %e, "a claimed saga could not be resumed");
                }
            }
        }
        // The database is away: the lease may lapse, and the store's epochs keep this engine
        // from writing a saga that another one took meanwhile.
        Ok(Err(e)) => tracing::warn!(error = %e, "renewing the engine's lease failed"),
        Err(e) => tracing::error!(error = %e, "the lease renewal task failed"),
    }
    inner.beats.send_modify(|beats| *beats += 1);
    true
}
