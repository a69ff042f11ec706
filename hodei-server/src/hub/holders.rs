//! Which worker each running job was handed to, across that worker's sessions: so that a
//! worker's `Hello` cannot claim a job handed to another one, connected or not.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Job id to worker id, from the job's assignment until its result is stored or a later
/// attempt replaces it. Only the hub's callers add to it, so no worker can grow it.
#[derive(Debug, Default)]
pub(super) struct Holders(Mutex<HashMap<String, String>>);

impl Holders {
    /// Held only for one insert, remove or lookup, which cannot panic midway.
    fn map(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn hand(&self, job_id: &str, worker_id: &str) {
        self.map().insert(job_id.to_owned(), worker_id.to_owned());
    }

    pub(super) fn release(&self, job_id: &str) {
        self.map().remove(job_id);
    }

    /// The worker other than `worker_id` that `job_id` was handed to, if any.
    pub(super) fn other_than(&self, job_id: &str, worker_id: &str) -> Option<String> {
        self.map().get(job_id).filter(|holder| *holder != worker_id).cloned()
    }
}
