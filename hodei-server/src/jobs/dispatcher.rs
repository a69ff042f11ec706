//! The dispatcher's configuration, and one attempt of a job: a stored result, a re-attached
//! job, or a new one on its worker.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{RetryPolicy, StepError};
use tracing::Instrument;

use super::JobDispatcher;
use super::attempt::JobAttempt;
use super::job::{Job, Placement};
use super::pool::{LeaseEnd, WorkerLease, WorkerPool, WorkerRequest};
use super::secrets::SecretSource;
use super::tail::output_tail;
use super::verdict::{JobOutcome, judge, ran_job, succeeded};
use crate::hub::{Hub, HubError};
use crate::logstore::JobHolder;
use hodei_agent::protocol::v1;

impl fmt::Debug for JobDispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobDispatcher")
            .field("retry", &self.retry)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl JobDispatcher {
    /// Jobs on `hub`, with secrets from `secrets` and [`JobDispatcher::default_retry`].
    pub fn new(hub: Hub, secrets: Arc<dyn SecretSource>) -> Self {
        Self { hub, secrets, retry: Self::default_retry(), timeout: None, pool: None }
    }

    /// Sets a time limit per attempt of the steps that run jobs: past it the job is cancelled on
    /// its worker and the attempt fails retryably. (A job's own [`Job::timeout`] is enforced by
    /// the agent and fails the step for good.)
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Takes workers for [`Placement::Pool`] jobs from `pool`.
    pub fn with_pool(mut self, pool: Arc<dyn WorkerPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The hub jobs run on.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The default policy: five attempts, backing off from half a second to ten, which rides
    /// out a worker reconnecting after a network blip or an agent restart.
    pub fn default_retry() -> RetryPolicy {
        RetryPolicy::attempts(5)
            .initial_backoff(Duration::from_millis(500))
            .max_backoff(Duration::from_secs(10))
    }

    /// Sets the retry policy of the steps that run jobs.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// One attempt: resolve the secrets, run the job under the step's key, judge its result.
    /// It has a `job` span, a child of the attempt's, whose context goes with the job.
    pub(super) async fn attempt(
        &self,
        step: &JobAttempt<'_>,
        name: &str,
        job: &Job,
    ) -> Result<JobOutcome, StepError> {
        let key = step.key();
        let job_id = format!("{key}#{}", step.attempt());
        let span = tracing::info_span!(
            "job",
            hodei.job.name = name,
            hodei.job.id = %job_id,
            hodei.saga.id = %step.saga_id(),
            hodei.worker.id = tracing::field::Empty,
            hodei.outcome = tracing::field::Empty,
            process.exit.code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let result = self.attempt_in(step, name, job, &job_id).instrument(span.clone()).await;
        match &result {
            Ok(outcome) => {
                span.record("hodei.outcome", "ok");
                span.record("process.exit.code", outcome.exit_code);
            }
            Err(e) => {
                span.record("hodei.outcome", if e.is_retryable() { "retryable_error" } else { "error" });
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", e.message());
            }
        }
        result
    }

    async fn attempt_in(
        &self,
        step: &JobAttempt<'_>,
        name: &str,
        job: &Job,
        job_id: &str,
    ) -> Result<JobOutcome, StepError> {
        let key = step.key();
        let previous: Vec<String> = (1..step.attempt()).rev().map(|n| format!("{key}#{n}")).collect();
        // A result this attempt or an earlier one stored (before a restart) is the answer:
        // looked for before anything else, so that a finished job needs no worker, and no
        // secret it once used (it may have been removed since).
        let stored = match self.hub.stored_attempt(job_id, &previous).await {
            Ok(stored) => stored,
            // A hub that keeps no logs keeps no results either.
            Err(HubError::NoLogStore) => None,
            Err(e) => return Err(hub_error(name, &e)),
        };
        if let Some(result) = stored {
            return self.conclude(name, job_id, result, None).await;
        }
        // On a store shared by control planes, the step may have run on another one (its saga
        // was taken over) whose worker still runs the job: the run that goes on is the answer.
        let held = match self.hub.holder(job_id, &previous).await {
            Ok(held) => held,
            Err(HubError::NoLogStore) => None,
            Err(e) => return Err(hub_error(name, &e)),
        };
        if let Some(holder) = held {
            return self.wait_held(step, name, job_id, &holder).await;
        }
        let mut spec = job
            .to_spec(job_id, self.secrets.as_ref())
            .map_err(|e| StepError::terminal(format!("job `{name}`: {e}")))?;
        // The agent's run of the job becomes a child of this attempt's `job` span.
        if let Some(context) = hodei_core::trace::current() {
            spec.traceparent = context.traceparent();
            spec.tracestate = context.tracestate().to_owned();
        }
        let previous = previous.as_slice();
        let run = |worker: String, spec: v1::JobSpec| {
            tracing::Span::current().record("hodei.worker.id", worker.as_str());
            let guard = AbandonGuard { hub: &self.hub, worker, job_id, step, armed: true };
            async move {
                let worker = guard.worker.clone();
                let waiting = self.hub.resume_job(&worker, spec, previous);
                let mut result = self.until_ended(step, &worker, job_id, waiting).await;
                if let Err(HubError::WorkerLost { .. } | HubError::UnknownWorker { .. }) = &result
                    && let Some(holder) = self.hub.holder_once_reachable(job_id, previous).await
                    && holder.worker == worker
                {
                    // Its session ended here but the worker holds the job still, with another
                    // control plane sharing the store or between sessions: its run goes on and
                    // is waited for, and the worker (still leased) is not destroyed under it.
                    tracing::info!(job = %holder.job, %worker, "the worker went on with another control plane");
                    result = self.until_ended(step, &worker, &holder.job, self.hub.wait_held(&holder)).await;
                }
                guard.disarm();
                result
            }
        };
        let result = match &job.placement {
            Placement::Worker(worker) => run(worker.clone(), spec).await,
            Placement::Pool { labels, provider } => {
                let pool = self.pool.as_ref().ok_or_else(|| {
                    StepError::terminal(format!(
                        "job `{name}` asks for a pooled worker, but the dispatcher has no pool"
                    ))
                })?;
                let request = WorkerRequest {
                    job_id: job_id.to_owned(),
                    earlier_jobs: previous.to_vec(),
                    saga_id: step.saga_id().to_string(),
                    labels: labels.clone(),
                    provider: provider.clone(),
                    resources: job.resources,
                    priority: job.priority,
                };
                let lease = tokio::select! {
                    lease = pool.acquire(request) => lease.map_err(|e| {
                        let message = format!("job `{name}`: {e}");
                        if e.is_retryable() {
                            StepError::retryable(message)
                        } else {
                            StepError::terminal(message)
                        }
                    })?,
                    // No job started: nothing to wait for.
                    reason = step.cancelled() => {
                        return Err(StepError::terminal(format!("job `{name}` was cancelled before it got a worker: {reason}")));
                    }
                };
                let mut held = HeldLease { lease: Some(lease), step };
                let worker = held.lease.as_ref().map(|lease| lease.worker_id().to_owned()).unwrap_or_default();
                let result = run(worker, spec).await;
                let Some(lease) = held.lease.take() else { unreachable!("taken only here and in drop") };
                let end = match &result {
                    Err(e) if e.is_retryable() => LeaseEnd::WorkerLost,
                    _ => LeaseEnd::Finished,
                };
                // Asked before the lease ends: a worker that is then destroyed forgets why.
                let reason = match &result {
                    Ok(result) if !succeeded(result) => lease.end_reason(result).await,
                    _ => None,
                };
                lease.release(end);
                return self.conclude(name, job_id, result.map_err(|e| hub_error(name, &e))?, reason).await;
            }
        }
        .map_err(|e| hub_error(name, &e))?;
        self.conclude(name, job_id, result, None).await
    }

    /// Waits for the job another session holds; a cancel of the step cancels it when its worker
    /// is connected here, and otherwise waits for it to end on its own.
    async fn wait_held(
        &self,
        step: &JobAttempt<'_>,
        name: &str,
        job_id: &str,
        holder: &JobHolder,
    ) -> Result<JobOutcome, StepError> {
        tracing::Span::current().record("hodei.worker.id", holder.worker.as_str());
        tracing::info!(job = %holder.job, worker = %holder.worker, "waiting for the run a worker already holds");

        let result = self.until_ended(step, &holder.worker, &holder.job, self.hub.wait_held(holder)).await;
        self.conclude(name, job_id, result.map_err(|e| hub_error(name, &e))?, None).await
    }

    /// Waits for the job's result. If its saga or branch is cancelled meanwhile, the job is
    /// cancelled on its worker and still waited for, so that the step ends only once the job
    /// has (its result says `Cancelled`, its log is closed).
    async fn until_ended(
        &self,
        step: &JobAttempt<'_>,
        worker: &str,
        job_id: &str,
        waiting: impl Future<Output = Result<v1::JobResult, HubError>>,
    ) -> Result<v1::JobResult, HubError> {
        tokio::pin!(waiting);
        tokio::select! {
            result = &mut waiting => result,
            reason = step.cancelled() => {
                if let Err(e) = self.hub.cancel_job(worker, job_id, &reason).await {
                    tracing::warn!(job = job_id, error = %e, "could not cancel the job; waiting for it to end");
                }
                waiting.await
            }
        }
    }

    /// [`judge`]s the result, with the last lines of a failed job's output for its error: they
    /// are what says why (`cargo: not found`), and they are stored masked.
    async fn conclude(
        &self,
        name: &str,
        job_id: &str,
        result: v1::JobResult,
        reason: Option<String>,
    ) -> Result<JobOutcome, StepError> {
        let tail = match self.hub.logs() {
            Some(logs) if !succeeded(&result) => output_tail(logs, ran_job(job_id, &result.job_id)).await,
            _ => String::new(),
        };
        judge(name, job_id, result, reason, &tail)
    }
}

/// A pooled worker's lease while the attempt waits for its job. Dropped with the attempt, the
/// lease ends abandoned (the worker is destroyed), unless the saga went to another engine:
/// then the job goes on for the new owner, and the worker is kept until it is done.
struct HeldLease<'a> {
    lease: Option<WorkerLease>,
    step: &'a JobAttempt<'a>,
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let end = if self.step.handed_over() { LeaseEnd::HandedOver } else { LeaseEnd::Abandoned };
            lease.release(end);
        }
    }
}

/// Tells the hub when an attempt stops waiting for its job before the result: the job is
/// cancelled unless the engine is shutting down (then it goes on, for the restarted engine).
struct AbandonGuard<'a> {
    hub: &'a Hub,
    worker: String,
    job_id: &'a str,
    step: &'a JobAttempt<'a>,
    armed: bool,
}

impl AbandonGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.hub.abandon_job(&self.worker, self.job_id, self.step.abandon_reason());
    }
}

/// A lost or absent worker is worth another attempt (it may reconnect); anything else the hub
/// refuses would be refused again.
fn hub_error(name: &str, error: &HubError) -> StepError {
    let message = format!("job `{name}`: {error}");
    if error.is_retryable() { StepError::retryable(message) } else { StepError::terminal(message) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_or_absent_worker_is_retryable_and_other_hub_errors_are_not() {
        let lost = HubError::WorkerLost { worker_id: "w".into(), job_id: "s/0".into() };
        assert!(hub_error("build", &lost).is_retryable());
        assert!(hub_error("build", &HubError::UnknownWorker { worker_id: "w".into() }).is_retryable());
        assert!(!hub_error("build", &HubError::NoLogStore).is_retryable());
    }
}
