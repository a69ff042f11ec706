//! Reading stored bytes of one stream, with the marker where it was cut.

use std::path::PathBuf;
use std::sync::Arc;

use super::disk::{blocking, read_at};
use super::error::{LogStoreError, io_error};
use super::status::LogStatus;
use super::store::LogStore;
use super::stream::LogStream;
use super::truncation::Truncation;

/// Bytes read from one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The stream offset of the first byte.
    pub offset: u64,
    /// The stored bytes, followed by the truncation marker when `truncation` is set.
    pub bytes: Vec<u8>,
    /// Where the next read continues.
    pub next_offset: u64,
    /// Set when this chunk reached the cut: `bytes` ends with its marker.
    pub truncation: Option<Truncation>,
}

impl LogStore {
    /// Reads up to `max_len` stored bytes of `stream` from `from_offset`.
    ///
    /// A read that reaches the cut of a truncated stream gets the marker appended (so it may
    /// be a little longer than `max_len`) and continues after the dropped bytes.
    pub async fn read(
        &self,
        job: &str,
        stream: LogStream,
        from_offset: u64,
        max_len: usize,
    ) -> Result<LogChunk, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            return shared.read(job, stream, from_offset, max_len).await;
        }
        let (dir, status) = self.current(job).await?;
        let mut reader = StreamReader { path: dir.join(stream.file_name()), file: None };
        reader.read(&status, stream, from_offset, max_len).await
    }
}

/// Reads one stream's file for [`LogStore::read`] and followers.
#[derive(Debug)]
pub(super) struct StreamReader {
    pub(super) path: PathBuf,
    pub(super) file: Option<Arc<std::fs::File>>,
}

impl StreamReader {
    pub(super) async fn read(
        &mut self,
        status: &LogStatus,
        stream: LogStream,
        from: u64,
        max_len: usize,
    ) -> Result<LogChunk, LogStoreError> {
        let s = status.stream(stream);
        let len = s.stored.saturating_sub(from).min(u64::try_from(max_len).unwrap_or(u64::MAX));
        let mut bytes = Vec::new();
        if len > 0 {
            let file = match &mut self.file {
                Some(file) => file,
                None => {
                    let path = self.path.clone();
                    let file = blocking(move || std::fs::File::open(path))
                        .await
                        .map_err(io_error("opening", &self.path))?;
                    self.file.insert(Arc::new(file))
                }
            };
            bytes = read_at(file, from, len).await.map_err(io_error("reading", &self.path))?;
        }
        Ok(chunk_of(status, stream, from, bytes))
    }
}

/// The chunk of `bytes` read from `from`, with the marker appended where they reach the cut.
pub(super) fn chunk_of(status: &LogStatus, stream: LogStream, from: u64, mut bytes: Vec<u8>) -> LogChunk {
    let s = status.stream(stream);
    let mut next_offset = from + bytes.len() as u64;
    let mut truncation = None;
    if s.truncated && next_offset == s.stored {
        let cut = Truncation { stream, at: s.stored, dropped: s.dropped(), final_count: status.closed };
        bytes.extend_from_slice(cut.marker().as_bytes());
        truncation = Some(cut);
        next_offset = s.end;
    } else if s.truncated && next_offset > s.stored {
        next_offset = next_offset.max(s.end);
    }
    LogChunk { offset: from, bytes, next_offset, truncation }
}
