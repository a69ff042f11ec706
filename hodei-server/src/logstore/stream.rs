//! A job's two output streams, and the file each is stored in.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One of a job's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl LogStream {
    /// Both streams.
    pub const ALL: [LogStream; 2] = [LogStream::Stdout, LogStream::Stderr];

    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }

    pub(super) fn file_name(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout.log",
            LogStream::Stderr => "stderr.log",
        }
    }

    pub(super) fn parse(name: &str) -> Option<Self> {
        LogStream::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
