//! The beat of an engine that shares its store with others: renew the lease, take over the
//! sagas of engines whose lease lapsed, and let go of those taken from this one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::state::{Engine, Inner};
use crate::error::Error;
use crate::event::SagaId;
use crate::lock::lock;
use crate::store::leases::APPLYING;
use crate::store::{Posted, Renewal, Request};

/// Sagas claimed at one beat, at most: engines beating at once share out a dead engine's sagas
/// (claims skip the rows another engine is claiming) instead of the first taking them all.
const CLAIMS_PER_BEAT: usize = 256;

/// Starts the beat; it ends with the engine's shutdown, or once the engine is gone. Between
/// beats, a notification of a posted request wakes it for the requests alone.
pub(super) fn start(inner: &Arc<Inner>, beat: Duration, wake: Arc<Notify>) {
    let mut shutdown = inner.shutdown.subscribe();
    let inner = Arc::downgrade(inner);
    tokio::spawn(async move {
        let mut next_beat = tokio::time::Instant::now() + beat;
        loop {
            let beating = tokio::select! {
                _ = shutdown.wait_for(|stopping| *stopping) => return,
                () = tokio::time::sleep_until(next_beat) => true,
                () = wake.notified() => false,
            };
            if beating {
                let late = tokio::time::Instant::now().saturating_duration_since(next_beat);
                if late > beat {
                    // The runtime had no worker free for the beat: tasks that block it
                    // (synchronous work in a step, say) put the lease at risk.
                    tracing::warn!(?late, "the engine's lease beat came late: its runtime was busy");
                    // The missed beats are not made up in a burst: one renewal is enough.
                    next_beat = tokio::time::Instant::now();
                }
                next_beat += beat;
                if !beat_once(&inner).await {
                    return;
                }
            }
            let Some(engine) = inner.upgrade().map(|inner| Engine { inner }) else { return };
            engine.apply_posted().await;
        }
    });
}

impl Engine {
    /// Applies the requests other engines posted for the sagas this one drives, each exactly
    /// once: the journal write that applies one deletes it in the same transaction.
    async fn apply_posted(&self) {
        let store = self.inner.store.clone();
        let posted = tokio::task::spawn_blocking(move || store.leases().map(|leases| leases.posted()));
        let posted = match posted.await {
            Ok(Some(Ok(posted))) => posted,
            Ok(None) => return,
            Ok(Some(Err(e))) => return tracing::warn!(error = %e, "reading the posted requests failed"),
            Err(e) => return tracing::error!(error = %e, "the posted requests task failed"),
        };
        for posted in posted {
            // Not driven here (yet): its owner applies it, or this engine once it claims it.
            if self.inner.live(&posted.saga).is_none() {
                continue;
            }
            let applied = APPLYING.scope(posted.number, self.apply(&posted)).await;
            // Not written: the saga went to another engine, or the database failed; it stays.
            let keep =
                matches!(applied, Err(Error::Fenced(_) | Error::Storage { .. } | Error::EngineStopped(_)));
            if let Err(e) = &applied {
                tracing::info!(saga.id = %posted.saga, error = %e, "a posted request was not applied");
            }
            let store = self.inner.store.clone();
            let number = posted.number;
            let settled =
                tokio::task::spawn_blocking(move || store.leases().map(|leases| leases.settle(number, keep)));
            if let Ok(Some(Err(e))) = settled.await {
                tracing::warn!(error = %e, "settling a posted request failed; it is looked at again");
            }
        }
    }

    async fn apply(&self, posted: &Posted) -> crate::Result<()> {
        let id = &posted.saga;
        match posted.request.clone() {
            Request::Cancel { reason, by } => self.cancel_by(id, reason, by).await,
            Request::Signal { name, payload, by } => self.signal_encoded(id, name, payload, by).await,
            Request::Pause { by } => self.pause(id, by).await,
            Request::Resume { by } => self.resume(id, by).await,
            Request::RetryNow { by } => self.retry_now(id, by).await,
        }
    }
}

/// One beat; false once the engine is gone.
async fn beat_once(inner: &Weak<Inner>) -> bool {
    let Some(store) = inner.upgrade().map(|inner| inner.store.clone()) else { return false };
    let began = std::time::Instant::now();
    // The renewal blocks on the database: off the runtime's workers.
    let renewed = tokio::task::spawn_blocking(move || match store.leases() {
        Some(leases) => leases.renew(CLAIMS_PER_BEAT),
        None => Ok(Renewal::default()),
    })
    .await;
    let Some(inner) = inner.upgrade() else { return false };
    let took = began.elapsed();
    if let Some(leases) = inner.store.leases()
        && took > leases.beat() * 2
    {
        // Five beats make a lease: one this slow leaves little before it lapses.
        tracing::warn!(?took, beat = ?leases.beat(), "renewing the engine's lease was slow");
    }
    match renewed {
        Ok(Ok(renewal)) => {
            for id in &renewal.lost {
                inner.lost(id);
            }
            // Resuming a saga reads its journal, a round trip each: done beside the beat, whose
            // next renewal must not wait for it. A beat that took over a dead engine's hundred
            // sagas and read them all before beating again let its own lease lapse, and the
            // others took them from it in turn.
            let adopting = inner.clone();
            drop(tokio::task::spawn_blocking(move || adopting.resume(renewal)));
        }
        // The database is away: the lease may lapse, and the store's epochs keep this engine
        // from writing a saga that another one took meanwhile.
        Ok(Err(e)) => tracing::warn!(error = %e, "renewing the engine's lease failed"),
        Err(e) => tracing::error!(error = %e, "the lease renewal task failed"),
    }
    inner.beats.send_modify(|beats| *beats += 1);
    true
}

impl Inner {
    /// Resumes what a renewal handed this engine: the sagas a failed write stopped, once the
    /// database answers again, and those it claimed. One renewal's at a time, in order.
    fn resume(self: &Arc<Self>, renewal: Renewal) {
        let _one_at_a_time = lock(&self.resuming);
        // The database answers again: resume what a failed write stopped, from its journal
        // there (unless another engine took it meanwhile: then it is not in flight here).
        if !self.resume_unwritten(&renewal.lost) {
            return;
        }
        for record in renewal.claimed {
            // Left to the next engine to look once this one has stopped.
            if self.stopping() {
                return;
            }
            if self.live(&record.id).is_some() {
                continue;
            }
            let id = record.id.clone();
            tracing::info!(saga.id = %id, "taking over a saga whose engine's lease lapsed");
            if let Err(e) = self.adopt(record) {
                tracing::error!(saga.id = %id, error = %e, "a claimed saga could not be resumed");
            }
        }
    }

    /// Resumes, from the store's journal, the sagas a failed write stopped, but those in
    /// `lost`: another engine took them while this one could not write, and drives them, so
    /// running their step here too would repeat the step's side effect only to have the write
    /// refused. False once the engine stops. The caller holds `resuming`.
    pub(super) fn resume_unwritten(self: &Arc<Self>, lost: &[SagaId]) -> bool {
        let unwritten = std::mem::take(&mut *lock(&self.unwritten));
        for id in unwritten {
            if self.stopping() {
                return false;
            }
            if self.live(&id).is_some() || lost.contains(&id) {
                continue;
            }
            match self.store.record(&id) {
                Ok(Some(record)) if !record.status.is_final() => {
                    tracing::info!(saga.id = %id, "resuming a saga after a failed journal write");
                    if let Err(e) = self.adopt(record) {
                        tracing::error!(saga.id = %id, error = %e, "the saga could not be resumed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(saga.id = %id, error = %e, "the saga is resumed later");
                    lock(&self.unwritten).push(id);
                }
            }
        }
        true
    }
}
