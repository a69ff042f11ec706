//! Workers on demand: what a pool is asked for, the lease it hands out, and why it may not.

use std::collections::BTreeMap;
use std::fmt;

use super::Resources;
use hodei_agent::protocol::v1;

/// What a [`WorkerPool`] is asked for: a worker able to run one job.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerRequest {
    /// The job the worker is for (`saga id/operation key#attempt`).
    pub job_id: String,
    /// The step's earlier attempts, newest first. After a restart one of them may still run on
    /// a worker the pool adopted: the pool hands that worker to this request, and no other
    /// worker until it knows none of them runs anywhere.
    pub earlier_jobs: Vec<String>,
    /// The saga the job belongs to (workers are labelled with it, so that orphans of sagas
    /// that are no longer live can be told apart).
    pub saga_id: String,
    /// Labels the worker must carry.
    pub labels: BTreeMap<String, String>,
    /// The provider to take it from, by name; any matching one when `None`.
    pub provider: Option<String>,
    /// What the job needs of the worker's machine.
    pub resources: Resources,
    /// Higher goes first in the queue, then earlier arrival.
    pub priority: i32,
}

/// How a job's use of a leased worker ended, so the pool knows whether it can reuse it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEnd {
    /// The job reached a result; the worker is sound.
    Finished,
    /// The worker was lost while it held the job: it must not be reused.
    WorkerLost,
    /// The attempt was dropped (step timeout, saga cancelled, shutdown) before a result.
    Abandoned,
    /// The attempt's saga was handed over while the job ran (another engine sharing the store
    /// took it, or it resumes from its journal after a failed write): the job goes on for the
    /// next driver, which waits for it, so the worker is kept until the job is done.
    HandedOver,
}

/// A worker a [`WorkerPool`] handed out for one job. Releasing it (or dropping it, which counts
/// as [`LeaseEnd::Abandoned`]) tells the pool it is free again.
pub struct WorkerLease {
    worker_id: String,
    release: Option<Box<dyn FnOnce(LeaseEnd) + Send>>,
    end_reason: Option<ExplainEnd>,
}

/// Asks the worker's provider why a job ended (see [`WorkerLease::with_end_reason`]).
type ExplainEnd = Box<
    dyn Fn(v1::JobResult) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>>
        + Send
        + Sync,
>;

impl fmt::Debug for WorkerLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerLease").field("worker_id", &self.worker_id).finish_non_exhaustive()
    }
}

impl WorkerLease {
    /// A lease on `worker_id`; `release` runs exactly once, when it ends.
    pub fn new(worker_id: impl Into<String>, release: impl FnOnce(LeaseEnd) + Send + 'static) -> Self {
        Self { worker_id: worker_id.into(), release: Some(Box::new(release)), end_reason: None }
    }

    /// Lets the lease say why a job on its worker failed when the worker knows better than the
    /// job's result: `explain` gets the result and may name the cause (the provider's
    /// `job_end_reason`: out of memory, say).
    pub fn with_end_reason<F, Fut>(mut self, explain: F) -> Self
    where
        F: Fn(v1::JobResult) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Option<String>> + Send + 'static,
    {
        self.end_reason = Some(Box::new(move |result| Box::pin(explain(result))));
        self
    }

    /// Why the job that produced `result` ended, if the worker knows more than the result.
    /// The future does not borrow the lease.
    pub fn end_reason(
        &self,
        result: &v1::JobResult,
    ) -> impl std::future::Future<Output = Option<String>> + Send + 'static {
        let asked = self.end_reason.as_ref().map(|explain| explain(result.clone()));
        async move {
            match asked {
                Some(asked) => asked.await,
                None => None,
            }
        }
    }

    /// The leased worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Ends the lease, saying how.
    pub fn release(mut self, end: LeaseEnd) {
        if let Some(release) = self.release.take() {
            release(end);
        }
    }
}

impl Drop for WorkerLease {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release(LeaseEnd::Abandoned);
        }
    }
}

/// Why a [`WorkerPool`] could not hand out a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No worker now, for a reason that may pass: the infrastructure failed, or a worker did
    /// not register in time. Retried per the step's policy.
    #[error("no worker available: {reason}")]
    Unavailable {
        /// What went wrong, with the worker's own output when there is some.
        reason: String,
    },
    /// No worker can ever be had for this request: no provider matches, or the spec is invalid.
    #[error("no worker can run this job: {reason}")]
    Unsatisfiable {
        /// Why.
        reason: String,
    },
}

impl PoolError {
    /// Whether asking again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Hands out workers for jobs placed by [`Placement::Pool`](super::Placement::Pool): the
/// control plane's scheduler (in `hodei-providers`) implements it, provisioning workers on
/// demand. Waiting for a free worker happens inside [`WorkerPool::acquire`], which must not
/// return until it has one or knows it cannot get one.
#[async_trait::async_trait]
pub trait WorkerPool: Send + Sync + fmt::Debug {
    /// A connected worker for `request`, leased until the lease is released or dropped.
    async fn acquire(&self, request: WorkerRequest) -> Result<WorkerLease, PoolError>;
}
