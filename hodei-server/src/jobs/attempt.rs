//! Who runs a job attempt, a step or a rollback, and the job id it names.

use hodei_core::{SagaId, StepContext, StepStop};

/// What a rollback job's id adds to the compensated step's key, so that its attempts are
/// jobs of their own (`saga/3/rollback#1`) that a restart finds again like a step's.
pub(super) const ROLLBACK_SUFFIX: &str = "/rollback";

/// Who runs a job attempt: a step, or the compensation of one. It names the job (key and
/// attempt) and says whether the attempt is being stopped.
pub(super) enum JobAttempt<'a> {
    /// An attempt of a job step.
    Step(&'a StepContext),
    /// An attempt of a rollback job.
    Rollback {
        /// The saga.
        saga_id: &'a SagaId,
        /// The compensated step's key and [`ROLLBACK_SUFFIX`].
        key: String,
        /// The compensation's attempt, from 1.
        attempt: u32,
    },
}

impl JobAttempt<'_> {
    pub(super) fn key(&self) -> &str {
        match self {
            Self::Step(step) => &step.idempotency_key,
            Self::Rollback { key, .. } => key,
        }
    }

    pub(super) fn attempt(&self) -> u32 {
        match self {
            Self::Step(step) => step.attempt,
            Self::Rollback { attempt, .. } => *attempt,
        }
    }

    pub(super) fn saga_id(&self) -> &SagaId {
        match self {
            Self::Step(step) => &step.saga_id,
            Self::Rollback { saga_id, .. } => saga_id,
        }
    }

    /// Resolves with the reason once the step is cancelled. A compensation is never cancelled:
    /// it runs to its end, or until the engine stops.
    pub(super) async fn cancelled(&self) -> String {
        match self {
            Self::Step(step) => step.cancelled().await,
            Self::Rollback { .. } => std::future::pending().await,
        }
    }

    /// Whether the attempt's saga is handed over to its next driver (another engine took it,
    /// or it resumes from its journal): its job is for that driver to re-attach to.
    pub(super) fn handed_over(&self) -> bool {
        matches!(self, Self::Step(step) if matches!(step.stop_reason(), Some(StepStop::HandedOver)))
    }

    /// Why a job this attempt stops waiting for is to be cancelled, or `None` to let it run on
    /// for the engine's next life (shutdown, or a compensation cut off).
    pub(super) fn abandon_reason(&self) -> Option<String> {
        let Self::Step(step) = self else { return None };
        match step.stop_reason() {
            // The job goes on for the engine's next life, or for the engine that took the saga.
            Some(StepStop::ShuttingDown | StepStop::HandedOver) => None,
            Some(StepStop::Cancelled(reason)) => Some(format!("the saga was cancelled: {reason}")),
            // Only the step's own timeout drops an attempt while the saga goes on.
            _ => Some("the step timed out".to_owned()),
        }
    }
}
