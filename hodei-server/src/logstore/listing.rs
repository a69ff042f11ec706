//! Which jobs have a log on disk.

use tokio::fs;

use super::dir_lock::LOCK_FILE;
use super::error::{LogStoreError, io_error};
use super::job_id::{decode_job_name, encode_job_id};
use super::store::LogStore;

impl LogStore {
    /// Whether the job has a log (or a result) at all.
    pub async fn exists(&self, job: &str) -> Result<bool, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.exists(job).await;
        }
        let dir = self.logs_dir.join(encode_job_id(job)?);
        fs::try_exists(&dir).await.map_err(io_error("looking for", &dir))
    }

    /// The ids of every job with a log on disk, sorted.
    pub async fn jobs(&self) -> Result<Vec<String>, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.jobs().await;
        }
        let mut entries = fs::read_dir(&self.logs_dir).await.map_err(io_error("listing", &self.logs_dir))?;
        let mut ids = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_error("listing", &self.logs_dir))? {
            let name = entry.file_name();
            match name.to_str().and_then(decode_job_name) {
                Some(id) => ids.push(id),
                None if name == LOCK_FILE => {}
                None => {
                    tracing::warn!(name = ?name, "ignoring a file in the log directory that names no job")
                }
            }
        }
        ids.sort();
        Ok(ids)
    }
}
