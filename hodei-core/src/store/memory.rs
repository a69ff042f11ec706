use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use super::{Durable, EventStore, check_sequence};
use crate::error::{Error, Result};
use crate::event::{RecordedEvent, SagaId, SagaRecord};

/// A store in memory: nothing survives the process. For tests, and for users who want sagas
/// without persistence.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    sagas: BTreeMap<SagaId, (SagaRecord, Vec<RecordedEvent>)>,
    in_flight: BTreeSet<SagaId>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied write: every write below
        // validates first and mutates after, so the data stays consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl EventStore for MemoryStore {
    fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>> {
        let mut state = self.state();
        if let Some((existing, _)) = state.sagas.get(&record.id) {
            return Ok(Some(existing.clone()));
        }
        check_sequence(&record.id, std::slice::from_ref(first), 0)?;
        state.sagas.insert(record.id.clone(), (record.clone(), vec![first.clone()]));
        if !record.status.is_final() {
            state.in_flight.insert(record.id.clone());
        }
        Ok(None)
    }

    fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()> {
        let mut state = self.state();
        let Some((stored, journal)) = state.sagas.get_mut(id) else {
            return Err(Error::SagaNotFound(id.clone()));
        };
        check_sequence(id, events, journal.len() as u64)?;
        journal.extend_from_slice(events);
        if let Some(record) = record {
            *stored = record.clone();
            if record.status.is_final() {
                state.in_flight.remove(id);
            } else {
                state.in_flight.insert(id.clone());
            }
        }
        Ok(())
    }

    fn durable(&self) -> Durable {
        Durable::ready()
    }

    fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        Ok(self.state().sagas.get(id).map(|(_, journal)| journal.clone()).unwrap_or_default())
    }

    fn record(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        Ok(self.state().sagas.get(id).map(|(record, _)| record.clone()))
    }

    fn in_flight(&self) -> Result<Vec<SagaRecord>> {
        let state = self.state();
        Ok(state.in_flight.iter().filter_map(|id| state.sagas.get(id)).map(|(r, _)| r.clone()).collect())
    }

    fn records(&self) -> Result<Vec<SagaRecord>> {
        Ok(self.state().sagas.values().map(|(record, _)| record.clone()).collect())
    }

    fn records_after(
        &self,
        after: Option<&SagaId>,
        limit: usize,
        keep: &dyn Fn(&SagaRecord) -> bool,
    ) -> Result<Vec<SagaRecord>> {
        let state = self.state();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(state
            .sagas
            .range::<SagaId, _>((from, Bound::Unbounded))
            .map(|(_, (record, _))| record)
            .filter(|record| keep(record))
            .take(limit)
            .cloned()
            .collect())
    }

    fn remove(&self, id: &SagaId) -> Result<()> {
        let mut state = self.state();
        state.sagas.remove(id);
        state.in_flight.remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn memory_store_conforms() {
        conformance::run_all(&MemoryStore::new()).await;
    }
}
