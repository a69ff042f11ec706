//! A worker's state directory, `<state_dir>/<worker_id>/`: its record, pid file, API socket and
//! console log, which let a later run find and tear down the worker without this process.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::FirecrackerProvider;
use super::errors::{infra, invalid};
use crate::provider::ProviderError;

const RECORD_FILE: &str = "worker.json";
pub(super) const PID_FILE: &str = "firecracker.pid";
pub(super) const SOCKET_FILE: &str = "api.socket";
pub(super) const CONSOLE_FILE: &str = "console.log";
/// The most of a worker's console that [`Provider::output`](crate::Provider::output) returns.
const OUTPUT_TAIL_BYTES: u64 = 64 * 1024;
/// `sun_path` holds 108 bytes, NUL included.
pub(super) const MAX_SOCKET_PATH: usize = 107;

/// What `worker.json` holds: enough to find, list and tear down a worker without this
/// process's memory of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct WorkerRecord {
    pub(super) worker_id: String,
    pub(super) labels: BTreeMap<String, String>,
    /// The API socket as seen from the host.
    pub(super) api_socket: PathBuf,
    /// The `--api-sock` value on the VMM's command line (inside the chroot under the jailer).
    pub(super) api_sock_arg: String,
    /// The TAP, and whether Hodei created it (and so deletes it).
    pub(super) tap_name: String,
    pub(super) tap_created: bool,
    /// The jail's directory, removed with the worker.
    pub(super) jail_dir: Option<PathBuf>,
}

impl FirecrackerProvider {
    pub(super) fn worker_dir(&self, worker_id: &str) -> PathBuf {
        self.config.state_dir.join(worker_id)
    }

    pub(super) fn read_record(&self, worker_id: &str) -> Option<WorkerRecord> {
        let bytes = std::fs::read(self.worker_dir(worker_id).join(RECORD_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub(super) fn console_tail(&self, worker_id: &str) -> String {
        let path = self.worker_dir(worker_id).join(CONSOLE_FILE);
        let Ok(mut file) = std::fs::File::open(path) else { return String::new() };
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(OUTPUT_TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Worker ids become directory names, jailer ids and parts of TAP names.
pub(super) fn validate_worker_id(worker_id: &str) -> Result<(), ProviderError> {
    let valid = !worker_id.is_empty()
        && worker_id.len() <= 64
        && !worker_id.starts_with(['.', '-'])
        && worker_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "worker id `{worker_id}` must be 1 to 64 of [A-Za-z0-9._-], not starting with `.` or `-`"
        )))
    }
}

pub(super) fn create_private_dir(dir: &Path) -> Result<(), ProviderError> {
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(infra(format!("cannot create {}: {e}", dir.display()))),
    }
    let metadata = std::fs::metadata(dir).map_err(|e| infra(format!("{}: {e}", dir.display())))?;
    // The sockets in here accept the registration token: nobody else may reach them.
    if metadata.uid() != rustix::process::getuid().as_raw() || metadata.mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "the state directory {} must be owned by this user with mode 0700",
            dir.display()
        )));
    }
    Ok(())
}

pub(super) fn write_record(dir: &Path, record: &WorkerRecord) -> Result<(), ProviderError> {
    let json = serde_json::to_vec_pretty(record).map_err(|e| infra(format!("worker record: {e}")))?;
    std::fs::write(dir.join(RECORD_FILE), json).map_err(|e| infra(format!("worker record: {e}")))
}

pub(super) fn remove_if_present(path: &Path) -> Result<(), ProviderError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(infra(format!("cannot remove {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

pub(super) fn remove_dir_if_present(path: &Path) -> Result<(), ProviderError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(infra(format!("cannot remove {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_that_are_not_path_safe_are_refused() {
        for bad in ["", "../x", ".hidden", "a/b", "-flag", "sp ace"] {
            assert!(matches!(validate_worker_id(bad), Err(ProviderError::InvalidSpec { .. })), "{bad:?}");
        }
        validate_worker_id("build-42_a.b").expect("a path-safe id");
    }
}
