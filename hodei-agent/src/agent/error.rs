//! The one error type of the agent.

use std::io;
use std::path::PathBuf;

use crate::connect::ConnectError;
use crate::pki::PkiError;

/// What the agent can fail at. [`AgentError::Setting`] and [`AgentError::UnknownFlag`] are the
/// operator's to fix (the binary exits 2 for them); the others are failures at run time.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A setting is missing or invalid.
    #[error("{flag} ({env}): {reason}")]
    Setting {
        /// The command-line flag.
        flag: &'static str,
        /// The environment variable.
        env: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A command-line argument that is no flag of the agent's.
    #[error("unknown argument `{0}` (see --help)")]
    UnknownFlag(String),
    /// The work directory, or a credential in it, could not be read or written.
    #[error("work directory: {action} {path}: {source}")]
    WorkDir {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The key or certificate could not be made, or the TLS identity built from them.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Registration failed for a reason retrying will not fix (e.g. a refused token).
    #[error("registration failed: {0}")]
    Registration(#[source] ConnectError),
}

impl AgentError {
    /// Whether the operator must fix a setting: the binary exits 2 for these.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Setting { .. } | Self::UnknownFlag(_))
    }
}
