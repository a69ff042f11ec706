use std::fmt;
use std::sync::Arc;

use crate::observe::Observer;

/// Limits and settings of an engine.
#[derive(Clone)]
#[non_exhaustive]
pub struct EngineConfig {
    /// The largest encoded saga input, step input or step output accepted, in bytes.
    pub max_payload_bytes: usize,
    /// How many engine events a slow subscriber may fall behind before it misses some.
    pub event_buffer: usize,
    /// Set by [`EngineBuilder::observer`](crate::EngineBuilder::observer): kept here, with
    /// what the engine's parts already share, rather than in a field of its own beside it.
    pub(crate) observer: Option<Arc<dyn Observer>>,
}

impl fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineConfig")
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("event_buffer", &self.event_buffer)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl Default for EngineConfig {
    /// 2 MiB payloads (Temporal's limit too), 4096 buffered events, no observer.
    fn default() -> Self {
        Self { max_payload_bytes: 2 << 20, event_buffer: 4096, observer: None }
    }
}
