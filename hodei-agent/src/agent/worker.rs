//! What the agent keeps across sessions (its identity and its jobs), and starting and
//! cancelling jobs.

use std::sync::{Arc, OnceLock, PoisonError};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::error::AgentError;
use super::job_task::{CancelMap, Cancels, JobTask};
use super::outbox::Outboxes;
use super::status::say;
use super::trace::JobTrace;
use super::wire::job_spec;
use crate::pki::{AgentKey, TlsIdentity, WorkerCertificate};
use crate::protocol::v1;
use crate::runner::JobRunner;

/// What the agent keeps across sessions: its identity and its jobs.
pub(super) struct Worker {
    pub(super) identity: TlsIdentity,
    /// The certificate `identity` holds, for its rotation time.
    pub(super) certificate: WorkerCertificate,
    pub(super) outboxes: Arc<Outboxes>,
    /// The running jobs' cancel handles, with where the cancellation reason goes; each job's
    /// task removes its own entry when the job is over.
    pub(super) cancels: Cancels,
    /// Aborted when the agent stops, which cancels the jobs (their `RunningJob`s are dropped).
    pub(super) tasks: JoinSet<()>,
    /// The key of a rotation asked for on the current session, until the hub answers.
    pub(super) rotating: Option<AgentKey>,
    /// Whether this session asked for a rotation: once per session, so a hub that refuses
    /// (and says why in its log) is not asked again in a loop.
    pub(super) rotation_asked: bool,
    /// [`Settings::status_to_stderr`](super::Settings::status_to_stderr).
    pub(super) status_to_stderr: bool,
    /// The fresh registration's key and certificate being written to the work directory:
    /// the first session opens meanwhile and waits for it before it serves anything.
    pub(super) storing: Option<tokio::task::JoinHandle<Result<(), AgentError>>>,
}

impl Worker {
    fn cancels(&self) -> std::sync::MutexGuard<'_, CancelMap> {
        // Inserts and removes only: a poisoned lock still holds a consistent map.
        self.cancels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the job, or records at once that it could not start. A job the agent already
    /// holds (a re-assignment after a reconnect) goes on as it is: its output and result are
    /// resent by every new session anyway.
    pub(super) fn start(&mut self, runner: &JobRunner, mut spec: v1::JobSpec) {
        let job_id = spec.job_id.clone();
        if self.outboxes.contains(&job_id) {
            tracing::info!(job = %job_id, "job re-attached");
            return;
        }
        let trace = JobTrace::from_spec(&spec);
        for (name, value) in trace.iter().flat_map(JobTrace::env) {
            // A value the job sets itself is its own to keep.
            spec.env.entry(name).or_insert(value);
        }
        // Sized like the runner's batches, so output waits in the pipe, not here.
        let (logs, batches) = mpsc::channel(16);
        let (samples, metrics) = mpsc::channel(4);
        let started =
            job_spec(spec).and_then(|(spec, secrets)| runner.start(spec, secrets, logs, Some(samples)));
        match started {
            Ok(job) => {
                let Some(outbox) = self.outboxes.open(&job_id, job.pid()) else { return };
                let reason = Arc::new(OnceLock::new());
                self.cancels().insert(job_id.clone(), (job.cancel_handle(), reason.clone()));
                let task = JobTask {
                    outboxes: self.outboxes.clone(),
                    outbox,
                    cancels: self.cancels.clone(),
                    reason,
                    trace,
                };
                self.tasks.spawn(task.run(job, batches, metrics));
            }
            Err(e) => {
                say(self.status_to_stderr, format_args!("job {job_id} could not start: {e}"));
                let mut result = v1::JobResult {
                    job_id: job_id.clone(),
                    outcome: Some(v1::job_result::Outcome::FailedToStart(e.to_string())),
                    ..v1::JobResult::default()
                };
                result.spans.extend(trace.and_then(|trace| trace.finish(&result, 0)));
                if let Some(outbox) = self.outboxes.open(&job_id, 0) {
                    outbox.finish(result);
                    self.outboxes.notify();
                }
            }
        }
    }

    pub(super) fn cancel(&self, cancel: v1::CancelJob) {
        match self.cancels().get(&cancel.job_id) {
            Some((handle, reason)) => {
                // The first reason is the one reported.
                let _ = reason.set(cancel.reason);
                handle.cancel();
            }
            None => tracing::debug!(job = %cancel.job_id, "cancel for a job not running here ignored"),
        }
    }
}
