//! The store itself: opening it on its directory, and the jobs it holds in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as SyncMutex, OnceLock, PoisonError};

use tokio::fs;

use super::config::LogStoreConfig;
use super::dir_lock::lock_dir;
use super::disk::sync_dir;
use super::error::{LogStoreError, io_error};
use super::job::{Job, JobState};
use super::job_id::encode_job_id;
use super::status::LogStatus;
use crate::metrics::Metrics;

/// The store of every job's logs. One per directory: it holds a lock on `<data_dir>/logs`.
#[derive(Debug)]
pub struct LogStore {
    pub(super) logs_dir: PathBuf,
    pub(super) config: LogStoreConfig,
    /// Jobs with an open log, and closed ones while an operation is on them; closed jobs are
    /// dropped from here so that they hold no file handles.
    pub(super) jobs: SyncMutex<HashMap<String, Arc<Job>>>,
    /// Set once, by [`LogStore::record_metrics`]; the store is shared by then.
    pub(super) metrics: OnceLock<Metrics>,
    /// Set when the logs live in the database that control planes share: every call goes
    /// there, and the directory is only locked.
    #[cfg(feature = "postgres")]
    pub(super) shared: Option<Arc<super::shared::SharedLogs>>,
    /// How many of the next fsyncs of log files fail, as a disk reporting a write error would:
    /// the seam of the tests that check a failed fsync is never taken for success.
    #[cfg(test)]
    pub(super) failing_fsyncs: std::sync::atomic::AtomicU32,
    _lock: std::fs::File,
}

impl LogStore {
    /// Opens (or creates) the store under `<data_dir>/logs` with the default configuration.
    pub async fn open(data_dir: impl AsRef<Path>) -> Result<Self, LogStoreError> {
        Self::open_with_config(data_dir, LogStoreConfig::default()).await
    }

    /// Opens (or creates) the store under `<data_dir>/logs`.
    ///
    /// Fails with [`LogStoreError::Locked`] if another store has that directory open.
    pub async fn open_with_config(
        data_dir: impl AsRef<Path>,
        config: LogStoreConfig,
    ) -> Result<Self, LogStoreError> {
        let data_dir = data_dir.as_ref();
        let logs_dir = data_dir.join("logs");
        let existed = fs::try_exists(&logs_dir).await.map_err(io_error("looking for", &logs_dir))?;
        if !existed {
            fs::create_dir_all(&logs_dir).await.map_err(io_error("creating", &logs_dir))?;
            sync_dir(data_dir).await?;
        }
        let lock = lock_dir(logs_dir.clone()).await?;
        Ok(Self {
            logs_dir,
            config,
            jobs: SyncMutex::default(),
            metrics: OnceLock::new(),
            #[cfg(feature = "postgres")]
            shared: None,
            #[cfg(test)]
            failing_fsyncs: std::sync::atomic::AtomicU32::new(0),
            _lock: lock,
        })
    }

    /// Opens the store of control planes that share `store`'s database: every job's log and
    /// result is kept there (see the module `shared`), so that each of them reads what any of
    /// them received. `<data_dir>/logs` is still locked, as one control plane's directory.
    #[cfg(feature = "postgres")]
    pub async fn open_shared(
        data_dir: impl AsRef<Path>,
        config: LogStoreConfig,
        store: Arc<hodei_core::PostgresStore>,
    ) -> Result<Self, LogStoreError> {
        let shared = super::shared::SharedLogs::new(store, config.max_stream_bytes);
        // Sessions of an earlier run of this control plane (a restart under the same engine
        // id, whose lease would make them look live) ended with it.
        shared.detach_all().await?;
        let mut logs = Self::open_with_config(data_dir, config).await?;
        logs.shared = Some(Arc::new(shared));
        Ok(logs)
    }

    /// Counts the bytes of the batches written to it, and times its fsyncs, in `metrics`. Only
    /// the first call counts.
    pub fn record_metrics(&self, metrics: Metrics) {
        let _ = self.metrics.set(metrics);
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &LogStoreConfig {
        &self.config
    }

    /// Where the job's log stands. A job without any log reads as empty and open.
    pub async fn status(&self, job: &str) -> Result<LogStatus, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.status(job).await;
        }
        Ok(self.current(job).await?.1)
    }

    pub(super) fn job(&self, id: &str) -> Result<Arc<Job>, LogStoreError> {
        let dir = self.logs_dir.join(encode_job_id(id)?);
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Arc::clone(jobs.entry(id.to_owned()).or_insert_with(|| Arc::new(Job::new(dir)))))
    }

    pub(super) fn release_if_closed(&self, id: &str, handle: &Arc<Job>) {
        if handle.status.borrow().closed {
            let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            if jobs.get(id).is_some_and(|j| Arc::ptr_eq(j, handle)) {
                jobs.remove(id);
            }
        }
    }

    /// The job's directory and status, without keeping a job that is not in memory there.
    pub(super) async fn current(&self, id: &str) -> Result<(PathBuf, LogStatus), LogStoreError> {
        let dir = self.logs_dir.join(encode_job_id(id)?);
        let cached = self.jobs.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned();
        let status = match cached {
            Some(handle) => handle.lock().await?.status(),
            None => JobState::load(&dir).await?.status(),
        };
        Ok((dir, status))
    }
}
