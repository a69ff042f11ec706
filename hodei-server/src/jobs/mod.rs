//! Remote jobs as durable saga steps.
//!
//! A [`Job`] is what the saga journals as a step's input: the program, its environment, its
//! limits, the worker to run on, and the *names* of the secrets it needs. Secret values are
//! resolved through a [`SecretSource`] on every attempt, at dispatch time, and go only into the
//! [`v1::JobSpec`](hodei_agent::protocol::v1::JobSpec) sent over the worker's mutual-TLS
//! session, so the journal never holds them.
//!
//! [`RemoteJobs::run_job`] runs one job as one step, through the dispatcher the engine holds
//! as a resource; [`RemoteJobs::job`] configures one first: another dispatcher, or a rollback
//! job as the step's compensation ([`JobStep::rollback`]). The job id is deterministic: the step's
//! idempotency key and the attempt, `saga id/key#attempt`, where the key is the step's operation
//! key, its place in the saga's code (`2` for the third operation at the top level, `1.0.0` for
//! the first of branch 0 of the group at `1`), so each attempt has a log of its own in the
//! hub's store. [`saga_jobs`] lists a saga's jobs by step. An attempt first looks for the earlier attempts of its step
//! ([`Hub::resume_job`]): a stored result is taken as it is, and a job the worker still runs
//! is re-attached to. That is what happens after a restart of the control plane: the attempt
//! interrupted by the crash counts, the next one finds the job that went on without it.
//!
//! When the step stops waiting, the job is cancelled on its worker if the saga was cancelled or
//! the step timed out, and left running if the engine is shutting down, so that the step picks
//! it up after the restart. This lives here rather than in `hodei-core` because the core must
//! not depend on the agent; it uses only the public step API.
//!
//! A lost or absent worker fails the attempt retryably, so the step's retry policy runs the job
//! again, on a new worker when the placement is a pool.

use std::sync::Arc;
use std::time::Duration;

use hodei_core::RetryPolicy;

use crate::hub::Hub;

mod attempt;
mod dispatcher;
mod history;
mod job;
mod pool;
mod secrets;
mod step;
mod tail;
mod verdict;

pub use history::{SagaJob, saga_jobs};
pub use hodei_providers::Resources;
pub use job::{Inherit, Job, Placement, Program};
pub use pool::{LeaseEnd, PoolError, WorkerLease, WorkerPool, WorkerRequest};
pub use secrets::{EnvSecrets, FileSecrets, MemorySecrets, SecretError, SecretSource};
pub use step::{JobStep, RemoteJobs};
pub use verdict::JobOutcome;

/// What a saga needs to run remote jobs: the hub, the secret source, and the steps' retry
/// policy. Cheap to clone, so that a saga definition's body can capture it.
// Defined here, its methods in dispatcher.rs: a step that finds no dispatcher among the
// engine's resources names its type, and that name should be the path it is imported by,
// `hodei_server::jobs::JobDispatcher`, not a private module's.
#[derive(Clone)]
pub struct JobDispatcher {
    hub: Hub,
    secrets: Arc<dyn SecretSource>,
    retry: RetryPolicy,
    timeout: Option<Duration>,
    pool: Option<Arc<dyn WorkerPool>>,
}
