//! Remote jobs as durable saga steps.
//!
//! A [`Job`] is what the saga journals as a step's input: the program, its environment, its
//! limits, the worker to run on, and the *names* of the secrets it needs. Secret values are
//! resolved through a [`SecretSource`] on every attempt, at dispatch time, and go only into the
//! [`v1::JobSpec`] sent over the worker's mutual-TLS session, so the journal never holds them.
//!
//! [`RemoteJobs::run_job`] runs one job as one step. The job id is deterministic: the step's
//! idempotency key and the attempt, `saga id/step#attempt`, so each attempt has a log of its
//! own in the hub's store. An attempt first looks for the earlier attempts of its step
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

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{RetryPolicy, SagaContext, StepContext, StepError, StepStop};
use serde::{Deserialize, Serialize};

use crate::hub::{Hub, HubError};
use crate::protocol::v1::{self, job_result::Outcome};

/// What a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Program {
    /// A program and its arguments, run directly.
    Command(Vec<String>),
    /// A script fed on stdin to an interpreter (for example `["/bin/sh", "-s"]`).
    Script {
        /// The interpreter and its arguments.
        interpreter: Vec<String>,
        /// The script's text.
        script: String,
    },
}

/// Where a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Placement {
    /// The worker with this id, which must connect by itself.
    Worker(String),
    /// A worker from the dispatcher's [`WorkerPool`] (provisioned on demand) that matches the
    /// labels and, when given, comes from the named provider.
    Pool {
        /// Labels the worker must carry.
        labels: BTreeMap<String, String>,
        /// The provider to take it from, by name; any matching one when `None`.
        provider: Option<String>,
    },
}

/// What a job asks of its worker's machine. `None` leaves the provider's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Resources {
    /// CPU, in thousandths of a core.
    pub cpu_millis: Option<u64>,
    /// Memory, in bytes.
    pub memory_bytes: Option<u64>,
}

impl Resources {
    /// Limits of `cpu_millis` thousandths of a core and `memory_bytes` bytes.
    pub fn new(cpu_millis: Option<u64>, memory_bytes: Option<u64>) -> Self {
        Self { cpu_millis, memory_bytes }
    }
}

/// A remote job: the journaled input of its step. It holds secret names, never their values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Job {
    /// What to run.
    pub program: Program,
    /// The job's whole environment (jobs start with an empty one).
    pub env: BTreeMap<String, String>,
    /// The working directory on the worker; the agent's default when `None`.
    pub working_dir: Option<String>,
    /// The worker-side time limit; none when `None`.
    pub timeout: Option<Duration>,
    /// How long a cancelled or timed-out job gets between SIGTERM and SIGKILL.
    pub cancel_grace: Option<Duration>,
    /// Secrets, by the variable the job sees them as, to the name the [`SecretSource`] knows.
    pub secrets: BTreeMap<String, String>,
    /// Where to run it.
    pub placement: Placement,
    /// What it needs of its worker.
    pub resources: Resources,
    /// Its place in the pool's queue: higher goes first, then earlier arrival.
    pub priority: i32,
}

impl Job {
    /// Runs `command` (program and arguments) on `worker`.
    pub fn command<S: Into<String>>(worker: impl Into<String>, command: impl IntoIterator<Item = S>) -> Self {
        Self::new(worker, Program::Command(command.into_iter().map(Into::into).collect()))
    }

    /// Runs `script` with `interpreter` (for example `["/bin/sh", "-s"]`) on `worker`.
    pub fn script<S: Into<String>>(
        worker: impl Into<String>,
        interpreter: impl IntoIterator<Item = S>,
        script: impl Into<String>,
    ) -> Self {
        let interpreter = interpreter.into_iter().map(Into::into).collect();
        Self::new(worker, Program::Script { interpreter, script: script.into() })
    }

    /// Runs `command` on a worker from the dispatcher's pool ([`Placement::Pool`] with no
    /// labels: any worker of any provider).
    pub fn pooled_command<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Self {
        Self::new("", Program::Command(command.into_iter().map(Into::into).collect()))
            .placement(Placement::Pool { labels: BTreeMap::new(), provider: None })
    }

    /// Runs `script` with `interpreter` on a worker from the dispatcher's pool.
    pub fn pooled_script<S: Into<String>>(
        interpreter: impl IntoIterator<Item = S>,
        script: impl Into<String>,
    ) -> Self {
        Self::script("", interpreter, script)
            .placement(Placement::Pool { labels: BTreeMap::new(), provider: None })
    }

    /// Sets where the job runs.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Requires the pool's worker to carry `name=value` (turns the placement into a pool one).
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        match &mut self.placement {
            Placement::Pool { labels, .. } => {
                labels.insert(name.into(), value.into());
            }
            Placement::Worker(_) => {
                self.placement =
                    Placement::Pool { labels: [(name.into(), value.into())].into(), provider: None };
            }
        }
        self
    }

    /// Takes the worker from the provider named `provider` (turns the placement into a pool one).
    pub fn provider(mut self, provider: impl Into<String>) -> Self {
        match &mut self.placement {
            Placement::Pool { provider: hint, .. } => *hint = Some(provider.into()),
            Placement::Worker(_) => {
                self.placement = Placement::Pool { labels: BTreeMap::new(), provider: Some(provider.into()) };
            }
        }
        self
    }

    /// Sets the resources the job needs.
    pub fn resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// Sets the job's priority in the pool's queue.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    fn new(worker: impl Into<String>, program: Program) -> Self {
        Self {
            program,
            env: BTreeMap::new(),
            working_dir: None,
            timeout: None,
            cancel_grace: None,
            secrets: BTreeMap::new(),
            placement: Placement::Worker(worker.into()),
            resources: Resources::default(),
            priority: 0,
        }
    }

    /// Sets one environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Sets the working directory.
    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// Sets the worker-side time limit.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Sets the grace period between SIGTERM and SIGKILL.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = Some(grace);
        self
    }

    /// Gives the job the secret `secret` as the variable `variable`. Only the name is kept.
    pub fn secret(mut self, variable: impl Into<String>, secret: impl Into<String>) -> Self {
        self.secrets.insert(variable.into(), secret.into());
        self
    }

    /// The wire spec, with the secrets resolved now.
    fn to_spec(&self, job_id: &str, source: &dyn SecretSource) -> Result<v1::JobSpec, SecretError> {
        let (command, interpreter, script) = match &self.program {
            Program::Command(command) => (command.clone(), Vec::new(), String::new()),
            Program::Script { interpreter, script } => (Vec::new(), interpreter.clone(), script.clone()),
        };
        let mut secrets = std::collections::HashMap::with_capacity(self.secrets.len());
        for (variable, name) in &self.secrets {
            // The wire carries secrets as strings; a binary secret is refused rather than mangled.
            let value = String::from_utf8(source.resolve(name)?)
                .map_err(|_| SecretError::NotUtf8 { name: name.clone() })?;
            secrets.insert(variable.clone(), value);
        }
        Ok(v1::JobSpec {
            job_id: job_id.to_owned(),
            command,
            script,
            interpreter,
            env: self.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            working_dir: self.working_dir.clone().unwrap_or_default(),
            secrets,
            timeout_ms: self.timeout.map_or(0, duration_ms),
            cancel_grace_ms: self.cancel_grace.map_or(0, duration_ms),
            resources: Some(v1::Resources {
                cpu_millis: self.resources.cpu_millis.unwrap_or(0),
                memory_bytes: self.resources.memory_bytes.unwrap_or(0),
            }),
        })
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A job that exited with code 0: the journaled output of its step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobOutcome {
    /// The job id: the step's idempotency key.
    pub job_id: String,
    /// The exit code (always 0: any other fails the step).
    pub exit_code: i32,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
    /// CPU time used, in microseconds.
    pub cpu_usage_usec: u64,
    /// Peak memory, in bytes.
    pub memory_peak_bytes: u64,
    /// Wall-clock time, in milliseconds.
    pub wall_time_ms: u64,
    /// Where the figures come from: `cgroup` or `proc`.
    pub metrics_source: String,
}

/// Why a secret could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The source has no secret by this name.
    #[error("secret `{name}` is not known")]
    NotFound {
        /// The secret's name.
        name: String,
    },
    /// The name cannot name a secret of this source (e.g. a path for [`FileSecrets`]).
    #[error("`{name}` is not a valid secret name")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// The secret exists but could not be read.
    #[error("secret `{name}` could not be read: {reason}")]
    Unreadable {
        /// The secret's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The secret is not UTF-8, and the wire carries secrets as strings.
    #[error("secret `{name}` is not UTF-8")]
    NotUtf8 {
        /// The secret's name.
        name: String,
    },
}

/// Resolves secret names to values at dispatch time.
pub trait SecretSource: Send + Sync {
    /// The value of the secret `name`.
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError>;
}

/// Secrets held in memory (tests, or values loaded at start-up).
#[derive(Clone, Default)]
pub struct MemorySecrets {
    values: BTreeMap<String, Vec<u8>>,
}

impl MemorySecrets {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the secret `name`.
    pub fn insert(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.values.insert(name.into(), value.into());
        self
    }
}

// By hand, so that a debug print lists the names and never the values.
impl fmt::Debug for MemorySecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySecrets").field("names", &self.values.keys().collect::<Vec<_>>()).finish()
    }
}

impl SecretSource for MemorySecrets {
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError> {
        self.values.get(name).cloned().ok_or_else(|| SecretError::NotFound { name: name.to_owned() })
    }
}

/// Secrets read from the control plane's environment: the secret `name` is the variable
/// `prefix` + `name`, read when the job is dispatched.
#[derive(Clone, Debug, Default)]
pub struct EnvSecrets {
    prefix: String,
}

impl EnvSecrets {
    /// Secrets from the variables whose names start with `prefix` (may be empty).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }
}

impl SecretSource for EnvSecrets {
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError> {
        use std::os::unix::ffi::OsStringExt;
        std::env::var_os(format!("{}{name}", self.prefix))
            .map(OsStringExt::into_vec)
            .ok_or_else(|| SecretError::NotFound { name: name.to_owned() })
    }
}

/// What a [`WorkerPool`] is asked for: a worker able to run one job.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerRequest {
    /// The job the worker is for (`saga id/step`).
    pub job_id: String,
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
}

/// A worker a [`WorkerPool`] handed out for one job. Releasing it (or dropping it, which counts
/// as [`LeaseEnd::Abandoned`]) tells the pool it is free again.
pub struct WorkerLease {
    worker_id: String,
    release: Option<Box<dyn FnOnce(LeaseEnd) + Send>>,
}

impl fmt::Debug for WorkerLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerLease").field("worker_id", &self.worker_id).finish_non_exhaustive()
    }
}

impl WorkerLease {
    /// A lease on `worker_id`; `release` runs exactly once, when it ends.
    pub fn new(worker_id: impl Into<String>, release: impl FnOnce(LeaseEnd) + Send + 'static) -> Self {
        Self { worker_id: worker_id.into(), release: Some(Box::new(release)) }
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

/// Hands out workers for jobs placed by [`Placement::Pool`]: the control plane's scheduler
/// (in `hodei-providers`) implements it, provisioning workers on demand. Waiting for a free
/// worker happens inside [`WorkerPool::acquire`], which must not return until it has one or
/// knows it cannot get one.
#[async_trait::async_trait]
pub trait WorkerPool: Send + Sync + fmt::Debug {
    /// A connected worker for `request`, leased until the lease is released or dropped.
    async fn acquire(&self, request: WorkerRequest) -> Result<WorkerLease, PoolError>;
}

/// Secrets read from files in a directory (a mounted Kubernetes or Docker secret, say): the
/// secret `name` is the file `<dir>/<name>`, read when the job is dispatched. A name that is not
/// a plain file name (empty, `.`, `..`, or with a `/`) is refused, so no name reaches outside
/// the directory.
#[derive(Clone, Debug)]
pub struct FileSecrets {
    dir: std::path::PathBuf,
}

impl FileSecrets {
    /// Secrets from the files in `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

impl SecretSource for FileSecrets {
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError> {
        let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
        if !plain {
            return Err(SecretError::InvalidName { name: name.to_owned() });
        }
        match std::fs::read(self.dir.join(name)) {
            Ok(value) => Ok(value),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SecretError::NotFound { name: name.to_owned() })
            }
            Err(e) => Err(SecretError::Unreadable { name: name.to_owned(), reason: e.to_string() }),
        }
    }
}

/// What a saga needs to run remote jobs: the hub, the secret source, and the steps' retry
/// policy. Cheap to clone, so that a saga definition's body can capture it.
#[derive(Clone)]
pub struct JobDispatcher {
    hub: Hub,
    secrets: Arc<dyn SecretSource>,
    retry: RetryPolicy,
    timeout: Option<Duration>,
    pool: Option<Arc<dyn WorkerPool>>,
}

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
    async fn attempt(&self, step: &StepContext, name: &str, job: &Job) -> Result<JobOutcome, StepError> {
        let key = &step.idempotency_key;
        let job_id = format!("{key}#{}", step.attempt);
        let job_id = job_id.as_str();
        let previous: Vec<String> = (1..step.attempt).rev().map(|n| format!("{key}#{n}")).collect();
        let spec = job
            .to_spec(job_id, self.secrets.as_ref())
            .map_err(|e| StepError::terminal(format!("job `{name}`: {e}")))?;
        let run = |worker: String, spec: v1::JobSpec| {
            let guard = AbandonGuard { hub: &self.hub, worker, job_id, step, armed: true };
            async move {
                let result = self.hub.resume_job(&guard.worker, spec, &previous).await;
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
                    saga_id: step.saga_id.to_string(),
                    labels: labels.clone(),
                    provider: provider.clone(),
                    resources: job.resources,
                    priority: job.priority,
                };
                let lease = pool.acquire(request).await.map_err(|e| {
                    let message = format!("job `{name}`: {e}");
                    if e.is_retryable() {
                        StepError::retryable(message)
                    } else {
                        StepError::terminal(message)
                    }
                })?;
                let result = run(lease.worker_id().to_owned(), spec).await;
                let end = match &result {
                    Err(e) if e.is_retryable() => LeaseEnd::WorkerLost,
                    _ => LeaseEnd::Finished,
                };
                lease.release(end);
                result
            }
        }
        .map_err(|e| hub_error(name, &e))?;
        judge(name, job_id, result)
    }
}

/// Tells the hub when an attempt stops waiting for its job before the result: the job is
/// cancelled unless the engine is shutting down (then it goes on, for the restarted engine).
struct AbandonGuard<'a> {
    hub: &'a Hub,
    worker: String,
    job_id: &'a str,
    step: &'a StepContext,
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
        let cancel = match self.step.stop_reason() {
            Some(StepStop::ShuttingDown) => None,
            Some(StepStop::Cancelled(reason)) => Some(format!("the saga was cancelled: {reason}")),
            // Only the step's own timeout drops an attempt while the saga goes on.
            _ => Some("the step timed out".to_owned()),
        };
        self.hub.abandon_job(&self.worker, self.job_id, cancel);
    }
}

/// A lost or absent worker is worth another attempt (it may reconnect); anything else the hub
/// refuses would be refused again.
fn hub_error(name: &str, error: &HubError) -> StepError {
    let message = format!("job `{name}`: {error}");
    if error.is_retryable() { StepError::retryable(message) } else { StepError::terminal(message) }
}

/// Exit code 0 succeeds; every other ending is the job's own failure, which a retry would
/// repeat, so it is terminal.
fn judge(name: &str, job_id: &str, result: v1::JobResult) -> Result<JobOutcome, StepError> {
    // A re-attached attempt reports the earlier attempt's job, the one that really ran.
    let job_id = if result.job_id.is_empty() { job_id } else { result.job_id.as_str() };
    let failure = match result.outcome {
        Some(Outcome::ExitCode(0)) => {
            return Ok(JobOutcome {
                job_id: job_id.to_owned(),
                exit_code: 0,
                stdout_bytes: result.stdout_bytes,
                stderr_bytes: result.stderr_bytes,
                cpu_usage_usec: result.cpu_usage_usec,
                memory_peak_bytes: result.memory_peak_bytes,
                wall_time_ms: result.wall_time_ms,
                metrics_source: result.metrics_source,
            });
        }
        Some(Outcome::ExitCode(code)) => format!("exited with code {code}"),
        Some(Outcome::Signal(signal)) => format!("was killed by signal {signal}"),
        Some(Outcome::TimedOut(_)) => "timed out".to_owned(),
        Some(Outcome::Cancelled(reason)) => format!("was cancelled: {reason}"),
        Some(Outcome::FailedToStart(reason)) => format!("failed to start: {reason}"),
        None => "ended without an outcome".to_owned(),
    };
    Err(StepError::terminal(format!("job `{name}` ({job_id}) {failure}")))
}

/// Runs remote jobs as steps of a saga.
pub trait RemoteJobs {
    /// Runs `job` as one step named `name`, under `jobs`' retry policy. Its input (journaled) is
    /// the job with secret names only; its output is the [`JobOutcome`].
    fn run_job(
        &self,
        jobs: &JobDispatcher,
        name: &str,
        job: Job,
    ) -> impl Future<Output = Result<JobOutcome, StepError>> + Send;
}

impl RemoteJobs for SagaContext {
    async fn run_job(&self, jobs: &JobDispatcher, name: &str, job: Job) -> Result<JobOutcome, StepError> {
        let step = self.step(name).input(job).retry(jobs.retry);
        let step = match jobs.timeout {
            Some(limit) => step.timeout(limit),
            None => step,
        };
        step.run(|step: StepContext, job: Job| async move { jobs.attempt(&step, name, &job).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome) -> v1::JobResult {
        v1::JobResult { outcome: Some(outcome), stdout_bytes: 6, ..v1::JobResult::default() }
    }

    #[test]
    fn only_exit_code_zero_succeeds_and_every_failure_is_terminal_and_named() {
        let ok = judge("build", "s/0", result(Outcome::ExitCode(0))).unwrap();
        assert_eq!((ok.job_id.as_str(), ok.exit_code, ok.stdout_bytes), ("s/0", 0, 6));
        let cases = [
            (Outcome::ExitCode(3), "exited with code 3"),
            (Outcome::Signal(9), "killed by signal 9"),
            (Outcome::TimedOut(true), "timed out"),
            (Outcome::Cancelled("aborted".into()), "cancelled: aborted"),
            (Outcome::FailedToStart("no such file".into()), "failed to start: no such file"),
        ];
        for (outcome, expected) in cases {
            let error = judge("build", "s/0", result(outcome)).unwrap_err();
            assert!(!error.is_retryable(), "{error:?}");
            assert!(
                error.message().starts_with("job `build`") && error.message().contains(expected),
                "{error:?}"
            );
        }
    }

    #[test]
    fn a_lost_or_absent_worker_is_retryable_and_other_hub_errors_are_not() {
        let lost = HubError::WorkerLost { worker_id: "w".into(), job_id: "s/0".into() };
        assert!(hub_error("build", &lost).is_retryable());
        assert!(hub_error("build", &HubError::UnknownWorker { worker_id: "w".into() }).is_retryable());
        assert!(!hub_error("build", &HubError::NoLogStore).is_retryable());
    }

    #[test]
    fn file_secrets_read_files_by_plain_name_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("registry"), b"tok3n").unwrap();
        let source = FileSecrets::new(dir.path());
        assert_eq!(source.resolve("registry").unwrap(), b"tok3n");
        assert!(matches!(source.resolve("missing"), Err(SecretError::NotFound { .. })));
        for name in ["", ".", "..", "../etc/passwd", "a/b"] {
            assert!(matches!(source.resolve(name), Err(SecretError::InvalidName { .. })), "{name:?}");
        }
    }

    #[test]
    fn secrets_resolve_at_dispatch_and_their_values_stay_out_of_debug_and_the_job() {
        let source = MemorySecrets::new().insert("token", "s3cr3t");
        assert!(!format!("{source:?}").contains("s3cr3t"));
        let job = Job::command("w", ["true"]).secret("TOKEN", "token");
        let spec = job.to_spec("s/0", &source).unwrap();
        assert_eq!(spec.secrets.get("TOKEN").map(String::as_str), Some("s3cr3t"));
        assert!(!format!("{job:?}").contains("s3cr3t"));
        let missing = Job::command("w", ["true"]).secret("X", "nope").to_spec("s/0", &source).unwrap_err();
        assert!(matches!(missing, SecretError::NotFound { name } if name == "nope"));
        let binary = MemorySecrets::new().insert("bin", vec![0xff, 0xfe]);
        let refused = Job::command("w", ["true"]).secret("B", "bin").to_spec("s/0", &binary).unwrap_err();
        assert!(matches!(refused, SecretError::NotUtf8 { .. }));
    }
}
