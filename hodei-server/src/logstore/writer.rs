//! Writing batches: overlaps compared and skipped, gaps refused, the cap applied.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use prost::bytes::Bytes;

use super::batch::{Batch, batch_end};
use super::disk::blocking;
use super::error::{LogStoreError, io_error};
use super::job::UnsyncedEntries;
use super::job::{Job, JobState};
use super::overlap::check_overlap;
use super::state_record::{Cut, write_state};
use super::status::Ack;
use super::store::LogStore;
use super::stream::LogStream;

impl LogStore {
    /// Appends a batch of `stream` that starts at stream offset `offset`, and makes the
    /// stream durable: [`LogStore::write`] and a sync of that stream in one call, under one lock.
    ///
    /// Bytes the stream already has are compared and skipped; a batch past the end is a
    /// [`LogStoreError::Gap`] (except past the cap, where the bytes are dropped anyway).
    pub async fn append(
        &self,
        job: &str,
        stream: LogStream,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Ack, LogStoreError> {
        #[cfg(feature = "postgres")]
        if self.shared.is_some() {
            self.write(job, stream, offset, Bytes::copy_from_slice(bytes)).await?;
            let status = self.sync(job).await?;
            let s = status.stream(stream);
            return Ok(Ack { offset: s.end, truncated: s.truncated });
        }
        let bytes = Bytes::copy_from_slice(bytes);
        let handle = self.job(job)?;
        let result = async {
            let mut state = handle.lock().await?;
            let mut result = self.write_locked(job, &handle, &mut state, stream, offset, &bytes).await;
            if result.is_ok() {
                result = self.sync_locked(&handle.dir, &mut state, stream).await;
            }
            handle.publish(&state);
            result.map(|()| state.stream_mut(stream).acknowledge())
        }
        .await;
        self.release_if_closed(job, &handle);
        result
    }

    /// Writes a batch of `stream` that starts at stream offset `offset`, without making it
    /// durable: nothing of it is acknowledged, nor seen by readers, before a
    /// [`LogStore::sync`] (or [`LogStore::append`], [`LogStore::close`]) covers it.
    ///
    /// The bytes are written as they are, without a copy. Overlaps and gaps are handled as by
    /// [`LogStore::append`].
    pub async fn write(
        &self,
        job: &str,
        stream: LogStream,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            if let Some(metrics) = self.metrics.get() {
                metrics.log_received(stream, bytes.len());
            }
            return shared.write(job, stream, offset, bytes);
        }
        let handle = self.job(job)?;
        let result = async {
            let mut state = handle.lock().await?;
            let result = self.write_locked(job, &handle, &mut state, stream, offset, &bytes).await;
            handle.publish(&state);
            result
        }
        .await;
        self.release_if_closed(job, &handle);
        result
    }

    async fn write_locked(
        &self,
        id: &str,
        handle: &Job,
        state: &mut JobState,
        stream: LogStream,
        offset: u64,
        bytes: &Bytes,
    ) -> Result<(), LogStoreError> {
        if let Some(metrics) = self.metrics.get() {
            metrics.log_received(stream, bytes.len());
        }
        if state.closed {
            return Err(LogStoreError::Closed { job: id.to_owned() });
        }
        let batch_end = batch_end(id, stream, offset, bytes.len())?;
        let file = state.open_writer(&handle.dir, stream).await?;
        let batch = Batch { job: id, stream, offset, end: batch_end, bytes };
        let result = self.write_batch(&handle.dir, state, &file, &batch).await;
        let s = state.stream_mut(stream);
        if let Err(LogStoreError::Io { .. }) = &result {
            // The file may hold part of a write: cut it back to what was written before, and
            // drop the writer so that the next append reconciles with the file whatever this
            // fails to cut.
            let stored = s.stored;
            let rolled_back = blocking(move || {
                if file.metadata()?.len() > stored {
                    file.set_len(stored)?;
                    file.sync_data()?;
                }
                Ok(())
            })
            .await;
            s.generation += 1;
            if let Err(error) = rolled_back {
                tracing::warn!(job = id, %stream, %error, "could not cut a failed append back");
            }
        } else {
            s.file = Some(file);
        }
        result
    }

    async fn write_batch(
        &self,
        dir: &Path,
        state: &mut JobState,
        file: &Arc<std::fs::File>,
        batch: &Batch<'_>,
    ) -> Result<(), LogStoreError> {
        let record = state.record();
        let path = dir.join(batch.stream.file_name());
        let s = state.stream_mut(batch.stream);
        if batch.offset > s.end && !s.truncated {
            return Err(LogStoreError::Gap {
                job: batch.job.to_owned(),
                stream: batch.stream,
                offset: batch.offset,
                expected: s.end,
            });
        }
        check_overlap(file, &path, s, batch).await?;
        if s.truncated {
            s.end = s.end.max(batch.end);
        } else if batch.end > s.end {
            let room = self.config.max_stream_bytes.saturating_sub(s.stored);
            let keep_end = batch.end.min(s.end.saturating_add(room));
            let kept = batch.range(s.end, keep_end);
            if !kept.is_empty() {
                let (file, at, len) = (Arc::clone(file), s.stored, kept.len() as u64);
                blocking(move || file.write_all_at(&kept, at)).await.map_err(io_error("writing", &path))?;
                s.stored += len;
                s.end = s.stored;
            }
            if keep_end < batch.end {
                // What is kept is durable before the cut is recorded: a crash after the record
                // must not leave a hole below the cut that the agent is told to skip.
                let synced = s.stored;
                let data = async {
                    let file = Arc::clone(file);
                    blocking(move || file.sync_data()).await.map_err(io_error("syncing", &path))
                };
                // The entries of a new file and directory too, which the stream's first sync
                // would otherwise have synced: rare enough to sync whether new or not.
                let entries = UnsyncedEntries::ALL.sync(dir, &self.logs_dir);
                tokio::try_join!(data, entries)?;
                s.mark_synced(synced);
                let cut = Cut { at: s.stored, end: batch.end };
                write_state(dir, &record.with_cut(batch.stream, Some(cut))).await?;
                tracing::warn!(
                    job = batch.job,
                    stream = %batch.stream,
                    at = s.stored,
                    "the log reached its cap; further output is counted and dropped"
                );
                s.truncated = true;
                s.end = batch.end;
            }
        }
        Ok(())
    }
}
