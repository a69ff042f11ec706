//! Group commit of a session's log writes: what was written since the last sync started, the
//! one sync in flight, and the acknowledgements of what it made durable.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::{JoinError, JoinHandle};

use super::held::HeldGauge;

use crate::logstore::{LogStatus, LogStore, LogStoreError, LogStream};
use hodei_agent::protocol::v1::{LogAck, OutputStream};

/// Which streams of a job were written since the last sync started: [stdout, stderr].
type Unsynced = BTreeMap<String, [bool; 2]>;

/// What a sync returns: each job it covered, the streams to acknowledge, the outcome.
pub(super) type SyncOutcome = Vec<(String, [bool; 2], Result<LogStatus, LogStoreError>)>;

/// A session's sync in flight: a task of its own, so that it runs while the session task
/// writes, and the jobs it covers, to be synced again should the task fail.
struct Syncing {
    task: JoinHandle<SyncOutcome>,
    jobs: Unsynced,
    bytes: usize,
}

/// A session's log writes on their way to being durable: what was written since the last sync
/// started, and the sync in flight.
pub(super) struct LogSync {
    /// Written, not yet covered by a sync: acknowledged once one covering them returns.
    unsynced: Unsynced,
    unsynced_bytes: usize,
    /// Log bytes the session may have written and not yet seen synced before it stops reading
    /// the agent's stream until the sync in flight returns: twice the held output negotiated in
    /// `Welcome`, so an agent that keeps to it is never held up here; it bounds what an agent
    /// that does not can make the hub write without syncing.
    max_unsynced_bytes: usize,
    /// At most one at a time: writes go on while it runs, and the next one covers them all.
    syncing: Option<Syncing>,
    /// The bytes written and not yet synced, or being synced, as callers see them.
    held: Arc<HeldGauge>,
}

impl LogSync {
    /// Nothing written yet, under the session's bound on written, unsynced bytes, with
    /// batches of at most `max_batch_bytes`.
    pub(super) fn new(max_unsynced_bytes: usize, max_batch_bytes: u64) -> Self {
        // Reads stop once the sync in flight leaves `max_unsynced_bytes` unsynced, so the
        // last batch read passes it by at most one batch; that much more, at most, is what the
        // sync in flight covers, having been unsynced when it started.
        let max_batch_bytes = usize::try_from(max_batch_bytes).unwrap_or(usize::MAX);
        let bound = max_unsynced_bytes.saturating_add(max_batch_bytes).saturating_mul(2);
        let held = HeldGauge::new(u64::try_from(bound).unwrap_or(u64::MAX));
        Self { unsynced: BTreeMap::new(), unsynced_bytes: 0, max_unsynced_bytes, syncing: None, held }
    }

    /// What callers read of the bytes held.
    pub(super) fn held(&self) -> Arc<HeldGauge> {
        self.held.clone()
    }

    fn publish_held(&self) {
        let syncing = self.syncing.as_ref().map_or(0, |syncing| syncing.bytes);
        self.held.set(u64::try_from(self.unsynced_bytes.saturating_add(syncing)).unwrap_or(u64::MAX));
    }

    /// Records `len` bytes written to `stream` of `job_id`, for the next sync to cover.
    pub(super) fn written(&mut self, job_id: String, stream: LogStream, len: usize) {
        self.unsynced.entry(job_id).or_default()[stream_index(stream)] = true;
        self.unsynced_bytes = self.unsynced_bytes.saturating_add(len);
        self.publish_held();
    }

    /// Leaves `job_id` out of the next sync: closing its log syncs it.
    pub(super) fn forget(&mut self, job_id: &str) {
        self.unsynced.remove(job_id);
    }

    pub(super) fn is_syncing(&self) -> bool {
        self.syncing.is_some()
    }

    /// Whether the session may read on: not while the sync in flight leaves too much written
    /// and unsynced.
    pub(super) fn may_read(&self) -> bool {
        self.syncing.is_none() || self.unsynced_bytes < self.max_unsynced_bytes
    }

    /// Starts syncing every job written to since the last sync started, unless one is in
    /// flight: that one's end starts the next. So a lone batch is synced at once, and a flood
    /// of batches costs one fsync per whatever arrived during the previous one, while the
    /// agent's stream is read on meanwhile.
    pub(super) fn start(&mut self, logs: Option<&Arc<LogStore>>, worker: &str) {
        if self.unsynced.is_empty() && self.unsynced_bytes > 0 {
            // Each job written was forgotten: closing its log synced it.
            self.unsynced_bytes = 0;
            self.publish_held();
        }
        if self.syncing.is_some() || self.unsynced.is_empty() {
            return;
        }
        let Some(logs) = logs.cloned() else { return };
        let jobs = std::mem::take(&mut self.unsynced);
        let bytes = std::mem::take(&mut self.unsynced_bytes);
        let covered = jobs.clone();
        // Written, not yet durable: the batches' acks wait for this sync.
        tracing::debug!(worker = %worker, jobs = jobs.len(), "log sync started");
        let task = tokio::spawn(async move {
            let mut outcomes = Vec::with_capacity(covered.len());
            for (job_id, streams) in covered {
                let outcome = logs.sync(&job_id).await;
                outcomes.push((job_id, streams, outcome));
            }
            outcomes
        });
        self.syncing = Some(Syncing { task, jobs, bytes });
        self.publish_held();
    }

    /// The end of the sync in flight, or never.
    pub(super) async fn in_flight(&mut self) -> Result<SyncOutcome, JoinError> {
        match &mut self.syncing {
            Some(syncing) => (&mut syncing.task).await,
            None => std::future::pending().await,
        }
    }

    /// Takes the ended sync out; if its task failed, what it covered is due again.
    pub(super) fn ended(&mut self, ended: Result<SyncOutcome, JoinError>, worker: &str) -> SyncOutcome {
        let (jobs, bytes) =
            self.syncing.take().map(|syncing| (syncing.jobs, syncing.bytes)).unwrap_or_default();
        let outcome = ended.unwrap_or_else(|error| {
            tracing::error!(worker = %worker, %error, "log sync task failed; syncing again");
            self.unsynced_bytes = self.unsynced_bytes.saturating_add(bytes);
            for (job_id, streams) in jobs {
                let due = self.unsynced.entry(job_id).or_default();
                for (due, written) in due.iter_mut().zip(streams) {
                    *due |= written;
                }
            }
            Vec::new()
        });
        self.publish_held();
        outcome
    }
}

/// A stream's place in the per-stream arrays: [stdout, stderr].
pub(super) fn stream_index(stream: LogStream) -> usize {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
    }
}

/// The acknowledgement of `stream` up to where `status` (durable, as the store reports it)
/// has it confirmed; also where `Welcome` tells an agent holding the job to resume. Not all the
/// store has: a tail found on disk at start may be a write a crash cut short, its bytes zeros;
/// were it acknowledged, the agent would drop the real bytes it still holds.
pub(super) fn log_ack(job_id: &str, stream: LogStream, status: &LogStatus) -> LogAck {
    wire_ack(job_id, stream, status.stream(stream).confirmed)
}

fn wire_ack(job_id: &str, stream: LogStream, stored: u64) -> LogAck {
    let wire = match stream {
        LogStream::Stdout => OutputStream::Stdout,
        LogStream::Stderr => OutputStream::Stderr,
    };
    LogAck { job_id: job_id.to_owned(), stream: wire.into(), stored }
}

/// The store's stream for a wire stream; `None` for an unspecified one.
pub(super) fn log_stream(stream: OutputStream) -> Option<LogStream> {
    match stream {
        OutputStream::Stdout => Some(LogStream::Stdout),
        OutputStream::Stderr => Some(LogStream::Stderr),
        OutputStream::Unspecified => None,
    }
}
