use std::sync::Arc;

use serde::Serialize;

use super::state::Engine;
use crate::codec::encode_payload;
use crate::driver::LiveSaga;
use crate::error::{Error, Result};
use crate::event::{Event, SagaId};

impl Engine {
    /// Asks a saga to cancel: its running step is cancelled, then its compensations run.
    ///
    /// The request is journaled before this returns, so it survives a crash. A saga that is
    /// parked or waiting for its version is cancelled when it next runs.
    ///
    /// A paused saga is cancelled too: the cancel lifts the pause and it compensates at once.
    /// [`cancel_as`](Self::cancel_as) also journals who asked.
    pub async fn cancel(&self, id: &SagaId, reason: impl Into<String>) -> Result<()> {
        self.cancel_by(id, reason.into(), None).await
    }

    pub(super) async fn cancel_by(&self, id: &SagaId, reason: String, by: Option<String>) -> Result<()> {
        let live = self.live_or_why(id)?;
        let _requests = live.control.requests.lock().await;
        if live.journal.record().status.is_final() {
            return Err(Error::SagaFinished(id.clone()));
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
        Ok(())
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
        let live = self.live_or_why(id)?;
        let event = match by {
            Some(by) => Event::SignalReceivedBy { name: name.clone(), payload: payload.clone(), by },
            None => Event::SignalReceived { name: name.clone(), payload: payload.clone() },
        };
        let recorded = live.journal.append_durable(event).await?;
        live.control.deliver(recorded.seq, name, payload);
        Ok(())
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
