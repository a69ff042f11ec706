//! Writing sagas without macros: definitions, the saga context and the step builder.
//!
//! This is the API that `#[saga]`/`#[step]` expand to, and the one a custom control plane uses
//! to build pipelines at run time (from a job file, say): a step is a name, an input, a retry
//! policy, a timeout, an optional compensation and an async body.

mod builder;
mod compensation;
mod context;
mod definition;
mod run;
mod shape;

pub use builder::StepBuilder;
pub use compensation::{Compensate, CompensationContext, IntoCompensation, NoCompensation};
pub use context::SagaContext;
pub use definition::{Saga, SagaDefinition};
pub use run::SagaRun;
pub use shape::{SagaShape, StepShape};
