//! Making what was written durable, one fsync for every batch written meanwhile.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
#[cfg(test)]
use std::sync::atomic::Ordering;
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
            let entries;
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
                entries = state.unsynced_entries();
                handle.publish(&state);
            }
            // The data and the entries of new files and directories, synced at once.
            let data = async {
                let mut fsynced = Vec::with_capacity(due.len());
                for (stream, file, upto, generation) in due {
                    let synced = self.fsync(&file).await;
                    fsynced.push((stream, file, upto, generation, synced));
                }
                fsynced
            };
            let (entries_synced, fsynced) = tokio::join!(entries.0.sync(&handle.dir, &self.logs_dir), data);
            let mut state = handle.lock().await?;
            for (stream, file, upto, generation, synced) in fsynced {
                let s = state.stream_mut(stream);
                // A file cut or replaced meanwhile is not what this fsync covered.
                if s.generation == generation {
                    match synced {
                        Ok(()) => s.mark_synced(upto),
                        Err(error) => {
                            s.roll_back(&file).await;
                            handle.publish(&state);
                            return Err(io_error("syncing", &handle.dir.join(stream.file_name()))(error));
                        }
                    }
                }
            }
            handle.publish(&state);
            // Data the entries failed under stays unacknowledged; the flags stay set for the
            // next sync, which syncs them again before it acknowledges anything.
            entries_synced?;
            state.entries_synced(entries.1);
            Ok(state.acknowledge())
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
            // What is synced may still rest on entries a failed sync left (nothing when none).
            return state.sync_entries(dir, &self.logs_dir).await;
        }
        // Opening a writer syncs the file, so a stream without one is durable once it has one.
        let reopened = s.file.is_none();
        let file = state.open_writer(dir, stream).await?;
        let data = async { if reopened { Ok(()) } else { self.fsync(&file).await } };
        let (synced, entries) = tokio::join!(data, state.sync_entries(dir, &self.logs_dir));
        let s = state.stream_mut(stream);
        if let Err(error) = synced {
            s.roll_back(&file).await;
            return Err(io_error("syncing", &dir.join(stream.file_name()))(error));
        }
        s.file = Some(file);
        entries?;
        s.mark_synced(s.stored);
        Ok(())
    }

    /// One fsync of a log file's data, timed for the metrics.
    async fn fsync(&self, file: &Arc<File>) -> std::io::Result<()> {
        #[cfg(test)]
        if self.failing_fsyncs.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
        {
            // EIO, as Linux reports a writeback that failed.
            return Err(std::io::Error::from_raw_os_error(5));
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    const JOB: &str = "saga-1/build";
    const OUT: LogStream = LogStream::Stdout;

    async fn read(store: &LogStore) -> Vec<u8> {
        store.read(JOB, OUT, 0, 1 << 20).await.unwrap().bytes
    }

    fn assert_failed_fsync(error: &LogStoreError) {
        let LogStoreError::Io { operation: "syncing", source, .. } = error else { panic!("{error:?}") };
        assert_eq!(source.raw_os_error(), Some(5), "{error:?}");
    }

    /// A failed fsync is never taken for success: what it was to cover is not acknowledged,
    /// not read, and cut from the file, and the agent's resend from the acknowledged offset
    /// stores it once the disk syncs again.
    #[tokio::test]
    async fn a_failed_fsync_acknowledges_nothing_it_covered() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(store.append(JOB, OUT, 0, b"first\n").await.unwrap().offset, 6);

        // The group commit's sync.
        store.write(JOB, OUT, 6, b"second\n".as_slice().into()).await.unwrap();
        store.failing_fsyncs.store(1, Ordering::Release);
        assert_failed_fsync(&store.sync(JOB).await.unwrap_err());
        assert_eq!(store.status(JOB).await.unwrap().stdout.end, 6);
        assert_eq!(read(&store).await, b"first\n");
        let file = dir.path().join("logs/saga-1%2Fbuild/stdout.log");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 6);

        // An append's own sync.
        store.failing_fsyncs.store(1, Ordering::Release);
        assert_failed_fsync(&store.append(JOB, OUT, 6, b"second\n").await.unwrap_err());
        assert_eq!(store.status(JOB).await.unwrap().stdout.end, 6);
        assert_eq!(read(&store).await, b"first\n");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 6);

        // The resend, once fsyncs succeed again.
        assert_eq!(store.append(JOB, OUT, 6, b"second\n").await.unwrap().offset, 13);
        assert_eq!(read(&store).await, b"first\nsecond\n");
        drop(store);
        let store = LogStore::open(dir.path()).await.unwrap();
        assert_eq!(read(&store).await, b"first\nsecond\n");
    }
}
