//! The engine: registration, starting and resuming sagas, inspection, cancellation, an
//! operator's verbs (pause, resume, retry now, retry a failed compensation) and shutdown.
//!
//! [`Engine`] is a cheap handle on shared state; each file here adds one part of its API. The
//! engine owns the set of live sagas and starts one driver task per saga
//! ([`crate::driver`]), which tells it when its saga has finished.

mod builder;
mod census;
mod check;
mod children;
mod config;
mod filter;
mod follow;
mod fork;
mod handle;
mod inspection;
mod leasing;
mod observing;
mod operator;
mod outcome;
mod purge;
mod recovery;
mod registry;
mod requests;
mod rewritable;
mod shutdown;
mod start;
mod state;
mod traced;

pub use builder::EngineBuilder;
pub use census::Census;
pub use config::EngineConfig;
pub use filter::{Page, SagaFilter};
pub use follow::JournalFollower;
pub use handle::{SagaHandle, TypedHandle};
pub use outcome::{Outcome, StepRef};
pub use registry::DefinitionInfo;
pub use shutdown::ShutdownReport;
pub use state::Engine;
