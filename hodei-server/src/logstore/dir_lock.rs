//! The lock that keeps one store per directory.

use std::io;
use std::path::PathBuf;

use super::error::{LogStoreError, io_error};

pub(super) const LOCK_FILE: &str = ".lock";

pub(super) async fn lock_dir(logs_dir: PathBuf) -> Result<std::fs::File, LogStoreError> {
    let path = logs_dir.join(LOCK_FILE);
    let join_path = path.clone();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(LogStoreError::Locked { path: logs_dir }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_error("locking", &path)(e)),
        }
    })
    .await
    .map_err(|e| io_error("locking", &join_path)(io::Error::other(e)))?
}
