//! hodei-core: a durable saga engine on an embedded event log.
//!
//! A saga is an async function made of steps. The engine journals every step transition
//! before it moves on; after a crash it replays each saga in flight, returning recorded step
//! results without running them again, and continues live from the first step the journal
//! does not record. When a saga fails for good, or is cancelled, the compensations of the steps
//! it started run in reverse order.
//!
//! ```
//! use hodei_core::{Engine, MemoryStore, Outcome, RetryPolicy, SagaDefinition, SagaRun, StepError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let release = SagaDefinition::new("release", 1, |ctx, version: String| async move {
//!     let artifact = ctx
//!         .step("build")
//!         .input(version.clone())
//!         .retry(RetryPolicy::attempts(3))
//!         .run(|_, v: String| async move { Ok::<_, StepError>(format!("app-{v}.tar")) })
//!         .await?;
//!     let url = ctx
//!         .step("publish")
//!         .input(artifact)
//!         .compensate(|c: hodei_core::CompensationContext<String, String>| async move {
//!             println!("unpublishing {}", c.input);
//!             Ok(())
//!         })
//!         .run(|_, a: String| async move { Ok::<_, StepError>(format!("https://example.invalid/{a}")) })
//!         .await?;
//!     Ok(url)
//! });
//!
//! let engine = Engine::builder().store(MemoryStore::new()).register(release).start().await?;
//! let saga = engine.start(SagaRun::new("release", "release-1.2.0", &"1.2.0")?).await?;
//! match saga.outcome::<String>().await? {
//!     Outcome::Completed(url) => assert!(url.ends_with("app-1.2.0.tar")),
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! See `ARCHITECTURE.md` in the repository for the event model and the recovery path.

#![warn(clippy::unwrap_used)]

mod codec;
mod driver;
mod engine;
mod error;
mod event;
mod replay;
mod retry;
mod saga;
pub mod store;

pub use engine::{
    Engine, EngineBuilder, EngineConfig, EngineEvent, EngineEventKind, Outcome, SagaFilter, SagaHandle,
    ShutdownReport, StepRef,
};
pub use error::{Error, Result, StorageError};
pub use event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};
pub use retry::{RetryPolicy, StepError};
pub use saga::{
    Compensate, CompensationContext, IntoCompensation, NoCompensation, SagaContext, SagaDefinition, SagaRun,
    StepBuilder, StepContext,
};
#[cfg(feature = "sled")]
pub use store::SledStore;
pub use store::{EventStore, MemoryStore};
