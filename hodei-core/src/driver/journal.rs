use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::bus::{EngineEvent, EngineEventKind};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};
use crate::lock::lock;
use crate::store::EventStore;

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
}

impl Journal {
    pub fn new(
        store: Arc<dyn EventStore>,
        bus: broadcast::Sender<EngineEvent>,
        record: SagaRecord,
        next: u64,
        finished: bool,
    ) -> Self {
        let state = Mutex::new(JournalState { next, record, finished, pending: Vec::new() });
        Self { id: record_id(&state), store, bus, state }
    }

    pub fn record(&self) -> SagaRecord {
        lock(&self.state).record.clone()
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
        state.pending.push(RecordedEvent { seq, at: Timestamp::now(), event });
        Ok(())
    }

    /// Writes whatever is staged and waits until it is on disk.
    pub async fn sync(&self) -> Result<()> {
        if lock(&self.state).pending.is_empty() {
            return Ok(());
        }
        self.write(None, None)?;
        self.store.durable().await
    }

    /// Changes the status without waiting for durability.
    pub fn write_status(&self, status: SagaStatus) -> Result<()> {
        self.write(None, Some(status)).map(drop)
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
        self.store.durable().await?;
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
        self.store.durable().await?;
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
        let at = Timestamp::now();
        let event = event(at);
        if state.finished && event.is_some() {
            return Err(Error::SagaFinished(self.id.clone()));
        }
        let seq = state.next + state.pending.len() as u64;
        let recorded = event.map(|event| RecordedEvent { seq, at, event });
        let record = status.as_ref().map(|status| {
            let mut record = state.record.clone();
            record.status = status.clone();
            record.updated_at = at;
            record
        });
        let mut batch = std::mem::take(&mut state.pending);
        batch.extend(recorded.iter().cloned());
        if let Err(e) = self.store.append(&self.id, &batch, record.as_ref()) {
            batch.truncate(batch.len() - recorded.is_some() as usize);
            state.pending = batch;
            return Err(e);
        }
        state.next += batch.len() as u64;
        state.finished = batch.last().is_some_and(|r| r.event.is_final());
        if self.bus.receiver_count() > 0 {
            for recorded in batch {
                self.publish(EngineEventKind::Journaled(recorded));
            }
        }
        if let Some(record) = record {
            self.publish(EngineEventKind::Status(record.status.clone()));
            state.record = record;
        }
        Ok(recorded)
    }
}
