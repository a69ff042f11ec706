/// Limits and settings of an engine.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EngineConfig {
    /// The largest encoded saga input, step input or step output accepted, in bytes.
    pub max_payload_bytes: usize,
    /// How many engine events a slow subscriber may fall behind before it misses some.
    pub event_buffer: usize,
}

impl Default for EngineConfig {
    /// 2 MiB payloads (Temporal's limit too), 4096 buffered events.
    fn default() -> Self {
        Self { max_payload_bytes: 2 << 20, event_buffer: 4096 }
    }
}
