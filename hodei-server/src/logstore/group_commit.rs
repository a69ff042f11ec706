//! Making what was written durable, one fsync for every batch written meanwhile.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::disk::blocking;
use super::error::{LogStoreError, io_error};
use super::job::JobState;
use super::status::LogStatus;
use super::store::LogStore;
use super::stream::LogStream;

impl LogStore {
    /// Makes everything written to the job's log so far durable, and returns where its streams
    /// stand: each stream's `end` is the offset that may be acknowledged.
    ///
    /// The fsync runs without holding the job's lock, so writes go on meanwhile; they are left
    /// for the next sync. If an fsync fails, the stream is cut back to what was durable before
    /// (the kernel may have dropped the pages it failed to write), so that those bytes are
    /// written again, not trusted.
    pub async fn sync(&self, job: &str) -> Result<LogStatus, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.sync(job, self.metrics.get()).await;
        }
        let handle = self.job(job)?;
        let result = async {
            let mut due = Vec::new();
            {
                let mut state = handle.lock().await?;
                for stream in LogStream::ALL {
                    let s = state.stream_mut(stream);
                    if s.synced >= s.stored {
                        continue;
                    }
                    match &s.file {
                        Some(file) => due.push((stream, Arc::clone(file), s.stored, s.generation)),
                        // A failed write dropped the writer: reopening reconciles and syncs.
                        None => self.sync_locked(&handle.dir, &mut state, stream).await?,
                    }
                }
                handle.publish(&state);
            }
            for (stream, file, upto, generation) in due {
                let synced = self.fsync(&file).await;
                let mut state = handle.lock().await?;
                let s = state.stream_mut(stream);
                // A file cut or replaced meanwhile is not what this fsync covered.
                if s.generation == generation {
                    match synced {
                        Ok(()) => s.mark_synced(upto),
                        Err(error) => {
                            s.roll_back(&file).await;
                            return Err(io_error("syncing", &handle.dir.join(stream.file_name()))(error));
                        }
                    }
                }
                handle.publish(&state);
            }
            Ok(handle.lock().await?.status())
        }
        .await;
        self.release_if_closed(job, &handle);
        result
    }
}

impl LogStore {
    /// Makes what `stream` has written durable, holding the job's lock: for appends and the
    /// close.
    pub(super) async fn sync_locked(
        &self,
        dir: &Path,
        state: &mut JobState,
        stream: LogStream,
    ) -> Result<(), LogStoreError> {
        let s = state.stream_mut(stream);
        if s.synced >= s.stored {
            return Ok(());
        }
        // Opening a writer syncs the file, so a stream without one is durable once it has one.
        let reopened = s.file.is_none();
        let file = state.open_writer(dir, &self.logs_dir, stream).await?;
        let s = state.stream_mut(stream);
        if !reopened && let Err(error) = self.fsync(&file).await {
            s.roll_back(&file).await;
            return Err(io_error("syncing", &dir.join(stream.file_name()))(error));
        }
        s.mark_synced(s.stored);
        s.file = Some(file);
        Ok(())
    }

    /// One fsync of a log file's data, timed for the metrics.
    async fn fsync(&self, file: &Arc<File>) -> std::io::Result<()> {
        let began = Instant::now();
        let synced = blocking({
            let file = Arc::clone(file);
            move || file.sync_data()
        })
        .await;
        if let Some(metrics) = self.metrics.get() {
            metrics.log_fsynced(began.elapsed());
        }
        synced
    }
}
