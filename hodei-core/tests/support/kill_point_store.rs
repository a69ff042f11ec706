//! A store that offers the crash harness a kill point on each side of every write: before it
//! reaches the store, once it is written but not yet durable, and once it is durable but
//! before the engine has been told. Wrapped around the real sled store in a child process, it
//! lets the parent SIGKILL the engine exactly in those windows instead of hoping a random
//! kill lands there.

use hodei_core::store::Durable;
use hodei_core::{EventStore, RecordedEvent, SagaId, SagaRecord};
use hodei_core::{Result, StorageError};
use tokio::sync::oneshot;

use super::crash::{Window, kill_point};
use super::event_name;

#[derive(Debug)]
pub struct KillPointStore<S> {
    inner: S,
}

impl<S: EventStore> KillPointStore<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// Runs one write between its two kill points.
    fn write(&self, what: &str, write: impl FnOnce(&S) -> Result<()>) -> Result<()> {
        kill_point(Window::StoreBeforeWrite, what);
        write(&self.inner)?;
        kill_point(Window::StoreWritten, what);
        Ok(())
    }
}

/// What a write holds, for the kill-point line.
fn describe(op: &str, id: &SagaId, events: &[RecordedEvent]) -> String {
    let kinds: Vec<String> = events.iter().map(|e| format!("{}:{}", e.seq, event_name(&e.event))).collect();
    format!("{op} {} [{}]", id.as_str(), kinds.join(" "))
}

impl<S: EventStore> EventStore for KillPointStore<S> {
    fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>> {
        let what = describe("create", &record.id, std::slice::from_ref(first));
        let mut existing = None;
        self.write(&what, |inner| {
            existing = inner.create(record, first)?;
            Ok(())
        })?;
        Ok(existing)
    }

    fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()> {
        self.write(&describe("append", id, events), |inner| inner.append(id, events, record))
    }

    /// The kill point comes once the inner store has made everything durable and before the
    /// engine's wait returns: what a crash right after an fsync leaves.
    fn durable(&self) -> Durable {
        let inner = self.inner.durable();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let result = inner.await.map_err(|e| StorageError::message(e.to_string()));
            if result.is_ok() {
                // The kill point blocks until the parent answers: not on a runtime thread.
                let _ = tokio::task::spawn_blocking(|| kill_point(Window::StoreDurable, "durable")).await;
            }
            let _ = tx.send(result);
        });
        Durable::waiting(rx)
    }

    fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        self.inner.history(id)
    }

    fn record(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        self.inner.record(id)
    }

    fn in_flight(&self) -> Result<Vec<SagaRecord>> {
        self.inner.in_flight()
    }

    fn records(&self) -> Result<Vec<SagaRecord>> {
        self.inner.records()
    }

    fn remove(&self, id: &SagaId) -> Result<()> {
        self.inner.remove(id)
    }
}
