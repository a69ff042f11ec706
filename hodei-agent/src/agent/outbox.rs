//! What the agent owes the hub for each job, across sessions.
//!
//! A job outlives the session it was assigned on: when the connection drops, or the control
//! plane restarts, the job keeps running and its output waits here. Every byte stays until the
//! hub acknowledges that it is stored, and each new session resends from the last
//! acknowledged offset (or from the hub's own stored offset, announced in `Welcome`, if that is
//! further), so no byte is lost or sent twice into the store. The result stays until the hub
//! acknowledges it.
//!
//! Memory is bounded per job ([`MAX_HELD_BYTES`], or less if the hub asks for less in
//! `Welcome`): a job whose output the hub has not
//! acknowledged stops being read ([`Outbox::wait_for_room`]), the runner's channel fills, and
//! the runner stops reading the child's pipes, so the child blocks on its writes.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::bytes::Bytes;
use tokio::sync::{Notify, watch};

use crate::protocol::v1;
use crate::runner::Stream;

/// The most unacknowledged output one job may hold before it is paused: 8 MiB, eight of the
/// hub's default 1 MiB batches. The hub acknowledges a batch only once an fsync covers it, and
/// one fsync of a few MiB takes 10-25 ms on a virtual disk, so the window must hold what the
/// job produces meanwhile, or the agent stops sending during every sync (at 4 MiB it did).
/// Measured with `cargo bench --bench agent`: 16 MiB was no faster than 8 (362 against
/// 369 MB/s) and its peak RSS grew 1.51x from 128 MiB to 1 GiB of output, against 1.19x. It is
/// also the bound on the agent's memory for a job's output while the hub is slow or away.
pub const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

/// One stream's output not yet acknowledged.
#[derive(Debug, Default)]
struct Pending {
    /// Everything below this offset is stored by the hub.
    acked: u64,
    /// Contiguous chunks from `acked` on, each with its starting offset. Shared buffers, so
    /// that the batches sent out of them are views, not copies.
    chunks: VecDeque<(u64, Bytes)>,
    /// The offset after the last byte produced.
    end: u64,
    held: usize,
}

impl Pending {
    fn push(&mut self, offset: u64, data: Bytes) {
        // The runner numbers its batches contiguously; anything else is a bug upstream, and
        // keeping the offsets the runner gave keeps the hub's gap check meaningful.
        debug_assert_eq!(offset, self.end, "runner batches are contiguous");
        self.end = offset + data.len() as u64;
        self.held += data.len();
        self.chunks.push_back((offset, data));
    }

    /// Forgets everything below `stored`.
    fn ack(&mut self, stored: u64) {
        let stored = stored.min(self.end);
        if stored <= self.acked {
            return;
        }
        self.acked = stored;
        while let Some((offset, data)) = self.chunks.front_mut() {
            let chunk_end = *offset + data.len() as u64;
            if chunk_end <= stored {
                self.held -= data.len();
                self.chunks.pop_front();
            } else {
                if *offset < stored {
                    let cut = usize::try_from(stored - *offset).unwrap_or(data.len());
                    // The view moves on; the buffer is freed once no batch in flight holds it.
                    *data = data.slice(cut..);
                    self.held -= cut;
                    *offset = stored;
                }
                break;
            }
        }
    }

    /// The output from `from` on, as batches of at most `max_bytes`.
    fn unsent(&self, from: u64, max_bytes: usize, out: &mut Vec<(u64, Bytes)>) {
        let max_bytes = max_bytes.max(1);
        for (offset, data) in &self.chunks {
            let chunk_end = *offset + data.len() as u64;
            if chunk_end <= from {
                continue;
            }
            let mut at = usize::try_from(from.saturating_sub(*offset)).unwrap_or(data.len());
            while at < data.len() {
                let end = data.len().min(at + max_bytes);
                out.push((offset + at as u64, data.slice(at..end)));
                at = end;
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    stdout: Pending,
    stderr: Pending,
    pid: u32,
    running: bool,
    result: Option<v1::JobResult>,
    /// The latest sample, replaced by each newer one: a slow hub gets fewer, never stale ones.
    metrics: Option<v1::MetricsSample>,
    /// Bumped with each new sample, so a session sends each at most once.
    metrics_seq: u64,
}

impl State {
    fn stream(&mut self, stream: Stream) -> &mut Pending {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }
}

/// One job's unacknowledged output and result.
#[derive(Debug)]
pub struct Outbox {
    job_id: String,
    state: Mutex<State>,
    room: Notify,
    /// The session's bound on held output, shared by every outbox.
    max_held: Arc<AtomicUsize>,
}

/// Where one session stands in sending one job's outbox.
#[derive(Debug, Default, Clone)]
pub struct Cursor {
    stdout: u64,
    stderr: u64,
    accepted_sent: bool,
    metrics_seq: u64,
    result_sent: bool,
}

/// What a session should send next for one job.
#[derive(Debug, Default)]
pub struct Unsent {
    /// `JobAccepted`, once per session while the job runs, so a new hub knows its pid.
    pub accepted: Option<v1::JobAccepted>,
    /// Log batches, in order, per stream.
    pub logs: Vec<v1::LogBatch>,
    /// The newest metrics sample not sent on this session.
    pub metrics: Option<v1::MetricsSample>,
    /// The result, once every byte of output has been sent before it.
    pub result: Option<v1::JobResult>,
}

impl Outbox {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section is plain data manipulation that cannot leave the state half
        // changed, so a poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The job's id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Keeps a batch of the job's output (its buffer, without a copy).
    pub fn push(&self, stream: Stream, offset: u64, data: Vec<u8>) {
        self.state().stream(stream).push(offset, Bytes::from(data));
    }

    /// Keeps the newest metrics sample.
    pub fn sample(&self, sample: v1::MetricsSample) {
        let mut state = self.state();
        state.metrics = Some(sample);
        state.metrics_seq += 1;
    }

    /// Records the job's end.
    pub fn finish(&self, result: v1::JobResult) {
        let mut state = self.state();
        state.running = false;
        state.result = Some(result);
    }

    /// Applies the hub's acknowledgement of `stream` up to `stored`.
    pub fn ack(&self, stream: Stream, stored: u64) {
        self.state().stream(stream).ack(stored);
        self.room.notify_waiters();
    }

    /// Waits until the job holds less unacknowledged output than the bound the session
    /// negotiated ([`MAX_HELD_BYTES`] at most).
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            // Registered before the check, so an ack between the check and the wait wakes it.
            notified.as_mut().enable();
            {
                let state = self.state();
                if state.stdout.held + state.stderr.held < self.max_held.load(Ordering::Relaxed) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        let state = self.state();
        state.stdout.held + state.stderr.held
    }

    /// Whether the result was produced and every byte of output acknowledged.
    fn drained(state: &State) -> bool {
        state.result.is_some()
            && state.stdout.acked == state.stdout.end
            && state.stderr.acked == state.stderr.end
    }

    /// The job as `Hello` announces it.
    pub fn announce(&self) -> v1::JobState {
        let state = self.state();
        v1::JobState {
            job_id: self.job_id.clone(),
            running: state.running,
            stdout_bytes: state.stdout.end,
            stderr_bytes: state.stderr.end,
        }
    }

    /// A cursor for a new session: from the last acknowledged offsets.
    pub fn cursor(&self) -> Cursor {
        let state = self.state();
        Cursor { stdout: state.stdout.acked, stderr: state.stderr.acked, ..Cursor::default() }
    }

    /// What `cursor`'s session has not sent yet, in batches of at most `max_bytes`; advances
    /// the cursor past it.
    pub fn take_unsent(&self, cursor: &mut Cursor, max_bytes: usize) -> Unsent {
        let state = self.state();
        let mut unsent = Unsent::default();
        if state.running && !cursor.accepted_sent {
            cursor.accepted_sent = true;
            unsent.accepted = Some(v1::JobAccepted { job_id: self.job_id.clone(), pid: state.pid });
        }
        for (stream, pending, at) in [
            (v1::OutputStream::Stdout, &state.stdout, &mut cursor.stdout),
            (v1::OutputStream::Stderr, &state.stderr, &mut cursor.stderr),
        ] {
            // The hub may have acknowledged past what this session sent (Welcome's resume).
            *at = (*at).max(pending.acked);
            let mut batches = Vec::new();
            pending.unsent(*at, max_bytes, &mut batches);
            *at = pending.end;
            unsent.logs.extend(batches.into_iter().map(|(offset, data)| v1::LogBatch {
                job_id: self.job_id.clone(),
                stream: stream.into(),
                offset,
                data,
            }));
        }
        if state.metrics_seq != cursor.metrics_seq {
            cursor.metrics_seq = state.metrics_seq;
            unsent.metrics = state.metrics.clone();
        }
        if !cursor.result_sent
            && let Some(result) = &state.result
        {
            cursor.result_sent = true;
            unsent.result = Some(result.clone());
        }
        unsent
    }
}

/// Every job the agent owes the hub something for, shared by the job tasks and the sessions.
#[derive(Debug)]
pub struct Outboxes {
    jobs: Mutex<BTreeMap<String, Arc<Outbox>>>,
    max_held: Arc<AtomicUsize>,
    /// Bumped on every change a session must act on (new output, a result, a new job).
    changed: watch::Sender<u64>,
}

impl Default for Outboxes {
    fn default() -> Self {
        Self {
            jobs: Mutex::new(BTreeMap::new()),
            max_held: Arc::new(AtomicUsize::new(MAX_HELD_BYTES)),
            changed: watch::Sender::new(0),
        }
    }
}

impl Outboxes {
    fn jobs(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Outbox>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new outbox for a job that just started with `pid`; `None` if the job is known already
    /// (a re-assignment after a reconnect: the job goes on, and its outbox is resent anyway).
    pub fn open(&self, job_id: &str, pid: u32) -> Option<Arc<Outbox>> {
        let mut jobs = self.jobs();
        if jobs.contains_key(job_id) {
            return None;
        }
        let state = State { pid, running: true, ..State::default() };
        let outbox = Arc::new(Outbox {
            job_id: job_id.to_owned(),
            state: Mutex::new(state),
            room: Notify::new(),
            max_held: self.max_held.clone(),
        });
        jobs.insert(job_id.to_owned(), outbox.clone());
        drop(jobs);
        self.notify();
        Some(outbox)
    }

    /// Sets the bound on each job's held output, as a session's `Welcome` negotiated it: at most
    /// [`MAX_HELD_BYTES`]. Paused jobs re-check it, so a larger bound resumes them at once.
    pub fn set_max_held(&self, bytes: usize) {
        self.max_held.store(bytes.clamp(1, MAX_HELD_BYTES), Ordering::Relaxed);
        for outbox in self.jobs().values() {
            outbox.room.notify_waiters();
        }
    }

    /// Whether the agent holds `job_id`.
    pub fn contains(&self, job_id: &str) -> bool {
        self.jobs().contains_key(job_id)
    }

    /// Every outbox, in job id order.
    pub fn all(&self) -> Vec<Arc<Outbox>> {
        self.jobs().values().cloned().collect()
    }

    /// Applies a log acknowledgement.
    pub fn ack(&self, ack: &v1::LogAck) {
        let stream = match ack.stream() {
            v1::OutputStream::Stdout => Stream::Stdout,
            v1::OutputStream::Stderr => Stream::Stderr,
            v1::OutputStream::Unspecified => return,
        };
        let outbox = self.jobs().get(&ack.job_id).cloned();
        if let Some(outbox) = outbox {
            outbox.ack(stream, ack.stored);
        }
    }

    /// The hub has stored the job's result: once its output is acknowledged too, the agent
    /// owes nothing more for it and forgets it. Returns whether it was forgotten.
    pub fn result_acked(&self, job_id: &str) -> bool {
        let mut jobs = self.jobs();
        let drained = jobs.get(job_id).is_some_and(|outbox| Outbox::drained(&outbox.state()));
        if drained {
            jobs.remove(job_id);
        }
        drained
    }

    /// Wakes the sessions.
    pub fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes with every [`Outboxes::notify`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(out: &Unsent) -> Vec<(u64, Vec<u8>)> {
        out.logs.iter().map(|b| (b.offset, b.data.to_vec())).collect()
    }

    #[test]
    fn a_new_session_resends_exactly_what_was_not_acknowledged() {
        let boxes = Outboxes::default();
        let outbox = boxes.open("j", 7).unwrap();
        outbox.push(Stream::Stdout, 0, b"hello ".to_vec());
        outbox.push(Stream::Stdout, 6, b"world".to_vec());
        let mut first = outbox.cursor();
        let sent = outbox.take_unsent(&mut first, 4);
        assert_eq!(sent.accepted.as_ref().map(|a| a.pid), Some(7));
        let bytes: Vec<u8> = sent.logs.iter().flat_map(|b| b.data.to_vec()).collect();
        assert_eq!(bytes, b"hello world");
        assert!(sent.logs.iter().all(|b| b.data.len() <= 4));
        assert!(outbox.take_unsent(&mut first, 4).logs.is_empty(), "nothing twice on one session");

        // The hub stored 8 bytes, then the session dropped.
        outbox.ack(Stream::Stdout, 8);
        assert_eq!(outbox.held_bytes(), 3);
        let mut second = outbox.cursor();
        assert_eq!(data(&outbox.take_unsent(&mut second, 1024)), vec![(8, b"rld".to_vec())]);
    }

    #[test]
    fn the_result_follows_the_output_and_is_forgotten_only_once_all_is_acknowledged() {
        let boxes = Outboxes::default();
        let outbox = boxes.open("j", 1).unwrap();
        assert!(boxes.open("j", 2).is_none(), "a known job is not opened twice");
        outbox.push(Stream::Stderr, 0, b"oops".to_vec());
        outbox.finish(v1::JobResult { job_id: "j".into(), ..v1::JobResult::default() });
        let mut cursor = outbox.cursor();
        let sent = outbox.take_unsent(&mut cursor, 1024);
        assert!(sent.accepted.is_none(), "a finished job is not announced as running");
        assert_eq!(data(&sent), vec![(0, b"oops".to_vec())]);
        assert!(sent.result.is_some());
        assert!(!boxes.result_acked("j"), "stderr is not acknowledged yet");
        boxes.ack(&v1::LogAck { job_id: "j".into(), stream: v1::OutputStream::Stderr.into(), stored: 4 });
        assert!(boxes.result_acked("j"));
        assert!(!boxes.contains("j"));
    }

    #[test]
    fn a_resume_offset_past_the_last_ack_skips_what_the_hub_already_has() {
        let boxes = Outboxes::default();
        let outbox = boxes.open("j", 1).unwrap();
        outbox.push(Stream::Stdout, 0, b"abcdef".to_vec());
        // Welcome says the hub stored 4 bytes, though this agent never saw that ack.
        boxes.ack(&v1::LogAck { job_id: "j".into(), stream: v1::OutputStream::Stdout.into(), stored: 4 });
        let mut cursor = outbox.cursor();
        assert_eq!(data(&outbox.take_unsent(&mut cursor, 1024)), vec![(4, b"ef".to_vec())]);
        // An ack beyond what was produced cannot push past the end.
        outbox.ack(Stream::Stdout, 100);
        assert_eq!(outbox.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_full_outbox_waits_for_an_ack() {
        let boxes = Outboxes::default();
        let outbox = boxes.open("j", 1).unwrap();
        outbox.push(Stream::Stdout, 0, vec![b'x'; MAX_HELD_BYTES]);
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no room until an ack");
        outbox.ack(Stream::Stdout, 1);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_negotiated_bound_pauses_a_job_below_the_agent_s_own() {
        let boxes = Outboxes::default();
        boxes.set_max_held(1024);
        let outbox = boxes.open("j", 1).unwrap();
        outbox.push(Stream::Stdout, 0, vec![b'x'; 1024]);
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "1 KiB held: the hub's bound is reached");
        // A later session's Welcome allows more: the paused job goes on without an ack.
        boxes.set_max_held(4096);
        tokio::time::timeout(std::time::Duration::from_secs(60), waiting).await.expect("hung").unwrap();
        // Never above the agent's own bound, whatever the hub says.
        boxes.set_max_held(usize::MAX);
        assert_eq!(boxes.max_held.load(Ordering::Relaxed), MAX_HELD_BYTES);
    }
}
