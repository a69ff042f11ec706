//! The one error type of the runner.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong when starting or supervising a job.
///
/// A job that runs and fails is not an error: that is a [`JobResult`](super::JobResult) with a
/// non-zero exit. These are the runner's own failures, and the spec checks that keep secrets out
/// of places they must never be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The spec cannot be run as given. Nothing was spawned.
    #[error("invalid job spec: {reason}")]
    InvalidSpec {
        /// What is wrong with it.
        reason: String,
    },
    /// A secret name is not usable as the `NAME` of a stdin header line.
    #[error("invalid secret name {name:?}: {reason}")]
    InvalidSecretName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A secret value appears in the program, its arguments, its environment or its working
    /// directory, where any local user could read it. Nothing was spawned.
    #[error("the value of secret `{name}` appears in the job's {place}; secrets go on stdin only")]
    SecretInCommandLine {
        /// The secret's name (never its value).
        name: String,
        /// Where it was found: "program", "arguments", "environment" or "working directory".
        place: &'static str,
    },
    /// The masking automaton could not be built (secrets too large for it).
    #[error("cannot build the secret masker: {0}")]
    Masker(#[from] aho_corasick::BuildError),
    /// `start` was called outside a Tokio runtime.
    #[error("the job runner needs a Tokio runtime with I/O and time enabled")]
    NoRuntime,
    /// The program could not be started.
    #[error("cannot start `{program}`{}: {source}", dir_suffix(.working_dir))]
    Spawn {
        /// The program as given in the spec.
        program: String,
        /// The working directory, when the spec set one (a missing one fails the same way).
        working_dir: Option<PathBuf>,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// An I/O operation of the runner failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the runner was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// One of the runner's tasks stopped without reporting (it panicked or the runtime is
    /// shutting down).
    #[error("the runner's {task} task ended abnormally")]
    TaskFailed {
        /// Which task.
        task: &'static str,
    },
}

fn dir_suffix(dir: &Option<PathBuf>) -> String {
    dir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default()
}
