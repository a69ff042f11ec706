//! The commands that reach a session task from the hub's callers, through the registry.

use tokio::sync::oneshot;

use super::error::HubError;
use hodei_agent::protocol::v1;

/// What callers ask of a session task.
pub(super) enum SessionCommand {
    /// Run `spec`, or re-attach to one of the `previous` attempts if the agent still holds it.
    Run {
        // Boxed: a spec is large and commands are few.
        spec: Box<v1::JobSpec>,
        previous: Vec<String>,
        reply: oneshot::Sender<Result<v1::JobResult, HubError>>,
    },
    Cancel {
        job_id: String,
        reason: String,
    },
    /// The caller of `run_job` for `job_id` stopped waiting; cancel the job if `cancel` says so.
    Abandon {
        job_id: String,
        cancel: Option<String>,
    },
}

impl std::fmt::Debug for SessionCommand {
    // By hand: the spec carries secret values, which must not reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Run { spec, previous, .. } => f
                .debug_struct("Run")
                .field("job_id", &spec.job_id)
                .field("previous", previous)
                .finish_non_exhaustive(),
            Self::Cancel { job_id, reason } => {
                f.debug_struct("Cancel").field("job_id", job_id).field("reason", reason).finish()
            }
            Self::Abandon { job_id, cancel } => {
                f.debug_struct("Abandon").field("job_id", job_id).field("cancel", cancel).finish()
            }
        }
    }
}
