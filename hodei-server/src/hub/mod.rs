//! The control plane's side of the agent protocol: the registration and session listeners.
//!
//! Two listeners, because they authenticate differently: `Register` runs over TLS that
//! authenticates the hub only (the agent has no certificate yet), `Session` over mutual TLS
//! whose client certificate is checked by the PKI's revocation-checking verifier. Each listener
//! accepts TCP and does the TLS handshake itself with the PKI's rustls configuration, so that no
//! other verifier can be configured by mistake.
//!
//! Sessions serve the handshake, heartbeats and jobs: [`Hub::run_job`] assigns a job on a
//! worker's session, stores its output in the hub's [`LogStore`] (acknowledging batches with
//! the offsets a sync made durable; one sync covers every batch that arrived while the previous
//! one ran) and resolves with the worker's result. Each session
//! task owns its jobs' state; callers reach it through a command channel, so nothing is shared
//! between sessions but the registry. A session that ends fails the jobs waited on it with
//! [`HubError::WorkerLost`]; the caller's next attempt ([`Hub::resume_job`]) finds the job's
//! stored result, or re-attaches to it once its agent reconnects, or runs it again.
//!
//! [`LogStore`]: crate::logstore::LogStore

mod assignment;
mod cancels;
mod command;
mod conduct;
mod config;
mod error;
#[cfg(fuzzing)]
pub(crate) mod fuzz;
mod handle;
mod held;
mod holders;
mod jobs;
mod listener;
mod metrics;
mod registration;
mod registry;
mod results;
mod rotation;
mod session;
mod spans;
mod sync;
mod task;

pub use config::HubConfig;
pub use error::HubError;
pub use handle::Hub;
pub use held::HeldLogBytes;
pub use listener::Listening;
pub use registry::WorkersWatch;
