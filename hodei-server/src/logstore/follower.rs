//! Following one stream live: stored bytes first, then new ones as they are acknowledged.

use tokio::sync::watch;

use super::error::LogStoreError;
use super::reader::{LogChunk, StreamReader};
use super::status::LogStatus;
use super::store::LogStore;
use super::stream::LogStream;

/// How much a follower reads from disk for one chunk.
pub(super) const FOLLOW_CHUNK: usize = 64 * 1024;

impl LogStore {
    /// Follows `stream` from `from_offset`: first the stored bytes, then new ones as they are
    /// appended, until the log is closed.
    pub async fn follow(
        &self,
        job: &str,
        stream: LogStream,
        from_offset: u64,
    ) -> Result<LogFollower, LogStoreError> {
        #[cfg(feature = "postgres")]
        if let Some(shared) = &self.shared {
            super::job_id::encode_job_id(job)?;
            let appended = shared.appended();
            let source = Source::Shared { logs: std::sync::Arc::clone(shared), appended };
            return Ok(LogFollower { job: job.to_owned(), stream, offset: from_offset, source, done: false });
        }
        let handle = self.job(job)?;
        let result = handle.lock().await.map(|_| LogFollower {
            job: job.to_owned(),
            stream,
            offset: from_offset,
            source: Source::Files {
                reader: StreamReader { path: handle.dir.join(stream.file_name()), file: None },
                status: handle.status.subscribe(),
            },
            done: false,
        });
        self.release_if_closed(job, &handle);
        result
    }
}

/// New output of one stream as it is appended; see [`LogStore::follow`].
///
/// It reads from disk when the store announces a change, so it never polls, and it never
/// sees a byte before it is acknowledged. On a store shared by control planes, output that
/// this process appended wakes it at once, and it looks for what another one appended four
/// times a second.
#[derive(Debug)]
pub struct LogFollower {
    job: String,
    stream: LogStream,
    offset: u64,
    source: Source,
    done: bool,
}

#[derive(Debug)]
enum Source {
    Files {
        reader: StreamReader,
        status: watch::Receiver<LogStatus>,
    },
    #[cfg(feature = "postgres")]
    Shared {
        logs: std::sync::Arc<super::shared::SharedLogs>,
        appended: watch::Receiver<u64>,
    },
}

impl LogFollower {
    /// The next chunk, or `None` once the log is closed and everything was returned.
    ///
    /// Fails with [`LogStoreError::StoreDropped`] if the store goes away first.
    pub async fn next(&mut self) -> Option<Result<LogChunk, LogStoreError>> {
        while !self.done {
            // Marking the status seen before reading means a change after it wakes the wait
            // below, so no append can slip between the read and the wait.
            let read = match &mut self.source {
                Source::Files { reader, status } => {
                    let status = *status.borrow_and_update();
                    reader
                        .read(&status, self.stream, self.offset, FOLLOW_CHUNK)
                        .await
                        .map(|c| (c, status.closed))
                }
                #[cfg(feature = "postgres")]
                Source::Shared { logs, appended } => {
                    appended.borrow_and_update();
                    logs.read_with_closed(&self.job, self.stream, self.offset, FOLLOW_CHUNK).await
                }
            };
            let closed = match read {
                Ok((chunk, closed)) => {
                    self.offset = chunk.next_offset;
                    if !chunk.bytes.is_empty() {
                        return Some(Ok(chunk));
                    }
                    closed
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            };
            let store_alive = match &mut self.source {
                _ if closed => true,
                Source::Files { status, .. } => status.changed().await.is_ok(),
                #[cfg(feature = "postgres")]
                Source::Shared { appended, .. } => super::shared::SharedLogs::wait_for_more(appended).await,
            };
            if closed {
                self.done = true;
            } else if !store_alive {
                self.done = true;
                return Some(Err(LogStoreError::StoreDropped { job: self.job.clone() }));
            }
        }
        None
    }

    /// The offset the next chunk starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}
