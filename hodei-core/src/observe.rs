//! The observer seam: what an engine tells whoever measures it (a metrics exporter), without
//! depending on any metrics library.
//!
//! The engine derives every observation from what it journals, at the one place each saga's
//! events are written ([`Observer`]'s saga methods), and from the store's group commits
//! ([`Observer::journal_flushed`]). An event is journaled once in a process's life (replay
//! writes nothing), so counts built on these calls are exact; they are per process and start at
//! zero with it. What the engine holds now (runs in flight, waits pending) is not observed but
//! asked for when needed: [`Engine::census`](crate::Engine::census).
//!
//! Without an observer (the default) none of this runs: the journal skips it on a `None`.

use std::time::Duration;

use crate::event::SagaStatus;

/// Receives what the engine journals. Register one with
/// [`EngineBuilder::observer`](crate::EngineBuilder::observer).
///
/// Every method has an empty default, so an observer implements what it needs and keeps
/// building when methods are added. Calls are made on the saga's own task while its journal is
/// held, and on the store's flusher thread: an observer must be quick and must not block
/// (increment counters, record into a histogram).
///
/// `definition` is a saga definition's name: bounded by the code, never a run's id.
pub trait Observer: Send + Sync + 'static {
    /// A run was started (forks included).
    fn saga_started(&self, definition: &str) {
        let _ = definition;
    }

    /// A run reached a final event: `outcome` is its final status (completed, compensated,
    /// compensation-failed, failed), `duration` the time from its start to that event, as
    /// journaled. A failed compensation retried by an operator finishes again later.
    fn saga_finished(&self, definition: &str, outcome: &SagaStatus, duration: Duration) {
        let _ = (definition, outcome, duration);
    }

    /// An attempt of a step began: `attempt` 1 is the step's start, later ones are retries.
    fn attempt_started(&self, definition: &str, attempt: u32) {
        let _ = (definition, attempt);
    }

    /// A step ended, `duration` after its start as journaled (its retries and their backoffs
    /// included).
    fn step_finished(&self, definition: &str, end: StepEnd, duration: Duration) {
        let _ = (definition, end, duration);
    }

    /// A step's compensation ended.
    fn compensation_finished(&self, definition: &str, end: CompensationEnd) {
        let _ = (definition, end);
    }

    /// A durable timer was set.
    fn timer_started(&self, definition: &str) {
        let _ = definition;
    }

    /// A signal was journaled for a run of `definition`.
    fn signal_received(&self, definition: &str) {
        let _ = definition;
    }

    /// The store made its writes durable in one group commit that took `duration` and answered
    /// `writers` waiting writers.
    fn journal_flushed(&self, duration: Duration, writers: usize) {
        let _ = (duration, writers);
    }
}

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StepEnd {
    /// It returned its output.
    Completed,
    /// It failed for good.
    Failed,
    /// Its saga or branch was cancelled while it ran.
    Cancelled,
}

impl StepEnd {
    /// A short name, for labels.
    pub fn kind(self) -> &'static str {
        match self {
            StepEnd::Completed => "completed",
            StepEnd::Failed => "failed",
            StepEnd::Cancelled => "cancelled",
        }
    }
}

/// How a compensation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CompensationEnd {
    /// The step was undone.
    Completed,
    /// The compensation failed for good.
    Failed,
}

impl CompensationEnd {
    /// A short name, for labels.
    pub fn kind(self) -> &'static str {
        match self {
            CompensationEnd::Completed => "completed",
            CompensationEnd::Failed => "failed",
        }
    }
}
