//! One stream's offsets in memory (written, synced, acknowledged, counted) and its writer.

use std::sync::Arc;

use super::disk::blocking;
use super::status::Ack;

#[derive(Debug, Default)]
pub(super) struct StreamState {
    /// The file's length: every byte below is written, not necessarily synced.
    pub(super) stored: u64,
    /// Every byte below is synced: what may be acknowledged and read.
    pub(super) synced: u64,
    /// `stored`, plus the bytes dropped once truncated.
    pub(super) end: u64,
    pub(super) truncated: bool,
    /// Bytes below this were acknowledged and are never rewritten; above it (a tail found on
    /// disk, or left by a failed write) a resend may replace a torn tail of zeros.
    pub(super) acked: u64,
    /// The writer, opened at the first append of this run; `None` after a failed write so
    /// that the next append reconciles with the file. Shared with syncs in flight.
    pub(super) file: Option<Arc<std::fs::File>>,
    /// Bumped whenever the file is cut or its writer dropped, so that a sync that started
    /// before does not vouch for what is there now.
    pub(super) generation: u64,
}

impl StreamState {
    /// What an acknowledgement may carry: the synced bytes, and past the cap the dropped ones
    /// counted after them (the cut is durable, and nothing is written past it).
    pub(super) fn ack(&self) -> Ack {
        let offset = if self.truncated && self.synced == self.stored { self.end } else { self.synced };
        Ack { offset, truncated: self.truncated }
    }

    /// Where an agent resumes (`StreamStatus::confirmed`): the acknowledgement once every synced
    /// byte is acknowledged; below a tail loaded from disk that none has covered, the last
    /// acknowledged offset, so that the agent's resend reaches the tail.
    pub(super) fn confirmed(&self) -> u64 {
        if self.acked >= self.synced { self.ack().offset } else { self.acked }
    }

    /// [`StreamState::ack`], given to a caller who may acknowledge it: from now on the bytes it
    /// covers are as fixed as any acknowledged ones, and no resend may cut them as a torn tail
    /// (a stream loaded from disk has synced bytes that no acknowledgement has covered yet).
    pub(super) fn acknowledge(&mut self) -> Ack {
        self.acked = self.acked.max(self.synced);
        self.ack()
    }

    pub(super) fn mark_synced(&mut self, upto: u64) {
        self.synced = self.synced.max(upto.min(self.stored));
        self.acked = self.acked.max(self.synced);
    }

    /// After a failed fsync: forgets what was not durable before, and the writer.
    pub(super) async fn roll_back(&mut self, file: &Arc<std::fs::File>) {
        self.generation += 1;
        self.file = None;
        let (file, synced) = (Arc::clone(file), self.synced);
        if let Err(error) = blocking(move || file.set_len(synced)).await {
            tracing::warn!(%error, "could not cut an unsynced tail back after a failed sync");
        }
        self.stored = self.synced;
        if !self.truncated {
            self.end = self.stored;
        }
    }
}
