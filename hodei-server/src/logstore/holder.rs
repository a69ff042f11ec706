//! Which worker holds a job whose result is not stored yet, as control planes that share a
//! database see it: the job's step may run again on any of them (its saga was taken over),
//! and must then wait for the job that goes on rather than run it a second time.
//!
//! A control plane alone needs none of this: its own sessions and scheduler know every worker
//! it has, so on the file store these calls record nothing and find nothing.

use std::time::Duration;

use super::error::LogStoreError;
use super::store::LogStore;

/// A worker holding a job whose result is not stored, on a session with a live control plane
/// or between sessions for less than the hub's worker wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobHolder {
    /// The job it holds.
    pub job: String,
    /// The worker.
    pub worker: String,
    /// The control plane its session is with; `None` between sessions.
    pub member: Option<String>,
}

impl LogStore {
    /// Records that `worker` holds `job`, on `session` (a number this control plane gives each
    /// of its sessions): before the job is assigned, and for each job an agent lists when its
    /// session opens.
    pub async fn attach(&self, job: &str, worker: &str, session: u64) -> Result<(), LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.attach(job, worker, session).await;
        }
        let _ = (job, worker, session);
        Ok(())
    }

    /// [`LogStore::begin`]s the job's log and [`LogStore::attach`]es it to `worker`'s
    /// `session`, before the job is assigned: on a shared store, in one statement.
    pub async fn begin_on(&self, job: &str, worker: &str, session: u64) -> Result<(), LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            // Recording the holder creates the job's row, which is all `begin` does there.
            return shared.attach(job, worker, session).await;
        }
        let _ = (worker, session);
        self.begin(job).await
    }

    /// Records that `worker`'s `session` with this control plane ended while it held `jobs`:
    /// it may open the next one with any of them. A job attached since by a later session
    /// stays attached.
    pub async fn detach(&self, worker: &str, jobs: &[String], session: u64) -> Result<(), LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.detach(worker, jobs, session).await;
        }
        let _ = (worker, jobs, session);
        Ok(())
    }

    /// The worker `job` was handed to, as a store that control planes share records it: a
    /// `Hello` that claims the job for another worker is refused by whichever control plane it
    /// reaches. `None` on a store of this control plane alone, whose hub knows its own hand-outs,
    /// and for a job never handed out.
    pub async fn handed_to(&self, job: &str) -> Result<Option<String>, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.handed_to(job).await;
        }
        let _ = job;
        Ok(None)
    }

    /// Records that `worker` holds only `jobs` (what its agent lists when a session opens):
    /// a job assigned to it on a session that ended before the agent received it is held by
    /// nobody, and a step waiting for it runs it anew without waiting for the worker wait.
    pub async fn holds_only(&self, worker: &str, jobs: &[String]) -> Result<(), LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.holds_only(worker, jobs).await;
        }
        let _ = (worker, jobs);
        Ok(())
    }

    /// The worker holding the first of `jobs` (newest attempt first) whose result is not
    /// stored: attached to a control plane whose lease is live, or was less than `wait` ago
    /// (its session ended, or its control plane died, within `wait`; the agent redials).
    pub async fn holder(&self, jobs: &[String], wait: Duration) -> Result<Option<JobHolder>, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.holder(jobs, wait).await;
        }
        let _ = (jobs, wait);
        Ok(None)
    }

    /// Whether `worker` holds a job whose result is not stored, on a session with any control
    /// plane sharing the store (or between sessions for less than `wait`). The scheduler keeps
    /// an adopted worker that does, whichever saga the job is for, rather than destroy it under
    /// the job. Always false on a store of this control plane alone, whose own sessions tell.
    pub async fn holds_any(&self, worker: &str, wait: Duration) -> Result<bool, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.holds_any(worker, wait).await;
        }
        let _ = (worker, wait);
        Ok(false)
    }

    /// Asks for `job` to be cancelled with `reason`, for whichever control plane its worker's
    /// session is with, now or next, to forward ([`LogStore::cancels`]). The first reason
    /// stays. Returns whether the request was recorded: false on a store of this control plane
    /// alone (its own session is the only way to the worker), or once the job has a result.
    pub async fn request_cancel(&self, job: &str, reason: &str) -> Result<bool, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.request_cancel(job, reason).await;
        }
        let _ = (job, reason);
        Ok(false)
    }

    /// The cancels asked for any of `jobs` (those this control plane's sessions run): each
    /// job with its reason.
    pub async fn cancels(&self, jobs: &[String]) -> Result<Vec<(String, String)>, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.cancels(jobs).await;
        }
        let _ = jobs;
        Ok(Vec::new())
    }

    /// Whether control planes share this store (a database), rather than it being this one's.
    pub fn is_shared(&self) -> bool {
        #[cfg(feature = "postgres")]
        return self.shared.is_some();
        #[cfg(not(feature = "postgres"))]
        false
    }
}
