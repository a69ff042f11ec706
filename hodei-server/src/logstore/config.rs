//! How the store behaves: the per-stream cap.

/// The default per-stream cap: 64 MiB (see [the module documentation](crate::logstore) for why).
pub const DEFAULT_MAX_STREAM_BYTES: u64 = 64 * 1024 * 1024;

/// How the store behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogStoreConfig {
    /// How many bytes of each stream of a job are stored; the rest is counted and dropped
    /// behind a visible marker.
    pub max_stream_bytes: u64,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self { max_stream_bytes: DEFAULT_MAX_STREAM_BYTES }
    }
}

impl LogStoreConfig {
    /// Sets the per-stream cap.
    pub fn with_max_stream_bytes(mut self, max_stream_bytes: u64) -> Self {
        self.max_stream_bytes = max_stream_bytes;
        self
    }
}
