use tokio::sync::broadcast;

use super::filter::SagaFilter;
use super::registry::DefinitionInfo;
use super::state::Engine;
use crate::bus::EngineEvent;
use crate::error::{Error, Result};
use crate::event::{RecordedEvent, SagaId, SagaRecord};

impl Engine {
    /// The saga's summary record, with its current status.
    pub fn status(&self, id: &SagaId) -> Result<SagaRecord> {
        if let Some(live) = self.inner.live(id) {
            return Ok(live.journal.record());
        }
        self.inner.store.record(id)?.ok_or_else(|| Error::SagaNotFound(id.clone()))
    }

    /// The sagas that match the filter, in id order.
    pub fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaRecord>> {
        let mut records = self.inner.store.records()?;
        records.retain(|r| filter.matches(r));
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// Every registered definition, by name then version: what runs can be started as.
    pub fn definitions(&self) -> Vec<DefinitionInfo> {
        self.inner.registry.all()
    }

    /// Whether a journaled input of `definition` and a new one hold the same value of its
    /// input type; byte equality for a definition not registered here, whose type is unknown.
    pub(crate) fn same_input(
        &self,
        definition: &str,
        version: Option<u32>,
        recorded: &[u8],
        new: &[u8],
    ) -> Result<bool, String> {
        match self.inner.registry.get(definition, version) {
            Some(definition) => (definition.input.same)(recorded, new),
            None => Ok(recorded == new),
        }
    }

    /// The saga's whole journal, with timestamps.
    pub fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        let history = self.inner.store.history(id)?;
        if history.is_empty() {
            return Err(Error::SagaNotFound(id.clone()));
        }
        Ok(history)
    }

    /// Everything the engine journals and every status change, as it happens. A subscriber
    /// that falls more than [`EngineConfig::event_buffer`](crate::EngineConfig::event_buffer) events behind gets
    /// `RecvError::Lagged` and can catch up from [`history`](Self::history).
    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.inner.bus.subscribe()
    }
}
