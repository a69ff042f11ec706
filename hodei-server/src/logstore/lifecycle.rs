//! A job log's life: begun, then closed, or finished with a stored result.

use std::io;

use tokio::fs;

use super::disk::{commit_files, stage_files};
use super::error::{LogStoreError, io_error};
use super::job_id::encode_job_id;
use super::state_record::{STATE_FILE, StateRecord, write_state};
use super::store::LogStore;
use super::stream::LogStream;

const RESULT_FILE: &str = "result";
/// The first byte of the result file: the format of what follows.
const RESULT_FORMAT: u8 = 1;

impl LogStore {
    /// Records that the job started: from now on it has a log, empty until it writes, so a job
    /// that never writes is listed too and its end can be recorded.
    pub async fn begin(&self, job: &str) -> Result<(), LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.begin(job).await;
        }
        let handle = self.job(job)?;
        let result = async { handle.lock().await?.ensure_dir(&handle.dir).await }.await;
        self.release_if_closed(job, &handle);
        result
    }

    /// Closes the job's log: appends are refused from now on and followers reach the end.
    /// Closing a closed log does nothing.
    pub async fn close(&self, job: &str) -> Result<(), LogStoreError> {
        self.close_with(job, None).await
    }

    /// Stores the job's result (opaque bytes; the hub keeps the encoded wire result) and closes
    /// its log. The result is durable before this returns, so the hub acknowledges it to the
    /// agent only once it can no longer be lost, and a step that asks again after a restart
    /// finds it. A second result replaces the first.
    pub async fn finish(&self, job: &str, result: &[u8]) -> Result<(), LogStoreError> {
        self.close_with(job, Some(result)).await
    }

    /// The result stored by [`LogStore::finish`], if any.
    pub async fn result(&self, job: &str) -> Result<Option<Vec<u8>>, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.result(job).await;
        }
        let path = self.logs_dir.join(encode_job_id(job)?).join(RESULT_FILE);
        match fs::read(&path).await {
            Ok(bytes) => match bytes.split_first() {
                Some((&RESULT_FORMAT, body)) => Ok(Some(body.to_vec())),
                Some((format, _)) => Err(LogStoreError::CorruptState {
                    path,
                    reason: format!("unknown result format {format}"),
                }),
                None => Err(LogStoreError::CorruptState { path, reason: "empty result file".to_owned() }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading", &path)(e)),
        }
    }

    async fn close_with(&self, job: &str, result: Option<&[u8]>) -> Result<(), LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.close(job, result, self.metrics.get()).await;
        }
        let handle = self.job(job)?;
        let outcome = async {
            let mut state = handle.lock().await?;
            // A job without output still gets its directory, so that its end is recorded.
            state.ensure_dir(&handle.dir).await?;
            let mut records: Vec<(&str, Vec<u8>)> = Vec::new();
            if let Some(result) = result {
                let mut record = Vec::with_capacity(result.len() + 1);
                record.push(RESULT_FORMAT);
                record.extend_from_slice(result);
                records.push((RESULT_FILE, record));
            }
            let closed = StateRecord { closed: true, ..state.record() };
            if !state.closed {
                records.push((STATE_FILE, closed.encode().into_bytes()));
            }
            // The log is complete before its end or result is recorded: its syncs and the
            // staging of the records run at once, and the records are renamed into place after.
            let logs = async {
                for stream in LogStream::ALL {
                    self.sync_locked(&handle.dir, &mut state, stream).await?;
                }
                // A job without output: its directory's entry.
                state.sync_entries(&handle.dir, &self.logs_dir).await
            };
            let staged: Vec<(&str, &[u8])> =
                records.iter().map(|(name, bytes)| (*name, &bytes[..])).collect();
            tokio::try_join!(logs, stage_files(&handle.dir, &staged))?;
            let names: Vec<&str> = records.iter().map(|(name, _)| *name).collect();
            if !names.is_empty() {
                commit_files(&handle.dir, &names).await?;
            }
            if state.closed {
                return Ok(());
            }
            // Reopening a writer reconciles a stream with its file, which may move the cut the
            // staged record holds.
            let record = StateRecord { closed: true, ..state.record() };
            if record != closed {
                write_state(&handle.dir, &record).await?;
            }
            state.closed = true;
            for stream in LogStream::ALL {
                state.stream_mut(stream).file = None;
            }
            handle.publish(&state);
            Ok(())
        }
        .await;
        self.release_if_closed(job, &handle);
        outcome
    }
}
