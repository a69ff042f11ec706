//! Hodei: durable CI/CD and distributed job execution, as a library.
//!
//! A pipeline is a saga: an async function made of steps, each journaled in an embedded event
//! log before the saga moves on. After a crash the engine resumes each saga where it stopped,
//! never running a recorded step again; when a step fails for good, the completed steps are
//! compensated in reverse order.
//!
//! ```
//! use hodei::{CompensationContext, Engine, MemoryStore, Outcome, SagaContext, StepContext, StepError, saga, step};
//!
//! #[step(retry(max_attempts = 3, backoff = "10ms"))]
//! async fn build(_ctx: StepContext, version: String) -> Result<String, StepError> {
//!     Ok(format!("app:{version}"))
//! }
//!
//! #[step(compensate = unpublish)]
//! async fn publish(_ctx: StepContext, image: String) -> Result<String, StepError> {
//!     Ok(format!("registry.local/{image}"))
//! }
//!
//! async fn unpublish(c: CompensationContext<String, String>) -> Result<(), StepError> {
//!     println!("deleting {:?}", c.output);
//!     Ok(())
//! }
//!
//! #[saga(version = 1)]
//! async fn release(ctx: SagaContext, version: String) -> Result<String, StepError> {
//!     let image = build(&ctx, version).await?;
//!     publish(&ctx, image).await
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hodei::Error> {
//! let engine = Engine::builder().store(MemoryStore::new()).register(release::definition()).start().await?;
//! let run = release::start(&engine, "release-1.2.0", &"1.2.0".to_string()).await?;
//! assert_eq!(run.outcome().await?, Outcome::Completed("registry.local/app:1.2.0".to_string()));
//! assert_eq!(release::SHAPE.steps[1].compensation, Some("unpublish"));
//! # Ok(()) }
//! ```
//!
//! The macros expand to the builder API of [`SagaContext::step`], for pipelines built at run
//! time. This facade re-exports the workspace's crates: the engine ([`hodei_core`]) and the
//! macros (feature `macros`, on by default), the agent protocol, hub and agent
//! ([`hodei_agent`]), and the worker providers ([`hodei_providers`]), the heavy ones behind cargo
//! features.

#[cfg(feature = "workers")]
pub use hodei_agent as agent;
pub use hodei_core as core;
#[cfg(feature = "sled")]
pub use hodei_core::SledStore;
pub use hodei_core::{Saga, SagaShape, StepShape, TypedHandle};
#[cfg(feature = "macros")]
pub use hodei_macros::{saga, step};
#[cfg(feature = "workers")]
pub use hodei_providers as providers;

#[doc(hidden)]
pub use hodei_core::__private;
pub use hodei_core::store;
pub use hodei_core::{
    Branch, CompensationContext, Engine, EngineBuilder, EngineConfig, EngineEvent, EngineEventKind, Error,
    Event, EventStore, JoinMode, MemoryStore, Outcome, RecordedEvent, RetryPolicy, SagaContext,
    SagaDefinition, SagaFilter, SagaHandle, SagaId, SagaRecord, SagaRun, SagaStatus, ShutdownReport,
    StepContext, StepError, StepRef, StepStop, Timeline, Timestamp,
};
