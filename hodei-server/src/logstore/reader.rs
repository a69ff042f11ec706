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
    // The marker stands for the dropped bytes, and a read past it continues after them. A cut
    // with nothing dropped past it (a stream file that grew past what its state file records)
    // has no offset after the marker: every read from the cut would get it again, and a
    // follower would never end. It shows no marker until bytes are dropped.
    if s.truncated && next_offset == s.stored && s.end > s.stored {
        let cut = Truncation { stream, at: s.stored, dropped: s.dropped(), final_count: status.closed };
        bytes.extend_from_slice(cut.marker().as_bytes());
        truncation = Some(cut);
        next_offset = s.end;
    } else if s.truncated && next_offset > s.stored {
        next_offset = next_offset.max(s.end);
    }
    LogChunk { offset: from, bytes, next_offset, truncation }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logstore::StreamStatus;

    /// Found by the `logstore_recovery` fuzz target: a state file whose cut (at 5, dropped up to
    /// 30) lies below a stream file of 2168 bytes left nothing dropped past the cut, and every
    /// read from there got the marker again, so the log's follower never ended.
    #[tokio::test]
    async fn a_cut_with_nothing_dropped_past_it_is_no_endless_marker() {
        let data = tempfile::tempdir().unwrap();
        let job = data.path().join("logs").join("job-a");
        std::fs::create_dir_all(&job).unwrap();
        std::fs::write(job.join("state"), "hodei-logstore-state 1\nclosed 1\nstdout 5 30\n").unwrap();
        std::fs::write(job.join("stdout.log"), vec![b'x'; 2168]).unwrap();
        let store = LogStore::open(data.path()).await.unwrap();

        let chunk = store.read("job-a", LogStream::Stdout, 0, usize::MAX).await.unwrap();
        assert_eq!((chunk.bytes.len(), chunk.next_offset, chunk.truncation), (2168, 2168, None));
        let after = store.read("job-a", LogStream::Stdout, 2168, usize::MAX).await.unwrap();
        assert!(after.bytes.is_empty());

        let mut follower = store.follow("job-a", LogStream::Stdout, 0).await.unwrap();
        let mut followed = Vec::new();
        while let Some(chunk) = follower.next().await {
            followed.extend_from_slice(&chunk.unwrap().bytes);
            assert!(followed.len() <= 2168, "the follower goes on past the log");
        }
        assert_eq!(followed, chunk.bytes);
    }

    #[test]
    fn the_marker_comes_once_where_bytes_were_dropped() {
        let cut = StreamStatus { end: 30, stored: 5, truncated: true, confirmed: 30 };
        let status = LogStatus { stdout: cut, closed: true, ..LogStatus::default() };
        let chunk = chunk_of(&status, LogStream::Stdout, 0, b"hello".to_vec());
        assert!(
            chunk.bytes.ends_with(b"25 further bytes dropped]\n"),
            "{:?}",
            String::from_utf8_lossy(&chunk.bytes)
        );
        assert_eq!(chunk.next_offset, 30);
        assert_eq!(chunk_of(&status, LogStream::Stdout, 30, Vec::new()).bytes, b"");
    }
}
