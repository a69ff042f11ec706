//! Where a job's log stands, as callers see it: acknowledged offsets, stored bytes, the cut.

use serde::{Deserialize, Serialize};

use super::stream::LogStream;

/// What an append acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Every byte of the stream below this offset is durably stored, or counted as dropped
    /// past the cap. The agent resends from here after a reconnect.
    pub offset: u64,
    /// The stream has reached its cap: further bytes are only counted, so the agent may stop
    /// sending them (an empty batch at its current offset still accounts for them).
    pub truncated: bool,
}

/// Where one stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStatus {
    /// The end offset: where the next batch continues.
    pub end: u64,
    /// How many bytes are stored (the file's length); below `end` only when truncated.
    pub stored: u64,
    /// The stream reached its cap.
    pub truncated: bool,
    /// Where an agent still holding the job resumes: every byte below was acknowledged to an
    /// agent, or matched its resend, in this store's run. Between here and `end` lie bytes found
    /// on disk at start that no agent has confirmed: a write that a crash cut short may have
    /// left its tail as zeros there, and only the agent's resend over them can find and repair
    /// it (see the module's Recovery).
    pub confirmed: u64,
}

impl StreamStatus {
    /// How many bytes were counted and dropped past the cap.
    pub fn dropped(&self) -> u64 {
        self.end.saturating_sub(self.stored)
    }
}

/// Where a job's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStatus {
    /// Standard output.
    pub stdout: StreamStatus,
    /// Standard error.
    pub stderr: StreamStatus,
    /// The job ended: no more output is taken.
    pub closed: bool,
}

impl LogStatus {
    /// One stream's status.
    pub fn stream(&self, stream: LogStream) -> &StreamStatus {
        match stream {
            LogStream::Stdout => &self.stdout,
            LogStream::Stderr => &self.stderr,
        }
    }

    /// One stream's status, to fill in (the shared store reads it row by row).
    #[cfg(feature = "postgres")]
    pub(super) fn stream_mut(&mut self, stream: LogStream) -> &mut StreamStatus {
        match stream {
            LogStream::Stdout => &mut self.stdout,
            LogStream::Stderr => &mut self.stderr,
        }
    }
}
