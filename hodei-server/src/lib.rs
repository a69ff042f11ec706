//! hodei-server: the control plane that workers dial.
//!
//! Inside-out: every worker runs `hodei-agent`, which dials this control plane's hub over gRPC
//! with mutual TLS; the worker opens no port. Jobs run as durable saga steps ([`jobs`]) and
//! outlive the connection: output is resent from the last acknowledged offset, and a restarted
//! control plane re-attaches to jobs that went on without it.
//! - [`pki`]: the embedded CA, one-time registration tokens, revocation and the record of
//!   certified workers;
//! - [`hub`]: the registration and mutual-TLS session listeners (tonic over the PKI's rustls
//!   configurations): registration, the Hello/Welcome handshake, heartbeats, the registry of
//!   connected workers, and running a job on a worker with its output stored;
//! - [`logstore`]: the per-job log files: offsets acknowledged only once on disk, resends stored
//!   once, a visible truncation marker past the cap, and following;
//! - [`jobs`]: remote jobs as durable saga steps: the journaled job (secret names only), secret
//!   sources resolved at dispatch, and the step whose job id is its idempotency key;
//! - [`scheduler`]: the [`Scheduler`], which matches jobs to `hodei-providers`' providers, caps
//!   and queues them, provisions workers on demand, reuses or destroys them, and reaps orphans;
//! - [`control_plane`]: the [`ControlPlane`], the embedded default in one builder: PKI, log
//!   store, hub listeners and scheduler;
//! - [`metrics`]: Prometheus metrics of the engine, the control plane and the API, served at
//!   `/metrics` by the operator API;
//! - [`api`]: the operator API's bearer tokens (named, with a role, stored hashed);
//! - [`files`]: the small files of the data directory, written atomically;
//! - [`node`]: the [`Node`], one call that opens the data directory and starts the journal, the
//!   control plane and the engine, with the job dispatcher as the engine's resource.

pub mod api;
pub mod control_plane;
pub mod files;
pub mod hub;
pub mod jobs;
pub mod logstore;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod pki;
pub mod scheduler;

/// What the fuzz targets in `fuzz/` call: the hub's sessions and registrations without their
/// listeners' TLS. Only in builds with `--cfg fuzzing` (`cargo fuzz`); not an API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod __fuzz {
    pub use crate::hub::fuzz::{max_session_message, register, session};
}

pub use control_plane::{ControlPlane, ControlPlaneBuilder, ControlPlaneError};
pub use node::{Node, NodeBuilder, NodeError};
pub use scheduler::{
    ProviderPolicy, ReapReport, Reuse, Scheduler, SchedulerBuilder, SchedulerCounts, SchedulerError,
};
