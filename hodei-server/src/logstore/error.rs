//! Everything the log store can refuse or fail at.

use std::io;
use std::path::{Path, PathBuf};

use super::stream::LogStream;

/// Everything the log store can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogStoreError {
    /// The job id cannot name a log.
    #[error("invalid job id {id:?}: {reason}")]
    InvalidJobId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Another store (in this process or another) has the directory open.
    #[error("log directory {} is locked by another log store", path.display())]
    Locked {
        /// The `logs` directory.
        path: PathBuf,
    },
    /// A file operation failed. Nothing past the last acknowledged offset is relied on.
    #[error("log store failed while {operation} {}: {source}", path.display())]
    Io {
        /// What the store was doing.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The batch starts past the stream's end; the agent must resend from `expected`.
    #[error(
        "{stream} of job `{job}`: a batch at offset {offset} leaves a gap; resend from offset {expected}"
    )]
    Gap {
        /// The job.
        job: String,
        /// The stream.
        stream: LogStream,
        /// Where the batch started.
        offset: u64,
        /// The stream's end: where the next batch must start (or start before).
        expected: u64,
    },
    /// A resent byte differs from the one stored (and acknowledged) at that offset. Nothing
    /// was written.
    #[error("{stream} of job `{job}`: the resent bytes differ from the stored ones at offset {offset}")]
    Mismatch {
        /// The job.
        job: String,
        /// The stream.
        stream: LogStream,
        /// The first differing offset.
        offset: u64,
    },
    /// The batch would end past `u64::MAX`.
    #[error("{stream} of job `{job}`: a batch of {len} bytes at offset {offset} overflows the offset range")]
    OffsetOverflow {
        /// The job.
        job: String,
        /// The stream.
        stream: LogStream,
        /// Where the batch started.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// The job's log was closed; it takes no more output.
    #[error("the log of job `{job}` is closed")]
    Closed {
        /// The job.
        job: String,
    },
    /// A job's state file cannot be parsed. It is left as it is for an operator.
    #[error("corrupt log state file {}: {reason}", path.display())]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The database that control planes share failed or refused a statement of the log
    /// store. Nothing it did not commit is acknowledged.
    #[error("job log store: {operation} failed in the shared database: {source}")]
    Shared {
        /// What the store was doing.
        operation: &'static str,
        /// The database's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store was dropped while a follower waited for a log that was never closed.
    #[error("the log store was dropped before the log of job `{job}` was closed")]
    StoreDropped {
        /// The job.
        job: String,
    },
}

impl LogStoreError {
    /// The shared database failed (it restarted, a connection dropped): the store refused
    /// nothing, and the same call may succeed later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Shared { .. })
    }

    /// The filesystem of the store's directory is full, or the quota spent: what the call was
    /// given is not stored (a write that did not fit is cut back to the acknowledged offset,
    /// a result that did not fit is not there), and the same call may succeed once space is
    /// freed, on the same store.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            Self::Io { source, .. }
                if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
        )
    }

    /// Whether the agent's resend from the acknowledged offsets, on its next session, can
    /// store what this call did not: the store failed (the shared database, or a full disk),
    /// or batches before this one were lost on their way (a gap), rather than refusing what it
    /// was given.
    pub fn calls_for_resend(&self) -> bool {
        matches!(self, Self::Shared { .. } | Self::Gap { .. }) || self.is_no_space()
    }
}

pub(super) fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogStoreError {
    let path = path.to_path_buf();
    move |source| LogStoreError::Io { operation, path, source }
}
