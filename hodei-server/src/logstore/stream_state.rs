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
    /// Bytes below this were acknowledged, or matched an agent's resend, and are never
    /// rewritten; above it (a tail found on disk, or left by a failed write) a resend may
    /// replace a torn tail of zeros.
    pub(super) acked: u64,
    /// The end of a tail found on disk: `acked..unconfirmed_to` is synced but no agent has
    /// confirmed it, so no acknowledgement may cover it (it may be a crash's zeros, and an
    /// agent told they are stored would drop the real bytes). Only a resend over it confirms
    /// it or cuts it.
    pub(super) unconfirmed_to: u64,
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

    /// Whether a tail found on disk still waits for an agent's resend to confirm it.
    fn awaits_resend(&self) -> bool {
        self.acked < self.unconfirmed_to
    }

    /// What may be acknowledged to an agent, and where one resumes (`StreamStatus::confirmed`):
    /// [`StreamState::ack`], except below a tail found on disk that no resend has covered, where
    /// it is the last confirmed offset, so that the agent's resend reaches the tail.
    pub(super) fn confirmed(&self) -> Ack {
        if self.awaits_resend() { Ack { offset: self.acked, truncated: self.truncated } } else { self.ack() }
    }

    /// [`StreamState::confirmed`], given to a caller who will acknowledge it: from now on the
    /// bytes it covers are as fixed as any acknowledged ones, and no resend may cut them as a
    /// torn tail.
    pub(super) fn acknowledge(&mut self) -> Ack {
        if !self.awaits_resend() {
            self.acked = self.acked.max(self.synced);
        }
        self.confirmed()
    }

    pub(super) fn mark_synced(&mut self, upto: u64) {
        self.synced = self.synced.max(upto.min(self.stored));
        if !self.awaits_resend() {
            self.acked = self.acked.max(self.synced);
        }
    }

    /// A resend matched the stored bytes below `upto`: the agent vouches for them.
    pub(super) fn matched(&mut self, upto: u64) {
        self.acked = self.acked.max(upto.min(self.synced));
    }

    /// The file was cut at `at`: nothing on disk above it waits for a resend any more.
    pub(super) fn cut_at(&mut self, at: u64) {
        self.generation += 1;
        self.stored = at;
        self.end = at;
        self.synced = self.synced.min(at);
        self.unconfirmed_to = self.unconfirmed_to.min(at);
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
        self.unconfirmed_to = self.unconfirmed_to.min(self.stored);
        if !self.truncated {
            self.end = self.stored;
        }
    }
}
