use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use super::observed::Observed;
use crate::bus::{EngineEvent, EngineEventKind};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};
use crate::lock::lock;
use crate::observe::Observer;
use crate::store::EventStore;
use crate::store::leases::APPLYING;

fn record_id(state: &Mutex<JournalState>) -> SagaId {
    lock(state).record.id.clone()
}

/// The only writer of one saga's journal. It numbers events, stamps them, writes them and
/// tells subscribers.
pub(crate) struct Journal {
    pub id: SagaId,
    store: Arc<dyn EventStore>,
    bus: broadcast::Sender<EngineEvent>,
    state: Mutex<JournalState>,
    /// Why this journal takes no more writes, if it does not ([`Halt`] as a number; 0: it
    /// does). Not even why the saga stopped is written then.
    halt: AtomicU8,
    /// Told when the journal halts (the saga's `Control::handed_over`): another engine took
    /// the saga, or the database failed and the saga is resumed from its journal there. Either
    /// way the attempts dropped with this driver leave their jobs running for the next one.
    handed_over: Arc<watch::Sender<bool>>,
    /// What stamps its events.
    clock: Clock,
}

/// Why a journal takes no more writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Halt {
    /// The store refused a write because another engine owns the saga now.
    Fenced = 1,
    /// A write failed on a store shared by several engines (the database went away), or on one
    /// that says when it takes writes again (a full disk): the saga is resumed from its journal
    /// as the store has it, once it answers again, instead of being parked for what may be a
    /// restart of the database or space soon freed.
    Unwritten = 2,
}

struct JournalState {
    next: u64,
    record: SagaRecord,
    /// Set once a final event is written: nothing may follow it.
    finished: bool,
    /// Numbered but not yet written: events whose loss in a crash changes nothing the body
    /// has seen (a group's start, a branch's end before the group returns, a timer that fired)
    /// wait here for the saga's next write, so that they cost no flush of their own.
    pending: Vec<RecordedEvent>,
    /// Set while the saga is paused: the status it has under the pause (running or
    /// compensating). The record shows `Paused` instead, and the driver's own changes between
    /// the two land here until the pause is lifted.
    under_pause: Option<SagaStatus>,
    /// The engine's observer, once the saga is adopted; `None` (the default) costs nothing.
    observed: Option<Observed>,
}

impl Journal {
    pub fn new(
        store: Arc<dyn EventStore>,
        bus: broadcast::Sender<EngineEvent>,
        record: SagaRecord,
        next: u64,
        finished: bool,
        clock: Clock,
    ) -> Self {
        let state = Mutex::new(JournalState {
            next,
            record,
            finished,
            pending: Vec::new(),
            under_pause: None,
            observed: None,
        });
        Self {
            id: record_id(&state),
            store,
            bus,
            state,
            halt: AtomicU8::new(0),
            handed_over: Arc::default(),
            clock,
        }
    }

    pub fn record(&self) -> SagaRecord {
        lock(&self.state).record.clone()
    }

    /// Tells `observer` what every event written from now on says; `history` is the journal
    /// so far, which it does not observe again.
    pub fn observe(&self, observer: Arc<dyn Observer>, history: &[RecordedEvent]) {
        lock(&self.state).observed = Some(Observed::new(observer, history));
    }

    fn publish(&self, kind: EngineEventKind) {
        if self.bus.receiver_count() > 0 {
            let _ = self.bus.send(EngineEvent { saga_id: self.id.clone(), kind });
        }
    }

    /// Numbers an event and keeps it for the saga's next write.
    pub fn stage(&self, event: Event) -> Result<()> {
        let mut state = lock(&self.state);
        if state.finished {
            return Err(Error::SagaFinished(self.id.clone()));
        }
        let seq = state.next + state.pending.len() as u64;
        state.pending.push(RecordedEvent { seq, at: self.clock.now(), event });
        Ok(())
    }

    /// Writes whatever is staged and waits until it is on disk.
    pub async fn sync(&self) -> Result<()> {
        if lock(&self.state).pending.is_empty() {
            return Ok(());
        }
        self.write(None, None)?;
        self.durable().await
    }

    /// What says the saga is handed over to its next driver: set when the journal halts, and
    /// by the engine when another one took the saga.
    pub fn handed_over(&self) -> Arc<watch::Sender<bool>> {
        self.handed_over.clone()
    }

    /// Why the journal takes no more writes, if it does not.
    pub fn halted(&self) -> Option<Halt> {
        match self.halt.load(Ordering::Acquire) {
            1 => Some(Halt::Fenced),
            2 => Some(Halt::Unwritten),
            _ => None,
        }
    }

    /// Waits until what was written is durable, noting a refusal for a lost lease.
    async fn durable(&self) -> Result<()> {
        self.store.durable().await.map_err(|e| self.noted(e))
    }

    fn noted(&self, error: Error) -> Error {
        let halt = match &error {
            Error::Fenced(_) => Halt::Fenced,
            Error::Storage { .. } if self.store.leases().is_some() || self.store.writable().is_some() => {
                Halt::Unwritten
            }
            // On a shared store the database's journal is the truth: one that moved on without
            // this driver (which should not happen while the epochs fence) is read again and
            // replayed, which is safe, rather than parking a saga that has nothing wrong.
            Error::SequenceConflict { .. } if self.store.leases().is_some() => {
                tracing::warn!(error = %error, "the journal in the database moved on; the saga is read again");
                Halt::Unwritten
            }
            _ => return error,
        };
        // A fence is final; a failed write does not hide one found before.
        let _ = self.halt.compare_exchange(0, halt as u8, Ordering::AcqRel, Ordering::Acquire);
        self.handed_over.send_replace(true);
        error
    }

    /// Changes the status without waiting for durability; nothing is written if the record
    /// already shows it (a paused saga shows `Paused` for running and compensating).
    pub fn write_status(&self, status: SagaStatus) -> Result<()> {
        let mut state = lock(&self.state);
        if self.shown(&state, &status) == state.record.status {
            if state.under_pause.is_some() {
                state.under_pause = Some(status);
            }
            return Ok(());
        }
        self.write_locked(&mut state, |_| None, Some(status)).map(drop)
    }

    /// Marks the saga paused as its journal says it is, with the status it has under the
    /// pause; the record is not written (see [`write_status`](Self::write_status)).
    pub fn restore_pause(&self, under: SagaStatus) {
        lock(&self.state).under_pause = Some(under);
    }

    /// Journals `event` (a pause) and shows the saga as paused, durably. `Ok(None)` if it was
    /// paused already: nothing is written. Only a running or compensating saga can be paused.
    pub async fn pause(&self, event: Event) -> Result<Option<RecordedEvent>> {
        let recorded = {
            let mut state = lock(&self.state);
            if state.under_pause.is_some() {
                return Ok(None);
            }
            let under = state.record.status.clone();
            if !matches!(under, SagaStatus::Running | SagaStatus::Compensating) {
                return Err(Error::InvalidState { id: self.id.clone(), status: under, action: "pause" });
            }
            let recorded = self.write_locked(&mut state, |_| Some(event), Some(SagaStatus::Paused))?;
            state.under_pause = Some(under);
            recorded
        };
        self.durable().await?;
        Ok(recorded)
    }

    /// Journals `event` (a resume, or a cancel) and, if the saga is paused, lifts the pause:
    /// the record shows the status under it again, durably. With `only_if_paused`, a saga
    /// that is not paused gets nothing written and `Ok(None)`.
    pub async fn lift_pause(&self, event: Event, only_if_paused: bool) -> Result<Option<RecordedEvent>> {
        let recorded = {
            let mut state = lock(&self.state);
            if only_if_paused && state.under_pause.is_none() {
                return Ok(None);
            }
            let under = state.under_pause.take();
            let written = self.write_locked(&mut state, |_| Some(event), under.clone());
            if written.is_err() {
                state.under_pause = under;
            }
            written?
        };
        self.durable().await?;
        Ok(recorded)
    }

    fn shown(&self, state: &JournalState, status: &SagaStatus) -> SagaStatus {
        match status {
            SagaStatus::Running | SagaStatus::Compensating if state.under_pause.is_some() => {
                SagaStatus::Paused
            }
            other => other.clone(),
        }
    }

    /// Writes an event and waits until it is on disk.
    pub async fn append_durable(&self, event: Event) -> Result<RecordedEvent> {
        self.append_durable_at(|_| event).await
    }

    /// Writes an event built from the time it is recorded at, and waits until it is on disk.
    /// An event that names a time relative to itself (a retry due after a backoff) takes it
    /// from the same clock reading as its record, so the journal shows the declared interval
    /// exactly.
    pub async fn append_durable_at(&self, event: impl FnOnce(Timestamp) -> Event) -> Result<RecordedEvent> {
        let recorded = self.write_at(|at| Some(event(at)), None)?;
        self.durable().await?;
        recorded.ok_or_else(|| Error::SagaFinished(self.id.clone()))
    }

    /// Writes an optional event together with a new status, atomically, and waits until both
    /// are on disk.
    pub async fn transition(
        &self,
        event: Option<Event>,
        status: SagaStatus,
    ) -> Result<Option<RecordedEvent>> {
        let recorded = self.write(event, Some(status))?;
        self.durable().await?;
        Ok(recorded)
    }

    fn write(&self, event: Option<Event>, status: Option<SagaStatus>) -> Result<Option<RecordedEvent>> {
        self.write_at(|_| event, status)
    }

    fn write_at(
        &self,
        event: impl FnOnce(Timestamp) -> Option<Event>,
        status: Option<SagaStatus>,
    ) -> Result<Option<RecordedEvent>> {
        let mut state = lock(&self.state);
        self.write_locked(&mut state, event, status)
    }

    fn write_locked(
        &self,
        state: &mut JournalState,
        event: impl FnOnce(Timestamp) -> Option<Event>,
        status: Option<SagaStatus>,
    ) -> Result<Option<RecordedEvent>> {
        match self.halted() {
            Some(Halt::Fenced) => return Err(Error::Fenced(self.id.clone())),
            // What this journal numbered after the failed write may not be where the database
            // is: only a journal read again from it may write.
            Some(Halt::Unwritten) => {
                return Err(Error::Storage {
                    operation: "writing a journal",
                    source: crate::error::StorageError::message(
                        "an earlier write failed; the saga resumes later",
                    ),
                });
            }
            None => {}
        }
        let at = self.clock.now();
        let event = event(at);
        if state.finished && event.is_some() {
            return Err(Error::SagaFinished(self.id.clone()));
        }
        let seq = state.next + state.pending.len() as u64;
        let recorded = event.map(|event| RecordedEvent { seq, at, event });
        let record = status.as_ref().map(|status| {
            let mut record = state.record.clone();
            record.status = self.shown(state, status);
            record.updated_at = at;
            record
        });
        let mut batch = std::mem::take(&mut state.pending);
        batch.extend(recorded.iter().cloned());
        // Under the journal's lock, so that no other write of this saga comes between.
        if let (Ok(request), Some(leases)) = (APPLYING.try_with(|request| *request), self.store.leases()) {
            leases.applying(&self.id, request);
        }
        if let Err(e) = self.store.append(&self.id, &batch, record.as_ref()) {
            batch.truncate(batch.len() - recorded.is_some() as usize);
            state.pending = batch;
            return Err(self.noted(e));
        }
        state.next += batch.len() as u64;
        state.finished = batch.last().is_some_and(|r| r.event.is_final());
        // Once the store took the batch, not once it is durable: the events are in the journal
        // then, and each is written once, so every count is exact; a flush that fails stops
        // the saga, whose events are still those.
        if let Some(observed) = &mut state.observed {
            observed.saw(&state.record, &batch);
        }
        if self.bus.receiver_count() > 0 {
            for recorded in batch {
                self.publish(EngineEventKind::Journaled(recorded));
            }
        }
        if let Some(record) = record {
            self.publish(EngineEventKind::Status(record.status.clone()));
            state.record = record;
        }
        match status {
            Some(status @ (SagaStatus::Running | SagaStatus::Compensating))
                if state.under_pause.is_some() =>
            {
                state.under_pause = Some(status);
            }
            // A saga that finishes or parks while paused is no longer paused: the pause held
            // back its next operation, and it has none.
            Some(SagaStatus::Paused) | None => {}
            Some(_) => state.under_pause = None,
        }
        Ok(recorded)
    }
}
