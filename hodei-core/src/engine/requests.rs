use std::sync::Arc;

use serde::Serialize;

use super::state::Engine;
use crate::codec::encode_payload;
use crate::driver::LiveSaga;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaStatus};
use crate::store::Request;
use crate::store::leases::APPLYING;

impl Engine {
    /// Asks a saga to cancel: its running step is cancelled, then its compensations run.
    ///
    /// The request is journaled before this returns, so it survives a crash. A paused saga is
    /// cancelled too: the cancel lifts the pause and it compensates at once.
    ///
    /// A stranded saga, [parked](SagaStatus::Parked) or
    /// [waiting for its version](SagaStatus::WaitingForVersion), has no code that matches its
    /// journal, and a compensation is code registered by the step that started it: a
    /// compensation run by other code could undo the wrong thing. So it ends at once, before this
    /// returns, and runs nothing: [`Failed`](SagaStatus::Failed) ("cancelled: ...") if no
    /// started step has a compensation left to run (or
    /// [`Compensated`](SagaStatus::Compensated) if all have run already), and otherwise
    /// [`CompensationFailed`](SagaStatus::CompensationFailed), naming every such step as undone
    /// and why. [`retry_compensation`](Self::retry_compensation) runs them once code that matches
    /// its journal does: after a deploy that restores it, or once its version is registered.
    ///
    /// [`cancel_as`](Self::cancel_as) also journals who asked.
    pub async fn cancel(&self, id: &SagaId, reason: impl Into<String>) -> Result<()> {
        self.cancel_by(id, reason.into(), None).await
    }

    pub(super) async fn cancel_by(&self, id: &SagaId, reason: String, by: Option<String>) -> Result<()> {
        loop {
            let live = match self.live_or_why(id) {
                Err(Error::EngineStopped(_)) if self.posts() => {
                    return self.post(id, Request::Cancel { reason, by }).await;
                }
                live => live?,
            };
            let _requests = live.control.requests.lock().await;
            let status = live.journal.record().status;
            if status.is_final() {
                return Err(Error::SagaFinished(id.clone()));
            }
            if matches!(status, SagaStatus::Parked { .. } | SagaStatus::WaitingForVersion) {
                if !self.inner.live(id).is_some_and(|now| Arc::ptr_eq(&now, &live)) {
                    // Its version was registered while this waited: it runs again, and is
                    // cancelled as any running saga.
                    continue;
                }
                return self.cancel_stranded(&live, status, reason, by).await;
            }
            if live.control.cancel.borrow().is_some() {
                return Ok(());
            }
            let event = match by {
                Some(by) => Event::CancelRequestedBy { reason: reason.clone(), by },
                None => Event::CancelRequested { reason: reason.clone() },
            };
            live.journal.lift_pause(event, false).await?;
            // The cancel first, so that a saga waiting out its pause sees it when it wakes.
            live.control.cancel.send_replace(Some(reason));
            live.control.paused.send_replace(false);
            return Ok(());
        }
    }

    /// Cancels a stranded saga (see [`cancel`](Self::cancel)), whose requests the caller holds:
    /// journals the request, then the end its journal allows without running any code.
    async fn cancel_stranded(
        &self,
        live: &LiveSaga,
        status: SagaStatus,
        reason: String,
        by: Option<String>,
    ) -> Result<()> {
        let id = &live.journal.id;
        let history = self.inner.store.history(id)?;
        let request = match by {
            Some(by) => Event::CancelRequestedBy { reason: reason.clone(), by },
            None => Event::CancelRequested { reason: reason.clone() },
        };
        live.journal.append_durable(request).await?;
        let cause = format!("cancelled: {reason}");
        let pending = Compensations::of(&history);
        let Some(&step) = pending.undone.first() else {
            // As its driver would end it: compensated if every compensation ran before it was
            // stranded, failed if it has none.
            let end =
                if pending.any { Event::SagaCompensated { cause } } else { Event::SagaFailed { cause } };
            return self.end_stranded(live, end, None).await;
        };
        let record = live.journal.record();
        let why = match status {
            SagaStatus::Parked { reason } => format!(
                "not compensated: the run was parked ({reason}), and its compensations need code that \
                 matches its journal; deploy such code, then retry the compensation"
            ),
            _ => format!(
                "not compensated: this engine registers no version {} of `{}`, whose code its \
                 compensations need; register it, then retry the compensation",
                record.version, record.definition
            ),
        };
        tracing::warn!(
            saga.id = %id, undone = ?pending.undone,
            "stranded saga cancelled; its compensations wait for code that matches its journal"
        );
        let end = Event::SagaCompensationFailed { step, error: why, undone: pending.undone };
        self.end_stranded(live, end, None).await
    }

    /// Sends a signal to a saga: it is journaled before this returns, and taken by the saga's
    /// next (or current) wait for `name` (see [`SagaContext::wait_signal`]). A signal sent
    /// before the saga waits for it is kept until it does.
    ///
    /// Fails with [`Error::SagaNotFound`] for an unknown saga, [`Error::SagaFinished`] for a
    /// finished one, and [`Error::EngineStopped`] for one in flight that this engine does not
    /// run (it is stopping, or another process holds the saga).
    ///
    /// [`SagaContext::wait_signal`]: crate::SagaContext::wait_signal
    ///
    /// [`signal_as`](Self::signal_as) also journals who sent it.
    pub async fn signal(&self, id: &SagaId, name: impl Into<String>, payload: &impl Serialize) -> Result<()> {
        self.signal_by(id, name.into(), payload, None).await
    }

    pub(super) async fn signal_by(
        &self,
        id: &SagaId,
        name: String,
        payload: &impl Serialize,
        by: Option<String>,
    ) -> Result<()> {
        let payload = encode_payload(payload).map_err(|reason| Error::Codec {
            action: "encode",
            what: format!("the payload of signal `{name}`"),
            reason,
        })?;
        if payload.len() > self.inner.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                what: format!("the payload of signal `{name}`"),
                size: payload.len(),
                limit: self.inner.config.max_payload_bytes,
            });
        }
        self.signal_encoded(id, name, payload, by).await
    }

    /// [`signal`](Self::signal) with the payload encoded and checked already.
    pub(super) async fn signal_encoded(
        &self,
        id: &SagaId,
        name: String,
        payload: Vec<u8>,
        by: Option<String>,
    ) -> Result<()> {
        let live = match self.live_or_why(id) {
            Err(Error::EngineStopped(_)) if self.posts() => {
                return self.post(id, Request::Signal { name, payload, by }).await;
            }
            live => live?,
        };
        let event = match by {
            Some(by) => Event::SignalReceivedBy { name: name.clone(), payload: payload.clone(), by },
            None => Event::SignalReceived { name: name.clone(), payload: payload.clone() },
        };
        let recorded = live.journal.append_durable(event).await?;
        live.control.deliver(recorded.seq, name, payload);
        Ok(())
    }

    /// Whether a request for a saga this engine does not drive is posted for its owner: on a
    /// store shared by several engines, unless this engine is stopping or is applying a posted
    /// request itself (which must not bounce).
    pub(super) fn posts(&self) -> bool {
        self.inner.store.leases().is_some() && !self.inner.stopping() && APPLYING.try_with(|_| ()).is_err()
    }

    /// Posts `request` for the engine that drives saga `id` (see [`Leases::post`]).
    ///
    /// [`Leases::post`]: crate::store::Leases::post
    pub(super) async fn post(&self, id: &SagaId, request: Request) -> Result<()> {
        let (store, id) = (self.inner.store.clone(), id.clone());
        let posted = tokio::task::spawn_blocking(move || match store.leases() {
            Some(leases) => leases.post(&id, &request),
            None => Err(Error::EngineStopped(id)),
        });
        posted.await.map_err(|e| Error::Storage {
            operation: "posting a request",
            source: crate::error::StorageError::message(e.to_string()),
        })?
    }

    /// The running saga, or the typed reason it cannot take a request.
    pub(super) fn live_or_why(&self, id: &SagaId) -> Result<Arc<LiveSaga>> {
        if let Some(live) = self.inner.live(id) {
            return Ok(live);
        }
        Err(match self.inner.store.record(id)? {
            Some(r) if r.status.is_final() => Error::SagaFinished(id.clone()),
            Some(_) => Error::EngineStopped(id.clone()),
            None => Error::SagaNotFound(id.clone()),
        })
    }
}

/// The compensations a journal still owes: those of the steps it started with a compensation
/// and whose compensation has not completed.
struct Compensations {
    /// Whether any started step has a compensation.
    any: bool,
    /// The steps still to undo, last first: the order compensation runs in, as
    /// `SagaCompensationFailed` lists them.
    undone: Vec<u32>,
}

impl Compensations {
    fn of(history: &[RecordedEvent]) -> Self {
        let mut started = Vec::new();
        let mut completed = std::collections::HashSet::new();
        for recorded in history {
            match &recorded.event {
                Event::StepStarted { step, compensable: true, .. }
                | Event::StepStartedAt { step, compensable: true, .. } => started.push(*step),
                Event::CompensationCompleted { step } => {
                    completed.insert(*step);
                }
                _ => {}
            }
        }
        let any = !started.is_empty();
        let mut undone: Vec<u32> = started.into_iter().filter(|step| !completed.contains(step)).collect();
        undone.sort_unstable_by(|a, b| b.cmp(a));
        Self { any, undone }
    }
}
