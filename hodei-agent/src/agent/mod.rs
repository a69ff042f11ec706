//! The worker agent program: its settings, its stored credentials, and its run loop.
//!
//! The `hodei-agent` binary is a thin shell over this module, so that the settings parser, the
//! backoff policy and the reconnecting loop are tested in-process as well as through the binary.
//!
//! Status lines go to stderr through `say`: the agent is a process of its own whose operator
//! reads its stderr, and the crate has no tracing subscriber to print events with.

mod backoff;
mod credentials;
mod error;
mod job_task;
mod lifecycle;
mod outbox;
mod pump;
mod rotation;
mod session;
mod settings;
mod status;
mod trace;
mod wire;
mod worker;

pub use backoff::BackoffPolicy;
pub use error::AgentError;
pub use lifecycle::run;
pub use outbox::MAX_HELD_BYTES;
pub use settings::{Command, JOBS_DIE_WITH_AGENT_ENV, Settings, help};
