//! What a replay check reports: whether a run's journal still fits the code, before a deploy
//! finds out by parking it.

use serde::{Deserialize, Serialize};

use crate::event::SagaId;

/// The result of replaying one run's journal on the code this engine registers (see
/// [`Engine::check_run`](crate::Engine::check_run)). Nothing runs: no step, no timer, no
/// compensation, and nothing is written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReplayReport {
    /// The run.
    pub saga: SagaId,
    /// Its definition's name.
    pub definition: String,
    /// The definition version its journal records.
    pub version: u32,
    /// What the replay found.
    pub verdict: ReplayVerdict,
    /// Each [`patched`](crate::SagaContext::patched) call the replay reached, with the path the
    /// run took there. A patch every run in flight took the new path of can be retired.
    pub patches: Vec<PatchUse>,
}

/// Whether a run's journal fits the code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplayVerdict {
    /// The code reaches every recorded operation as recorded: the run goes on.
    Clean {
        /// The first operation the run would run live (`step \`deploy\``, `a timer`), or
        /// `None` if it ends on what the journal records.
        next: Option<String>,
    },
    /// The run would park here: `reason` is the park reason, word for word.
    WouldPark {
        /// What does not match, as [`SagaStatus::Parked`](crate::SagaStatus::Parked) would say.
        reason: String,
    },
    /// No definition of the run's name and version is registered: the run would wait for one
    /// ([`SagaStatus::WaitingForVersion`](crate::SagaStatus::WaitingForVersion)).
    NoDefinition,
    /// The replay did not reach the end of the journal: the body waits on something that is
    /// neither journaled nor an operation.
    Stalled {
        /// Where it stopped.
        reason: String,
    },
}

impl ReplayVerdict {
    /// Whether the run fits the code: it would neither park nor wait for its version.
    pub fn is_clean(&self) -> bool {
        matches!(self, ReplayVerdict::Clean { .. })
    }
}

/// A [`patched`](crate::SagaContext::patched) call a replay reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PatchUse {
    /// The patch's id.
    pub patch: String,
    /// The operation key that follows the call.
    pub key: String,
    /// Whether the run took the new path there (`false`: it recorded the old code's path).
    pub new_path: bool,
}
