//! A worker spec for the unit tests.

use crate::AgentEnv;
use crate::Resources;
use crate::provider::WorkerSpec;

pub(super) fn spec(cpu_millis: Option<u64>, memory_bytes: Option<u64>) -> WorkerSpec {
    let mut spec = WorkerSpec::new("w-1", AgentEnv::new("127.0.0.1:1", "127.0.0.1:2", "secret-token", "PEM"));
    spec.resources = Resources::new(cpu_millis, memory_bytes);
    spec
}
