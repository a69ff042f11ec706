//! What a step body is told about itself and about why it may be stopped.

use std::sync::Arc;

use tokio::sync::watch;

use crate::error::Result;
use crate::event::SagaId;
use crate::resources::Resources;

/// What a step body is told about itself.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StepContext {
    /// The saga's id.
    pub saga_id: SagaId,
    /// The step's number in the saga, from 0.
    pub step: u32,
    /// The step's name.
    pub name: String,
    /// This attempt, from 1.
    pub attempt: u32,
    /// `saga id/operation key` (the step's place in the code: `2`, or `1.0.0` in a branch):
    /// stable across attempts, restarts and replays. Pass it to external systems so that a
    /// retried side effect happens once.
    pub idempotency_key: String,
    pub(crate) signals: StepSignals,
    pub(crate) resources: Arc<Resources>,
}

impl StepContext {
    /// The resource of type `T` registered with the engine (see
    /// [`EngineBuilder::resource`](crate::EngineBuilder::resource)), or
    /// [`Error::MissingResource`](crate::Error::MissingResource) naming `T`.
    ///
    /// `?` turns a missing resource into a retryable step failure; since resources are fixed
    /// when the engine starts, `.map_err(StepError::terminal)` fails the step at once instead.
    ///
    /// [`StepError::terminal`]: crate::StepError::terminal
    pub fn resource<T: Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        self.resources.get()
    }

    /// Why the engine is stopping this step's body, if it is: read it when the body's future is
    /// dropped (in a drop guard) to tell a cancelled saga, whose remote work should be
    /// cancelled, from an engine shutting down, whose remote work should go on so the step can
    /// pick it up after the restart. `None` while the saga runs normally, and also when the
    /// body is dropped because its step timed out.
    pub fn stop_reason(&self) -> Option<StepStop> {
        if let Some(reason) =
            self.signals.stop.borrow().clone().or_else(|| self.signals.cancel.borrow().clone())
        {
            return Some(StepStop::Cancelled(reason));
        }
        if *self.signals.handed_over.borrow() {
            return Some(StepStop::HandedOver);
        }
        (*self.signals.shutdown.borrow()).then_some(StepStop::ShuttingDown)
    }

    /// Resolves, with the reason, once the engine asks this attempt to stop because its saga
    /// or its branch was cancelled. The attempt then has its step's
    /// [`cancel_grace`](crate::StepBuilder::cancel_grace) to stop what it started before it is
    /// dropped; whatever it returns then, the step ends as cancelled.
    pub async fn cancelled(&self) -> String {
        first_reason(self.signals.stop.clone()).await
    }
}

/// Resolves with the reason once `watch` holds one; never if its sender goes away without
/// (then nothing can set it any more).
pub(crate) async fn first_reason(mut watch: watch::Receiver<Option<String>>) -> String {
    let reason = watch.wait_for(Option::is_some).await.ok().and_then(|reason| reason.clone());
    match reason {
        Some(reason) => reason,
        None => std::future::pending().await,
    }
}

/// Why the engine stops a running step body (see [`StepContext::stop_reason`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepStop {
    /// The saga was cancelled, with this reason.
    Cancelled(String),
    /// The engine is shutting down; the saga resumes on the next start.
    ShuttingDown,
    /// The engine stopped driving the saga, which is driven again from its journal: by
    /// another engine sharing the store that took it over, or by this one once its database
    /// answers again. What the attempt started (a job on a worker) goes on for that next
    /// driver to re-attach to, not to be stopped.
    HandedOver,
}

/// The saga's cancel, the step's own stop and the engine's shutdown, as a step body can
/// observe them.
#[derive(Clone, Debug)]
pub(crate) struct StepSignals {
    pub cancel: watch::Receiver<Option<String>>,
    /// Set when the engine stops this attempt (its saga or its branch was cancelled).
    pub stop: watch::Receiver<Option<String>>,
    pub shutdown: watch::Receiver<bool>,
    pub handed_over: watch::Receiver<bool>,
}
