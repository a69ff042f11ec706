//! What a job asks of its worker's machine, which a provider turns into its own limits.

use serde::{Deserialize, Serialize};

/// What a job asks of its worker's machine. `None` leaves the provider's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Resources {
    /// CPU, in thousandths of a core.
    pub cpu_millis: Option<u64>,
    /// Memory, in bytes.
    pub memory_bytes: Option<u64>,
}

impl Resources {
    /// Limits of `cpu_millis` thousandths of a core and `memory_bytes` bytes.
    pub fn new(cpu_millis: Option<u64>, memory_bytes: Option<u64>) -> Self {
        Self { cpu_millis, memory_bytes }
    }
}
