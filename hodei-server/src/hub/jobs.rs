//! Running jobs on workers, from the caller's side: run, re-attach, cancel, abandon, and the
//! results already stored.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::command::SessionCommand;
use super::error::HubError;
use super::handle::Hub;
use super::results::{read_result, stored_result};
use crate::logstore::JobHolder;
use hodei_agent::protocol::v1;

/// How often [`Hub::wait_held`] looks for the result.
const HELD_RECHECK: Duration = Duration::from_millis(250);

impl Hub {
    /// Runs `spec` on `worker_id` and waits for its result. Its output is stored under the job
    /// id in the hub's log store, whose log for the job is closed, and the result stored, before
    /// this returns `Ok`.
    ///
    /// A job whose result is already stored is not run again: that result is returned. If the
    /// worker is not connected, this waits for it up to [`HubConfig::worker_wait`]. Fails with
    /// [`HubError::WorkerLost`] if its session ends first.
    ///
    /// [`HubConfig::worker_wait`]: super::HubConfig::worker_wait
    pub async fn run_job(&self, worker_id: &str, spec: v1::JobSpec) -> Result<v1::JobResult, HubError> {
        self.resume_job(worker_id, spec, &[]).await
    }

    /// [`Hub::run_job`], re-attaching instead to one of `previous` (earlier attempts of the
    /// same step, newest first) if its result is stored or the worker still runs it: after a
    /// restart of the control plane, the step picks up the job that went on without it rather
    /// than starting a duplicate. A stored result that says the job was cancelled is not taken
    /// (the hub cancels only jobs whose caller gave up on them).
    pub async fn resume_job(
        &self,
        worker_id: &str,
        spec: v1::JobSpec,
        previous: &[String],
    ) -> Result<v1::JobResult, HubError> {
        let Some(logs) = &self.logs else { return Err(HubError::NoLogStore) };
        if let Some(result) = stored_result(logs, &spec.job_id, previous).await? {
            return Ok(result);
        }
        let job_id = spec.job_id.clone();
        let lost = || HubError::WorkerLost { worker_id: worker_id.to_owned(), job_id: job_id.clone() };
        let commands = self.session_within(worker_id, self.config.worker_wait).await?;
        let (reply, result) = oneshot::channel();
        let run = SessionCommand::Run { spec: Box::new(spec), previous: previous.to_vec(), reply };
        commands.send(run).await.map_err(|_| lost())?;
        // The session task drops the reply when the session ends: that is the loss.
        result.await.map_err(|_| lost())?
    }

    /// The result [`Hub::resume_job`] would take from the store without a worker: `job_id`'s,
    /// or one of `previous`'s that was not cancelled.
    pub async fn stored_attempt(
        &self,
        job_id: &str,
        previous: &[String],
    ) -> Result<Option<v1::JobResult>, HubError> {
        let Some(logs) = &self.logs else { return Err(HubError::NoLogStore) };
        stored_result(logs, job_id, previous).await
    }

    /// On a log store shared by several control planes: the worker holding `job_id` or one of
    /// `previous` (newest first) without a stored result, whichever control plane its session
    /// is with ([`LogStore::holder`], within [`HubConfig::worker_wait`] of its last session).
    /// A step that finds one waits for that job ([`Hub::wait_held`]) instead of running it
    /// again. Always `None` on a store of this control plane alone.
    ///
    /// [`LogStore::holder`]: crate::logstore::LogStore::holder
    /// [`HubConfig::worker_wait`]: super::HubConfig::worker_wait
    pub async fn holder(&self, job_id: &str, previous: &[String]) -> Result<Option<JobHolder>, HubError> {
        let Some(logs) = &self.logs else { return Err(HubError::NoLogStore) };
        let jobs: Vec<String> =
            std::iter::once(job_id).chain(previous.iter().map(String::as_str)).map(str::to_owned).collect();
        logs.holder(&jobs, self.config.worker_wait)
            .await
            .map_err(|source| HubError::Logs { job_id: job_id.to_owned(), source })
    }

    /// Whether `worker_id` holds a job without a stored result on any control plane sharing
    /// the log store ([`LogStore::holds_any`]). A database that does not answer counts as a
    /// yes: a worker kept a while longer costs a slot, one destroyed under its job costs the job.
    ///
    /// [`LogStore::holds_any`]: crate::logstore::LogStore::holds_any
    pub async fn holds_a_job(&self, worker_id: &str) -> bool {
        let Some(logs) = &self.logs else { return false };
        logs.holds_any(worker_id, self.config.worker_wait).await.unwrap_or_else(|e| {
            tracing::warn!(worker = worker_id, error = %e, "cannot tell whether the worker holds a job; keeping it");
            true
        })
    }

    /// [`Hub::holder`], asked again while the shared database is out of reach (it restarted,
    /// say: the session that lost its worker may have ended for that), for up to the worker
    /// wait. `None` if nobody holds the job, or the database did not answer.
    pub async fn holder_once_reachable(&self, job_id: &str, previous: &[String]) -> Option<JobHolder> {
        let until = tokio::time::Instant::now() + self.config.worker_wait;
        loop {
            match self.holder(job_id, previous).await {
                Ok(holder) => return holder,
                Err(HubError::Logs { source, .. })
                    if source.is_unavailable() && tokio::time::Instant::now() < until =>
                {
                    tokio::time::sleep(HELD_RECHECK).await;
                }
                Err(e) => {
                    tracing::warn!(job = job_id, error = %e, "cannot tell whether a worker holds the job");
                    return None;
                }
            }
        }
    }

    /// Waits for the result of the job `holder` holds, stored by whichever control plane the
    /// worker sends it to. Fails with [`HubError::WorkerLost`] once no worker holds the job
    /// and no result is stored: its worker did not come back within the worker wait.
    ///
    /// It looks four times a second: another control plane's commit wakes nothing here, and
    /// such a wait happens only to a step taken over while its job ran.
    pub async fn wait_held(&self, holder: &JobHolder) -> Result<v1::JobResult, HubError> {
        let Some(logs) = &self.logs else { return Err(HubError::NoLogStore) };
        let jobs = [holder.job.clone()];
        let logs_error = |source| HubError::Logs { job_id: holder.job.clone(), source };
        loop {
            let looked = async {
                if let Some(result) = read_result(logs, &holder.job).await? {
                    return Ok(Some(result));
                }
                if logs.holder(&jobs, self.config.worker_wait).await.map_err(logs_error)?.is_none() {
                    // The result may have been stored between the two reads.
                    return match read_result(logs, &holder.job).await? {
                        Some(result) => Ok(Some(result)),
                        None => Err(HubError::WorkerLost {
                            worker_id: holder.worker.clone(),
                            job_id: holder.job.clone(),
                        }),
                    };
                }
                Ok(None)
            };
            match looked.await {
                Ok(Some(result)) => return Ok(result),
                Ok(None) => {}
                // The database failed (it restarted, say): the job goes on meanwhile, and its
                // worker must not be given up for that, so the wait goes on too.
                Err(HubError::Logs { source, .. }) if source.is_unavailable() => {
                    tracing::warn!(job = %holder.job, "the shared store failed while waiting for a held job; waiting on");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(HELD_RECHECK).await;
        }
    }

    /// The result stored for `job_id`, if the job has finished.
    pub async fn stored_result(&self, job_id: &str) -> Result<Option<v1::JobResult>, HubError> {
        let Some(logs) = &self.logs else { return Err(HubError::NoLogStore) };
        read_result(logs, job_id).await
    }

    /// Asks `worker_id` to cancel `job_id`; its [`Hub::run_job`] then resolves with a cancelled
    /// result. A job the worker does not know is ignored by the worker.
    ///
    /// On a log store control planes share, the cancel is recorded there first: the control
    /// plane the worker's session is with, now or once it comes back to any of them, forwards
    /// it, so it reaches a worker whose session is not with this one. Fails with
    /// [`HubError::UnknownWorker`] only when neither way is open.
    pub async fn cancel_job(&self, worker_id: &str, job_id: &str, reason: &str) -> Result<(), HubError> {
        let recorded = match &self.logs {
            Some(logs) if logs.is_shared() => logs
                .request_cancel(job_id, reason)
                .await
                .map_err(|source| HubError::Logs { job_id: job_id.to_owned(), source })?,
            _ => false,
        };
        let commands = match self.session(worker_id) {
            Ok(commands) => commands,
            Err(_) if recorded => return Ok(()),
            Err(e) => return Err(e),
        };
        let cancel = SessionCommand::Cancel { job_id: job_id.to_owned(), reason: reason.to_owned() };
        match commands.send(cancel).await {
            Ok(()) => Ok(()),
            Err(_) if recorded => Ok(()),
            Err(_) => {
                Err(HubError::WorkerLost { worker_id: worker_id.to_owned(), job_id: job_id.to_owned() })
            }
        }
    }

    /// Tells `worker_id`'s session that the caller of [`Hub::run_job`] for `job_id` stopped
    /// waiting, and cancels the job on the worker when `cancel` gives a reason. Without one the
    /// job goes on, and a later `resume_job` can pick it up. Does not wait (for drop guards);
    /// a worker that is gone has nothing to cancel.
    pub fn abandon_job(&self, worker_id: &str, job_id: &str, cancel: Option<String>) {
        if let Some(commands) = self.registry.commands(worker_id) {
            let abandon = SessionCommand::Abandon { job_id: job_id.to_owned(), cancel };
            if commands.try_send(abandon).is_err() {
                tracing::warn!(worker = worker_id, job = job_id, "session busy or gone; abandon dropped");
            }
        }
    }

    /// The worker's session, waiting up to `wait` for it to connect.
    async fn session_within(
        &self,
        worker_id: &str,
        wait: Duration,
    ) -> Result<mpsc::Sender<SessionCommand>, HubError> {
        let mut workers = self.registry.workers.subscribe();
        let connected = tokio::time::timeout(wait, workers.wait_for(|w| w.contains_key(worker_id))).await;
        drop(connected);
        self.session(worker_id)
    }

    fn session(&self, worker_id: &str) -> Result<mpsc::Sender<SessionCommand>, HubError> {
        self.registry
            .commands(worker_id)
            .ok_or_else(|| HubError::UnknownWorker { worker_id: worker_id.to_owned() })
    }
}
