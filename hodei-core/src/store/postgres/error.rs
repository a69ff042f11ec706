use crate::event::SagaId;

/// What [`PostgresStore`](super::PostgresStore) adds to the ways a store can fail. It reaches
/// callers as the source of [`Error::Storage`](crate::Error::Storage), so that a caller can
/// tell a refused write from a lost connection:
///
/// ```
/// # use hodei_core::{Error, PostgresError};
/// fn refused(e: &Error) -> bool {
///     match e {
///         Error::Storage { source, .. } => std::error::Error::source(source)
///             .and_then(|s| s.downcast_ref::<PostgresError>())
///             .is_some_and(|e| matches!(e, PostgresError::SequenceConflict { .. })),
///         _ => false,
///     }
/// }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The connection string does not parse.
    #[error("invalid PostgreSQL connection string: {0}")]
    InvalidUrl(String),
    /// The schema name asked for is not a plain identifier.
    #[error(
        "invalid schema name {0:?}: use 1 to 63 lowercase ASCII letters, digits and underscores, starting with a letter or underscore"
    )]
    InvalidSchema(String),
    /// The database holds a schema written by a newer build of Hodei.
    #[error("the database's Hodei schema is at version {found}; this build knows versions up to {known}")]
    NewerSchema {
        /// The newest version recorded in `hodei_migrations`.
        found: i32,
        /// The newest version this build has.
        known: i32,
    },
    /// A write reached the database after another writer's: the journal there is not where this
    /// store expected it. The transaction was rolled back; nothing of it was written.
    #[error("saga `{id}` is not at sequence {expected} in the database: another writer got there first")]
    SequenceConflict {
        /// The saga.
        id: SagaId,
        /// Where this store expected the journal to be (0 for a creation).
        expected: u64,
    },
    /// The lease asked for is under 100 ms or over a day.
    #[error("an engine's lease of {0:?} is out of range: give 100 ms to one day")]
    InvalidLease(std::time::Duration),
    /// The database, or the connection to it, failed.
    #[error("{message}")]
    Database {
        /// What the server or the driver said.
        message: String,
        /// The SQLSTATE code, when the server answered with an error.
        code: Option<String>,
    },
    /// The store's background thread is gone (the store is closing).
    #[error("the store's background thread stopped")]
    Stopped,
}

impl From<tokio_postgres::Error> for PostgresError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The driver's own message for a server error is only "db error": the server's is
        // in the source, as is the I/O error of a lost connection.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        Self::Database { message, code: e.code().map(|c| c.code().to_owned()) }
    }
}
