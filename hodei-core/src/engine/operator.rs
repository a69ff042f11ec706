//! What an operator does to a saga in flight, each journaled with who asked: cancel and
//! signal (an approval is a signal), pause and resume, retry now, and retrying a compensation
//! that failed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::children::reopen_compensating;
use super::state::Engine;
use crate::driver::LiveSaga;
use crate::error::{Error, Result};
use crate::event::{Event, SagaId, SagaStatus};
use crate::lock::lock;
use crate::store::Request;

/// The longest actor name accepted, in bytes.
const MAX_ACTOR_LEN: usize = 256;

impl Engine {
    /// [`cancel`](Self::cancel), journaled as asked by `actor` (an operator, an API token's
    /// name): the journal and the [`Timeline`](crate::Timeline) name who cancelled the run.
    pub async fn cancel_as(
        &self,
        id: &SagaId,
        reason: impl Into<String>,
        actor: impl Into<String>,
    ) -> Result<()> {
        let by = validate_actor(actor.into())?;
        self.cancel_by(id, reason.into(), Some(by)).await
    }

    /// [`signal`](Self::signal), journaled as sent by `actor`: the timeline says who approved.
    pub async fn signal_as(
        &self,
        id: &SagaId,
        name: impl Into<String>,
        payload: &impl Serialize,
        actor: impl Into<String>,
    ) -> Result<()> {
        let by = validate_actor(actor.into())?;
        self.signal_by(id, name.into(), payload, Some(by)).await
    }

    /// Pauses a running or compensating saga: the step, timer, signal wait or compensation it
    /// is in goes on to its end (retries included), and the saga starts nothing more until
    /// [`resume`](Self::resume) or a cancel, which lifts the pause and compensates. Concurrent
    /// branches each stop before their next operation. The pause is journaled, so a restarted
    /// engine keeps the saga paused; its status is [`SagaStatus::Paused`] until it resumes.
    ///
    /// Pausing a paused saga changes nothing and journals nothing. Fails with
    /// [`Error::SagaNotFound`] for an unknown saga, [`Error::InvalidState`] for one that is
    /// finished, parked or waiting for its version, and [`Error::EngineStopped`] for one this
    /// engine does not run.
    pub async fn pause(&self, id: &SagaId, actor: impl Into<String>) -> Result<()> {
        let by = validate_actor(actor.into())?;
        let live = match self.live_for(id, "pause") {
            Err(Error::EngineStopped(_)) if self.posts() => {
                return self.post(id, Request::Pause { by }).await;
            }
            live => live?,
        };
        let _requests = live.control.requests.lock().await;
        if live.journal.pause(Event::Paused { by: by.clone() }).await?.is_some() {
            live.control.paused.send_replace(true);
            tracing::info!(saga.id = %id, by = %by, "paused");
        }
        Ok(())
    }

    /// Resumes a paused saga: it goes on with its next operation (or compensation), and its
    /// status is running (or compensating) again. Journaled, so a restarted engine runs it.
    ///
    /// Resuming a running or compensating saga that is not paused changes nothing and
    /// journals nothing. Fails as [`pause`](Self::pause) does.
    pub async fn resume(&self, id: &SagaId, actor: impl Into<String>) -> Result<()> {
        let by = validate_actor(actor.into())?;
        let live = match self.live_for(id, "resume") {
            Err(Error::EngineStopped(_)) if self.posts() => {
                return self.post(id, Request::Resume { by }).await;
            }
            live => live?,
        };
        let _requests = live.control.requests.lock().await;
        let status = live.journal.record().status;
        match live.journal.lift_pause(Event::Resumed { by: by.clone() }, true).await? {
            Some(_) => {
                live.control.paused.send_replace(false);
                tracing::info!(saga.id = %id, by = %by, "resumed");
                Ok(())
            }
            None if matches!(status, SagaStatus::Running | SagaStatus::Compensating) => Ok(()),
            None => Err(Error::InvalidState { id: id.clone(), status, action: "resume" }),
        }
    }

    /// Cuts short the backoff of every step and compensation of the saga that waits to retry:
    /// their next attempt starts at once. Journaled (`RetryNowRequested`), so the timeline
    /// shows the decision and a restart before the attempt starts does not wait again.
    ///
    /// Fails with [`Error::NothingToRetry`] when nothing waits out a backoff, and otherwise as
    /// [`pause`](Self::pause) does.
    pub async fn retry_now(&self, id: &SagaId, actor: impl Into<String>) -> Result<()> {
        const ACTION: &str = "retry now";
        let by = validate_actor(actor.into())?;
        let live = match self.live_for(id, ACTION) {
            Err(Error::EngineStopped(_)) if self.posts() => {
                return self.post(id, Request::RetryNow { by }).await;
            }
            live => live?,
        };
        let _requests = live.control.requests.lock().await;
        let status = live.journal.record().status;
        if status.is_final() {
            return Err(Error::InvalidState { id: id.clone(), status, action: ACTION });
        }
        if *live.control.backoffs.borrow() == 0 {
            return Err(Error::NothingToRetry(id.clone()));
        }
        let recorded = match live.journal.append_durable(Event::RetryNowRequested { by: by.clone() }).await {
            Err(Error::SagaFinished(_)) => {
                let status = live.journal.record().status;
                return Err(Error::InvalidState { id: id.clone(), status, action: ACTION });
            }
            other => other?,
        };
        // A backoff that ends by itself before this is seen loses nothing: its attempt starts
        // as the journal says it may.
        live.control.retry_now.send_replace(recorded.seq);
        tracing::info!(saga.id = %id, by = %by, "retry now");
        Ok(())
    }

    /// Retries the compensation of a saga that ended [`SagaStatus::CompensationFailed`]: the
    /// compensation that failed runs again (a new round of attempts under its retry policy),
    /// then those it left undone, and the saga ends compensated or compensation-failed again.
    /// The request is journaled (`CompensationRetryRequested`) and the saga is in flight
    /// again before this returns, so a restart in the middle goes on with it; await it with
    /// [`SagaHandle::outcome`](crate::SagaHandle::outcome).
    ///
    /// Fails with [`Error::SagaNotFound`] for an unknown saga, [`Error::InvalidState`] for a
    /// saga in any other status, and [`Error::ShuttingDown`] once the engine stops.
    pub async fn retry_compensation(&self, id: &SagaId, actor: impl Into<String>) -> Result<()> {
        const ACTION: &str = "retry its compensation";
        let by = validate_actor(actor.into())?;
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        if let Some(live) = inner.live(id) {
            let status = live.journal.record().status;
            if status != SagaStatus::CompensationFailed {
                return Err(Error::InvalidState { id: id.clone(), status, action: ACTION });
            }
            // Its end is written, its driver is about to let go of it: wait for that, so that
            // the reopened saga is not taken for (and removed as) the one that ended.
            let mut finished = live.finished.subscribe();
            drop(live);
            let _ = finished.wait_for(Option::is_some).await;
        }
        let reopened = {
            // Held from the check to the write, so that two requests reopen the saga once and
            // nothing adopts it in between.
            let live = lock(&inner.live);
            let record = inner.store.record(id)?.ok_or_else(|| Error::SagaNotFound(id.clone()))?;
            if let Some(saga) = live.get(id) {
                let status = saga.journal.record().status;
                return Err(Error::InvalidState { id: id.clone(), status, action: ACTION });
            }
            if record.status != SagaStatus::CompensationFailed {
                return Err(Error::InvalidState { id: id.clone(), status: record.status, action: ACTION });
            }
            let history = inner.store.history(id)?;
            let retry = Event::CompensationRetryRequested { by: by.clone() };
            reopen_compensating(inner, &record, history.len() as u64, retry)?
        };
        inner.store.durable().await?;
        tracing::info!(saga.id = %id, by = %by, "retrying the compensation");
        inner.adopt(reopened)
    }

    /// The saga this engine runs, for an operator's `action`; or the typed reason it cannot
    /// take it.
    fn live_for(&self, id: &SagaId, action: &'static str) -> Result<Arc<LiveSaga>> {
        if let Some(live) = self.inner.live(id) {
            return Ok(live);
        }
        Err(match self.inner.store.record(id)? {
            Some(r) if r.status.is_final() => {
                Error::InvalidState { id: id.clone(), status: r.status, action }
            }
            Some(_) => Error::EngineStopped(id.clone()),
            None => Error::SagaNotFound(id.clone()),
        })
    }
}

/// An actor name is journaled and printed on one line of a timeline: 1 to 256 bytes, no
/// control characters.
fn validate_actor(actor: String) -> Result<String> {
    let reason = if actor.is_empty() {
        Some("it is empty")
    } else if actor.len() > MAX_ACTOR_LEN {
        Some("it is longer than 256 bytes")
    } else if actor.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidActor { actor, reason }),
        None => Ok(actor),
    }
}
