use std::time::Duration;

use super::state::Engine;
use crate::error::Result;
use crate::event::{SagaId, Timestamp};

impl Engine {
    /// Deletes every finished saga that has not changed for `older_than`. Returns their ids.
    pub fn purge(&self, older_than: Duration) -> Result<Vec<SagaId>> {
        let cutoff = Timestamp(self.inner.timers.now().0.saturating_sub(older_than.as_millis() as u64));
        let mut purged = Vec::new();
        for record in self.inner.store.records()? {
            if record.status.is_final() && record.updated_at <= cutoff {
                self.inner.store.remove(&record.id)?;
                purged.push(record.id);
            }
        }
        Ok(purged)
    }
}
