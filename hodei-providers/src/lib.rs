//! hodei-providers: where workers come from. The control plane (`hodei-server`) asks them for
//! workers through its scheduler; the workers run `hodei-agent`.
//!
//! - [`provider`]: the [`Provider`] trait every kind of worker implements, its spec, states
//!   and typed errors.
//! - [`local`]: workers on this machine, in-process or as child processes, over real mutual TLS
//!   on loopback: the embedded default.
//! - [`Resources`]: what a job asks of its worker's machine.
//! - `docker` (feature `docker`): workers as Docker containers, through the engine's API.
//! - `kubernetes` (feature `kubernetes`): workers as Kubernetes pods, followed with watches;
//!   the CA bundle reaches the pod in a ConfigMap, the token in its environment.
//! - `firecracker` (feature `firecracker`): workers as Firecracker microVMs, through the VMM's
//!   API on its Unix socket; the registration token reaches the guest through MMDS.

#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "firecracker")]
pub mod firecracker;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod local;
pub mod provider;
pub mod resources;

pub use local::{Launch, LocalProvider};
pub use provider::{
    AgentEnv, MANAGED_BY_LABEL, MANAGED_BY_VALUE, Provider, ProviderError, SAGA_ID_LABEL, WORKER_ID_LABEL,
    WorkerInfo, WorkerSpec, WorkerState,
};
pub use resources::Resources;
