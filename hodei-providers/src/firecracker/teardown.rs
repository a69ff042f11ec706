//! Tearing a worker down: stopping its VMM, gently and then for sure, and removing its socket,
//! TAP, jail and state directory.

use std::time::Duration;

use tokio::process::Child;

use super::errors::infra;
use super::state_dir::{WorkerRecord, remove_dir_if_present, remove_if_present};
use super::tap::run_ip;
use super::{Action, FirecrackerClient, FirecrackerProvider, TapDevice};
use crate::provider::ProviderError;

/// How long a SIGKILLed VMM may take to be gone before tearing down reports it stuck.
const KILLED_VMM_EXIT_LIMIT: Duration = Duration::from_secs(30);

impl FirecrackerProvider {
    /// Stops the worker's VMM (Ctrl-Alt-Del, then SIGKILL after `shutdown_timeout`) and removes
    /// its socket, TAP, jail and state directory. Safe on a half-provisioned worker.
    pub(super) async fn tear_down(
        &self,
        record: &WorkerRecord,
        mut child: Option<Child>,
    ) -> Result<(), ProviderError> {
        if let Some(vmm) = self.running_vmm(record) {
            // A guest that was never started, or has no i8042 driver, ignores this: the
            // deadline below is the fallback.
            let asked = match FirecrackerClient::connect(&record.api_socket).await {
                Ok(client) => client.action(Action::SendCtrlAltDel).await.is_ok(),
                Err(_) => false,
            };
            let exited = asked && vmm.wait_exit(self.config.shutdown_timeout).await.unwrap_or(false);
            if !exited {
                vmm.kill().map_err(|e| infra(format!("cannot kill the VMM (pid {}): {e}", vmm.pid())))?;
                // Not the guest's shutdown deadline: SIGKILL cannot be ignored, so only a stuck
                // kernel (a process in uninterruptible sleep) or a busy machine delays this.
                if !vmm.wait_exit(KILLED_VMM_EXIT_LIMIT).await.unwrap_or(false) {
                    return Err(infra(format!(
                        "the VMM (pid {}) survived SIGKILL for {KILLED_VMM_EXIT_LIMIT:?}",
                        vmm.pid()
                    )));
                }
            }
        } else if let Some(child) = child.as_mut() {
            // Spawned, but its pid file or command line is not there yet: kill it directly.
            let _ = child.start_kill();
        }
        if let Some(mut child) = child {
            let _ = child.wait().await;
        }
        remove_if_present(&record.api_socket)?;
        if record.tap_created
            && let TapDevice::Create { ip_binary, .. } = &self.config.tap
        {
            run_ip(ip_binary, &["link", "del", "dev", &record.tap_name]).await?;
        }
        if let Some(jail) = &record.jail_dir {
            remove_dir_if_present(jail)?;
        }
        remove_dir_if_present(&self.worker_dir(&record.worker_id))
    }
}
