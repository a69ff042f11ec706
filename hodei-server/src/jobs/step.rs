//! A remote job as a step of a saga, and a rollback job as its compensation.

use std::sync::Arc;
use std::time::Duration;

use hodei_core::{CompensationContext, SagaContext, StepContext, StepError};

use super::attempt::{JobAttempt, ROLLBACK_SUFFIX};
use super::{Job, JobDispatcher, JobOutcome};

/// What a cancelled job's step waits beyond the job's own grace: the cancel's way to the
/// worker, the result's way back, and the log store's sync.
const CANCEL_MARGIN: Duration = Duration::from_secs(10);

/// Runs remote jobs as steps of a saga.
///
/// The dispatcher comes from the engine's resources (`EngineBuilder::resource`), where the
/// embedded control plane puts it, unless [`JobStep::on`] names one.
pub trait RemoteJobs {
    /// A job step named `name`, to configure before it [`run`](JobStep::run)s.
    fn job(&self, name: &str, job: Job) -> JobStep<'_>;

    /// Runs `job` as one step named `name`, under its dispatcher's retry policy. Its input
    /// (journaled) is the job with secret names only; its output is the [`JobOutcome`].
    fn run_job(&self, name: &str, job: Job) -> impl Future<Output = Result<JobOutcome, StepError>> + Send;

    /// [`run_job`](Self::run_job) with the given dispatcher rather than the engine's.
    fn run_job_on(
        &self,
        jobs: &JobDispatcher,
        name: &str,
        job: Job,
    ) -> impl Future<Output = Result<JobOutcome, StepError>> + Send;
}

impl RemoteJobs for SagaContext {
    fn job(&self, name: &str, job: Job) -> JobStep<'_> {
        JobStep { ctx: self, name: name.to_owned(), job, dispatcher: None, rollback: None }
    }

    async fn run_job(&self, name: &str, job: Job) -> Result<JobOutcome, StepError> {
        self.job(name, job).run().await
    }

    async fn run_job_on(&self, jobs: &JobDispatcher, name: &str, job: Job) -> Result<JobOutcome, StepError> {
        self.job(name, job).on(jobs).run().await
    }
}

/// A job step being configured: [`RemoteJobs::job`].
#[derive(Debug)]
#[must_use = "a job step does nothing until it is run"]
pub struct JobStep<'c> {
    ctx: &'c SagaContext,
    name: String,
    job: Job,
    dispatcher: Option<JobDispatcher>,
    rollback: Option<Job>,
}

impl JobStep<'_> {
    /// Runs the job through `jobs` rather than the engine's dispatcher.
    pub fn on(mut self, jobs: &JobDispatcher) -> Self {
        self.dispatcher = Some(jobs.clone());
        self
    }

    /// Compensates the step with a job: when the saga fails for good, or is cancelled, after
    /// this step started, `rollback` runs as a remote job with the same guarantees as any
    /// (durable retries under the dispatcher's policy, re-attached after a restart, never run
    /// twice at once). It runs whether the step's job finished or was cut off, as every
    /// compensation does. Its id is the step's key with `/rollback`, then `#attempt`.
    pub fn rollback(mut self, rollback: Job) -> Self {
        self.rollback = Some(rollback);
        self
    }

    /// Runs the step: its attempts first look for a stored result, then re-attach to an earlier
    /// attempt still running, then run the job on a worker.
    ///
    /// Without a dispatcher (none named, none registered) the step is journaled as any other
    /// and only its job fails to run: a test's stand-ins for the step and its rollback (see
    /// `hodei_core::testing`) run in their place.
    pub async fn run(self) -> Result<JobOutcome, StepError> {
        let JobStep { ctx, name, job, dispatcher, rollback } = self;
        let jobs = match dispatcher {
            Some(jobs) => Ok(Arc::new(jobs)),
            None => ctx.resource::<JobDispatcher>().map_err(|e| {
                format!(
                    "job `{name}`: {e}; start the engine with the control plane's dispatcher as a resource"
                )
            }),
        };
        let (retry, timeout) = match &jobs {
            Ok(jobs) => (jobs.retry, jobs.timeout),
            Err(_) => (JobDispatcher::default_retry(), None),
        };
        // Time for a cancelled job's SIGTERM, its grace and its result to come back.
        let grace = job.cancel_grace.unwrap_or(hodei_agent::runner::DEFAULT_GRACE) + CANCEL_MARGIN;
        // A restart of the control plane does not fail the job: the next attempt re-attaches to
        // it, or finds its result.
        let step = ctx.step(&name).input(job).retry(retry).cancel_grace(grace).interruptions_count(false);
        let step = match timeout {
            Some(limit) => step.timeout(limit),
            None => step,
        };
        let body = |step: StepContext, job: Job| {
            let (jobs, name) = (&jobs, &name);
            async move {
                let jobs = jobs.as_ref().map_err(StepError::terminal)?;
                jobs.attempt(&JobAttempt::Step(&step), name, &job).await
            }
        };
        let Some(rollback) = rollback else { return step.run(body).await };
        let (compensating, rollback_name) = (jobs.clone(), format!("{name} rollback"));
        let compensate = move |c: CompensationContext<Job, JobOutcome>| {
            let (jobs, rollback, name) = (compensating.clone(), rollback.clone(), rollback_name.clone());
            async move {
                let jobs = jobs.map_err(StepError::terminal)?;
                let attempt = JobAttempt::Rollback {
                    saga_id: &c.saga_id,
                    key: format!("{}{ROLLBACK_SUFFIX}", c.idempotency_key),
                    attempt: c.attempt,
                };
                jobs.attempt(&attempt, &name, &rollback).await.map(drop)
            }
        };
        step.compensate_retrying(retry, compensate).run(body).await
    }
}
