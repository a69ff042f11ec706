//! What the hub can fail at.

use std::io;

use crate::logstore::{LogStoreError, LogStream};
use crate::pki::PkiError;

/// What the hub can fail at while starting or running a listener or a job, and what it refuses
/// of a worker's session (a certificate proves who the worker is, not that it behaves).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The TLS configuration could not be built from the PKI.
    #[error("TLS configuration of the {listener} listener: {source}")]
    Tls {
        /// Which listener.
        listener: &'static str,
        /// What the PKI refused.
        #[source]
        source: PkiError,
    },
    /// The listening socket failed.
    #[error("the {listener} listener: {source}")]
    Io {
        /// Which listener.
        listener: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("the {listener} server: {source}")]
    Transport {
        /// Which listener.
        listener: &'static str,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server task panicked or was cancelled.
    #[error("the {listener} server task ended abnormally: {source}")]
    Task {
        /// Which listener.
        listener: &'static str,
        /// The task's failure.
        #[source]
        source: tokio::task::JoinError,
    },
    /// No worker with this id has an open session.
    #[error("worker `{worker_id}` is not connected")]
    UnknownWorker {
        /// The worker asked for.
        worker_id: String,
    },
    /// The worker's session ended before the job's result arrived. The job may or may not have
    /// run: running it again (same id) is the caller's call.
    #[error("worker `{worker_id}` was lost before job `{job_id}` finished")]
    WorkerLost {
        /// The worker.
        worker_id: String,
        /// The job.
        job_id: String,
    },
    /// The hub was built without a [`LogStore`], so it has nowhere to keep a job's output.
    ///
    /// [`LogStore`]: crate::logstore::LogStore
    #[error("the hub has no log store, so it cannot run jobs")]
    NoLogStore,
    /// A job with this id is already running on that worker's session.
    #[error("job `{job_id}` is already running on worker `{worker_id}`")]
    DuplicateJob {
        /// The worker.
        worker_id: String,
        /// The job.
        job_id: String,
    },
    /// The job's output could not be stored; the result arrived, but the log is incomplete.
    #[error("storing the log of job `{job_id}`: {source}")]
    Logs {
        /// The job.
        job_id: String,
        /// What the store refused or failed at.
        #[source]
        source: LogStoreError,
    },
    /// A worker sent something for a job that was not handed to it (output, a result, an
    /// acceptance, or a claim in its `Hello`). Its session is ended; nothing of it is stored.
    #[error("worker `{worker_id}` sent {what} for job `{job_id}`, which is not assigned to it")]
    NotAssigned {
        /// The worker.
        worker_id: String,
        /// The job it named.
        job_id: String,
        /// What it sent.
        what: &'static str,
    },
    /// A worker sent a log batch starting below what its session had already sent or been
    /// told was stored: an agent resends only from where a session starts. Its session is
    /// ended; nothing of the batch is stored.
    #[error(
        "worker `{worker_id}` sent {stream} of job `{job_id}` from offset {offset}, back from the {reached} it had reached"
    )]
    OffsetRewound {
        /// The worker.
        worker_id: String,
        /// The job.
        job_id: String,
        /// The stream.
        stream: LogStream,
        /// Where the batch started.
        offset: u64,
        /// Where the session's output of that stream had reached.
        reached: u64,
    },
    /// A worker sent a log batch over the size its session's `Welcome` set. Its session is
    /// ended; nothing of the batch is stored.
    #[error(
        "worker `{worker_id}` sent a log batch of {len} bytes for job `{job_id}`, over the limit of {max}"
    )]
    BatchTooLarge {
        /// The worker.
        worker_id: String,
        /// The job.
        job_id: String,
        /// The batch's size.
        len: u64,
        /// [`HubConfig::log_batch_max_bytes`](super::HubConfig::log_batch_max_bytes).
        max: u64,
    },
    /// A worker sent a message larger than a session decodes; it was never decoded. Its
    /// session is ended.
    #[error("worker `{worker_id}` sent a message over the session's limit of {max} bytes")]
    MessageTooLarge {
        /// The worker.
        worker_id: String,
        /// The largest message a session decodes.
        max: usize,
    },
}

impl HubError {
    /// Whether running the job again may succeed: the worker went away, not the job.
    pub fn is_retryable(&self) -> bool {
        // A shared database that failed (restarted, a connection dropped) may answer the next
        // attempt, and a full disk have room by then.
        match self {
            Self::WorkerLost { .. } | Self::UnknownWorker { .. } => true,
            Self::Logs { source, .. } => source.is_unavailable() || source.is_no_space(),
            _ => false,
        }
    }

    /// The job the error is about, if one.
    pub(super) fn job_id(&self) -> Option<&str> {
        match self {
            Self::WorkerLost { job_id, .. }
            | Self::DuplicateJob { job_id, .. }
            | Self::Logs { job_id, .. }
            | Self::NotAssigned { job_id, .. }
            | Self::OffsetRewound { job_id, .. }
            | Self::BatchTooLarge { job_id, .. } => Some(job_id),
            _ => None,
        }
    }

    /// The status a worker's session ends with when the hub refuses what it sent.
    pub(super) fn refusal(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Self::NotAssigned { .. } => tonic::Status::permission_denied(message),
            Self::OffsetRewound { .. } => tonic::Status::invalid_argument(message),
            Self::BatchTooLarge { .. } | Self::MessageTooLarge { .. } => {
                tonic::Status::resource_exhausted(message)
            }
            // A batch past the stream's end (a gap), or a store that failed: the agent resends
            // from what is stored, on its next session.
            _ => tonic::Status::aborted(message),
        }
    }
}
