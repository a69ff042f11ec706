//! What the hub can fail at.

use std::io;

use crate::logstore::LogStoreError;
use crate::pki::PkiError;

/// What the hub can fail at while starting or running a listener.
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
}
