//! Where the engine hands its observer ([`EngineBuilder::observer`]) to the runs it starts and
//! adopts.
//!
//! [`EngineBuilder::observer`]: super::EngineBuilder::observer

use super::state::Inner;
use crate::driver::LiveSaga;
use crate::event::RecordedEvent;

impl Inner {
    /// Observes what `live`'s journal is written from now on; `history` is what it holds.
    pub(super) fn observe_live(&self, live: &LiveSaga, history: &[RecordedEvent]) {
        if let Some(observer) = &self.config.observer {
            live.journal.observe(observer.clone(), history);
        }
    }

    /// A run of `definition` was created. Its first event is written by the store's `create`,
    /// not by its journal, so it is observed here.
    pub(super) fn observe_start(&self, definition: &str) {
        if let Some(observer) = &self.config.observer {
            observer.saga_started(definition);
        }
    }
}
