use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use super::outcome::{Outcome, StepRef};
use super::recovery::last_state;
use super::state::{Engine, Inner};
use crate::codec::decode_payload;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord};

impl Engine {
    /// A handle to an existing saga.
    pub fn handle(&self, id: &SagaId) -> Result<SagaHandle> {
        self.status(id)?;
        Ok(SagaHandle { id: id.clone(), inner: self.inner.clone() })
    }
}

/// A started saga.
#[derive(Clone)]
pub struct SagaHandle {
    pub(super) id: SagaId,
    pub(super) inner: Arc<Inner>,
}

impl fmt::Debug for SagaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaHandle").field("id", &self.id).finish()
    }
}

impl SagaHandle {
    /// The saga's id.
    pub fn id(&self) -> &SagaId {
        &self.id
    }

    /// Waits for the saga to finish and returns how it ended, decoding the output as `O`.
    ///
    /// A parked saga is not finished: this keeps waiting until it is fixed and resumes, or
    /// fails with [`Error::EngineStopped`] when the engine shuts down first. On a store shared
    /// by several engines it waits wherever the saga runs: on another engine, or on this one
    /// after a takeover (it looks again at every beat of the engine's lease). A saga that a
    /// failed write stopped (on a shared store, or a full disk) is waited for until it resumes.
    pub async fn outcome<O: DeserializeOwned>(&self) -> Result<Outcome<O>> {
        // Whether a saga this engine stopped driving may come back to it, or run elsewhere.
        let shared = self.inner.store.leases().is_some() || self.inner.store.writable().is_some();
        let stopped = || Error::EngineStopped(self.id.clone());
        loop {
            let mut beats = self.inner.beats.subscribe();
            if let Some(live) = self.inner.live(&self.id) {
                let mut finished = live.finished.subscribe();
                drop(live);
                let end =
                    finished.wait_for(Option::is_some).await.map(|end| end.as_ref().map(|e| (**e).clone()));
                match end {
                    Ok(Some(end)) => return self.decode_outcome(end.event),
                    // Dropped without an end: the engine stopped driving it. On a shared store
                    // that may be a takeover by another engine: look where it is now.
                    _ if !shared || self.inner.stopping() => return Err(stopped()),
                    _ => {}
                }
            }
            let history = self.inner.store.history(&self.id)?;
            match last_state(&history) {
                Some(last) if last.event.is_final() => return self.decode_outcome(last.event.clone()),
                Some(_) if shared => {
                    let mut shutdown = self.inner.shutdown.subscribe();
                    tokio::select! {
                        changed = beats.changed() => changed.map_err(|_| stopped())?,
                        _ = shutdown.wait_for(|stopping| *stopping) => return Err(stopped()),
                    }
                }
                Some(_) => return Err(stopped()),
                None => return Err(Error::SagaNotFound(self.id.clone())),
            }
        }
    }

    fn decode_outcome<O: DeserializeOwned>(&self, event: Event) -> Result<Outcome<O>> {
        Ok(match event {
            Event::SagaCompleted { output } => {
                Outcome::Completed(decode_payload(&output).map_err(|reason| Error::Codec {
                    action: "decode",
                    what: format!("the output of saga `{}`", self.id),
                    reason,
                })?)
            }
            Event::SagaCompensated { cause } => Outcome::Compensated { cause },
            Event::SagaFailed { cause } => Outcome::Failed { cause },
            Event::SagaCompensationFailed { step, error, undone } => {
                let names = step_names(&self.inner.store.history(&self.id)?);
                let step_ref =
                    |index: u32| StepRef { index, name: names.get(&index).cloned().unwrap_or_default() };
                Outcome::CompensationFailed {
                    step: step_ref(step),
                    error,
                    undone: undone.into_iter().map(step_ref).collect(),
                }
            }
            other => {
                return Err(Error::CorruptRecord {
                    saga: self.id.to_string(),
                    seq: None,
                    reason: format!("expected a final event, found {other:?}"),
                });
            }
        })
    }

    /// The saga's summary record.
    pub fn status(&self) -> Result<SagaRecord> {
        Engine { inner: self.inner.clone() }.status(&self.id)
    }

    /// Cancels the saga; see [`Engine::cancel`].
    pub async fn cancel(&self, reason: impl Into<String>) -> Result<()> {
        Engine { inner: self.inner.clone() }.cancel(&self.id, reason).await
    }
}

/// A [`SagaHandle`] that knows its saga's output type.
pub struct TypedHandle<O> {
    pub(super) handle: SagaHandle,
    pub(super) output: PhantomData<fn() -> O>,
}

impl<O> Clone for TypedHandle<O> {
    fn clone(&self) -> Self {
        Self { handle: self.handle.clone(), output: PhantomData }
    }
}

impl<O> fmt::Debug for TypedHandle<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TypedHandle").field(&self.handle.id).finish()
    }
}

impl<O: DeserializeOwned> TypedHandle<O> {
    /// Waits for the saga to finish; see [`SagaHandle::outcome`].
    pub async fn outcome(&self) -> Result<Outcome<O>> {
        self.handle.outcome::<O>().await
    }

    /// The saga's id.
    pub fn id(&self) -> &SagaId {
        self.handle.id()
    }

    /// The untyped handle.
    pub fn untyped(&self) -> &SagaHandle {
        &self.handle
    }
}

fn step_names(history: &[RecordedEvent]) -> HashMap<u32, String> {
    history.iter().filter_map(|r| r.event.step_start().map(|(step, name)| (step, name.to_owned()))).collect()
}
