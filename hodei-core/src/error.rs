//! The one error type of hodei-core.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::{SagaId, SagaStatus};

/// Everything the engine and its stores can refuse or fail at.
///
/// Step bodies fail with [`StepError`](crate::StepError) instead: that is the user's error and
/// carries the retryable/terminal split. This type is the engine's own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data directory is held by another process (or another engine in this one).
    #[error("data directory {path} is locked by another process{}", holder_suffix(.holder))]
    Locked {
        /// The directory that was asked for.
        path: PathBuf,
        /// What the lock file says about its holder, if anything.
        holder: Option<String>,
    },
    /// The data directory lost writes that were acknowledged as durable, or a file the store
    /// needs to tell that is damaged. The store does not open and writes nothing more there:
    /// restore the directory from a backup, or open it with
    /// `SledOptions::accept_data_loss` to go on with what is left.
    #[error(
        "data directory {path} is damaged: {damage}; lost: {lost}. Restore it from a backup, or open it accepting the loss"
    )]
    Damaged {
        /// The data directory.
        path: PathBuf,
        /// What is damaged.
        damage: String,
        /// What acknowledged data is missing, as far as the store can tell.
        lost: String,
    },
    /// The storage backend failed (I/O, or sled itself).
    #[error("storage failed while {operation}: {source}")]
    Storage {
        /// What the engine was doing.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: StorageError,
    },
    /// A stored record could not be decoded. The data is left as it is for an operator.
    #[error("corrupt record for saga {saga}{}: {reason}", seq_suffix(.seq))]
    CorruptRecord {
        /// The saga the record belongs to.
        saga: String,
        /// The event sequence number, or `None` for the saga's summary record.
        seq: Option<u64>,
        /// Why it could not be decoded.
        reason: String,
    },
    /// No definition is registered under that name (and version, when one was asked for).
    #[error("no saga definition named `{name}`{} is registered", version_suffix(.version))]
    UnknownSaga {
        /// The definition name.
        name: String,
        /// The version, when the caller named one.
        version: Option<u32>,
    },
    /// The same (name, version) was registered twice.
    #[error("saga definition `{name}` version {version} is already registered")]
    DuplicateDefinition {
        /// The definition name.
        name: String,
        /// Its version.
        version: u32,
    },
    /// No saga with that id exists.
    #[error("no saga with id `{0}`")]
    SagaNotFound(SagaId),
    /// A saga id was reused for a different run: the id is the idempotency key.
    #[error("saga `{id}` already exists with {difference}; an id names exactly one run")]
    IdempotencyConflict {
        /// The id that was reused.
        id: SagaId,
        /// What differs from the existing run.
        difference: String,
    },
    /// An append found the journal elsewhere than expected (optimistic concurrency).
    #[error("journal of saga `{id}` is not at sequence {expected}: another writer got there first")]
    SequenceConflict {
        /// The saga.
        id: SagaId,
        /// The sequence number the writer expected to be next.
        expected: u64,
    },
    /// Another engine owns the saga now: several engines share the store, this one's lease on
    /// the saga lapsed and the saga was taken over (its epoch moved on). Nothing was written,
    /// and this engine stops driving the saga.
    #[error("saga `{0}` is owned by another engine now: this engine's write was refused (fenced)")]
    Fenced(SagaId),
    /// A payload is over the configured size limit. Nothing was written.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Which payload.
        what: String,
        /// Its encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A user value could not be encoded or decoded with serde.
    #[error("could not {action} {what}: {reason}")]
    Codec {
        /// `encode` or `decode`.
        action: &'static str,
        /// Which value.
        what: String,
        /// The codec's message.
        reason: String,
    },
    /// A start's input does not decode as the definition's input type. Nothing was written.
    #[error("the input does not fit saga definition `{definition}` version {version}: {reason}")]
    InvalidInput {
        /// The definition name.
        definition: String,
        /// The definition version the start resolved to.
        version: u32,
        /// Why it does not decode.
        reason: String,
    },
    /// A saga id is empty, too long, or not printable.
    #[error("invalid saga id {id:?}: {reason}")]
    InvalidSagaId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The saga has already finished, so it cannot take that request.
    #[error("saga `{0}` has already finished")]
    SagaFinished(SagaId),
    /// The saga's status does not allow the request: pausing a finished saga, retrying the
    /// compensation of one whose compensation did not fail, and so on.
    #[error("saga `{id}` is {}: it cannot {action}", .status.kind())]
    InvalidState {
        /// The saga.
        id: SagaId,
        /// Its status when it was asked.
        status: SagaStatus,
        /// What was asked: `pause`, `resume`, `retry now`, `retry its compensation`.
        action: &'static str,
    },
    /// [`Engine::retry_now`](crate::Engine::retry_now) found no step or compensation of the
    /// saga waiting out a retry backoff.
    #[error("saga `{0}` has no step or compensation waiting to retry")]
    NothingToRetry(SagaId),
    /// The name given as the author of a request is empty, too long, or not printable.
    #[error("invalid actor {actor:?}: {reason}")]
    InvalidActor {
        /// The name as given.
        actor: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The engine is shutting down and takes no new work.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// A saga cannot be forked as asked.
    #[error("cannot fork saga `{saga}`: {reason}")]
    Fork {
        /// The run to fork.
        saga: SagaId,
        /// Why not.
        reason: String,
    },
    /// The engine stopped before the awaited saga finished; it resumes on the next start.
    #[error("the engine stopped before saga `{0}` finished; it resumes on the next start")]
    EngineStopped(SagaId),
    /// A saga, step or compensation asked for a resource of a type that was not registered
    /// (see [`EngineBuilder::resource`](crate::EngineBuilder::resource)).
    #[error("no resource of type `{type_name}` is registered with the engine")]
    MissingResource {
        /// The type asked for, as [`std::any::type_name`] spells it.
        type_name: &'static str,
    },
    /// Two resources of one type were registered with an engine, which holds one per type.
    #[error("a resource of type `{type_name}` is registered twice")]
    DuplicateResource {
        /// The type, as [`std::any::type_name`] spells it.
        type_name: &'static str,
    },
    /// A time-skipping test environment could not start, or a wait of it could not end (see
    /// `testing::TestEnv`).
    #[error("the test environment {reason}")]
    TestEnvironment {
        /// Why.
        reason: String,
    },
}

fn holder_suffix(holder: &Option<String>) -> String {
    holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
}

fn seq_suffix(seq: &Option<u64>) -> String {
    seq.map(|s| format!(" at sequence {s}")).unwrap_or_else(|| " (summary record)".into())
}

fn version_suffix(version: &Option<u32>) -> String {
    version.map(|v| format!(" with version {v}")).unwrap_or_default()
}

/// A backend failure, cheap to clone so that one failed group flush can be reported to every
/// writer it covered.
#[derive(Clone)]
pub struct StorageError {
    message: Arc<str>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl StorageError {
    /// Wraps a backend error.
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { message: source.to_string().into(), source: Some(Arc::new(source)) }
    }

    /// A failure described by a message alone.
    pub fn message(message: impl Into<String>) -> Self {
        Self { message: message.into().into(), source: None }
    }

    /// The write of saga `id` was refused because another engine owns it now; it reaches the
    /// writer as [`Error::Fenced`].
    pub fn fenced(id: SagaId) -> Self {
        Self::new(FencedWrite(id))
    }

    /// The saga whose write was fenced, if that is what this failure is.
    pub fn fenced_saga(&self) -> Option<&SagaId> {
        self.source.as_deref().and_then(|source| source.downcast_ref::<FencedWrite>()).map(|f| &f.0)
    }

    /// This failure as the crate's error, `operation` saying what was being done.
    pub(crate) fn into_error(self, operation: &'static str) -> Error {
        match self.fenced_saga() {
            Some(id) => Error::Fenced(id.clone()),
            None => Error::Storage { operation, source: self },
        }
    }
}

/// See [`StorageError::fenced`].
#[derive(Debug, thiserror::Error)]
#[error("saga `{0}` is owned by another engine now")]
struct FencedWrite(SagaId);

impl fmt::Debug for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StorageError").field(&self.message).finish()
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
