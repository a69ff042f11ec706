//! Whether a worker's VMM runs: a child this process spawned is asked directly, one a previous
//! run left behind is found by its pid file and command line; and reaping those orphans.

use super::FirecrackerProvider;
use super::process::{self, VmmProcess};
use super::state_dir::{PID_FILE, WorkerRecord};
use crate::provider::{Provider, ProviderError, WorkerState};

impl FirecrackerProvider {
    /// Destroys every worker in the state directory that this provider did not start (those a
    /// previous run left behind) and returns their ids.
    pub async fn reap_orphans(&self) -> Result<Vec<String>, ProviderError> {
        let mut reaped = Vec::new();
        for worker in self.list().await? {
            if !self.children.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&worker.worker_id) {
                self.destroy(&worker.worker_id).await?;
                reaped.push(worker.worker_id);
            }
        }
        Ok(reaped)
    }

    /// The worker's VMM, if it still runs.
    pub(super) fn running_vmm(&self, record: &WorkerRecord) -> Option<VmmProcess> {
        let pid = process::read_pid_file(&self.worker_dir(&record.worker_id).join(PID_FILE))?;
        let mut markers = vec![record.api_sock_arg.as_str()];
        if record.jail_dir.is_some() {
            markers.push(&record.worker_id);
        }
        VmmProcess::open_if_ours(pid, &markers)
    }

    pub(super) fn worker_state(&self, record: &WorkerRecord) -> WorkerState {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = children.get_mut(&record.worker_id) {
            return match child.try_wait() {
                Ok(None) => WorkerState::Running,
                Ok(Some(status)) => {
                    WorkerState::Exited { code: status.code(), reason: Some(status.to_string()) }
                }
                Err(e) => WorkerState::Exited { code: None, reason: Some(e.to_string()) },
            };
        }
        drop(children);
        match self.running_vmm(record) {
            Some(_) => WorkerState::Running,
            None => WorkerState::Exited { code: None, reason: Some("the VMM is not running".to_owned()) },
        }
    }
}
