//! hodei-providers: where workers come from.
//!
//! - [`provider`]: the [`Provider`] trait every kind of worker implements, its spec, states
//!   and typed errors.
//! - `firecracker` (feature `firecracker`): workers as Firecracker microVMs, through the VMM's
//!   API on its Unix socket; the registration token reaches the guest through MMDS.

#[cfg(feature = "firecracker")]
pub mod firecracker;
pub mod provider;

pub use provider::{
    AgentEnv, MANAGED_BY_LABEL, MANAGED_BY_VALUE, Provider, ProviderError, SAGA_ID_LABEL, WORKER_ID_LABEL,
    WorkerInfo, WorkerSpec, WorkerState,
};
