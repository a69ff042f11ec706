//! Hodei: durable CI/CD and distributed job execution, as a library.
//!
//! This facade re-exports the crates of the workspace. Today that is the engine,
//! [`hodei-core`](hodei_core); the macros, the agent and the providers join it as they land,
//! providers behind cargo features.
//!
//! ```
//! use hodei::{Engine, MemoryStore, Outcome, SagaDefinition, SagaRun, StepError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hodei::Error> {
//! let hello = SagaDefinition::new("hello", 1, |ctx, name: String| async move {
//!     ctx.step("greet").input(name).run(|_, n: String| async move { Ok::<_, StepError>(format!("hello {n}")) }).await
//! });
//! let engine = Engine::builder().store(MemoryStore::new()).register(hello).start().await?;
//! let run = engine.start(SagaRun::new("hello", "hello-1", &"world")?).await?;
//! assert_eq!(run.outcome::<String>().await?, Outcome::Completed("hello world".to_string()));
//! # Ok(()) }
//! ```

pub use hodei_core as core;
#[cfg(feature = "sled")]
pub use hodei_core::SledStore;
pub use hodei_core::store;
pub use hodei_core::{
    CompensationContext, Engine, EngineBuilder, EngineConfig, EngineEvent, EngineEventKind, Error, Event,
    EventStore, MemoryStore, Outcome, RecordedEvent, RetryPolicy, SagaContext, SagaDefinition, SagaFilter,
    SagaHandle, SagaId, SagaRecord, SagaRun, SagaStatus, ShutdownReport, StepContext, StepError, StepRef,
    Timestamp,
};
