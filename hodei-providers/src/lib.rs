//! hodei-providers: where workers come from.
//!
//! - [`provider`]: the [`Provider`] trait every kind of worker implements, its spec, states
//!   and typed errors.
//! - [`local`]: workers on this machine, in-process or as child processes, over real mutual TLS
//!   on loopback: the embedded default.
//! - [`scheduler`]: the [`Scheduler`], which matches jobs to providers, caps and queues them,
//!   provisions workers on demand, reuses or destroys them, and reaps orphans.
//! - [`control_plane`]: the [`ControlPlane`], the embedded default in one builder: PKI, log
//!   store, hub listeners and scheduler.
//! - `docker` (feature `docker`): workers as Docker containers, through the engine's API.
//! - `kubernetes` (feature `kubernetes`): workers as Kubernetes pods, followed with watches;
//!   the CA bundle reaches the pod in a ConfigMap, the token in its environment.
//! - `firecracker` (feature `firecracker`): workers as Firecracker microVMs, through the VMM's
//!   API on its Unix socket; the registration token reaches the guest through MMDS.

pub mod control_plane;
#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "firecracker")]
pub mod firecracker;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod local;
pub mod provider;
pub mod scheduler;

pub use control_plane::{ControlPlane, ControlPlaneBuilder, ControlPlaneError};
pub use local::{Launch, LocalProvider};
pub use provider::{
    AgentEnv, MANAGED_BY_LABEL, MANAGED_BY_VALUE, Provider, ProviderError, SAGA_ID_LABEL, WORKER_ID_LABEL,
    WorkerInfo, WorkerSpec, WorkerState,
};
pub use scheduler::{
    ProviderPolicy, ReapReport, Reuse, Scheduler, SchedulerBuilder, SchedulerCounts, SchedulerError,
};
