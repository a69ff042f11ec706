//! Hodei: durable CI/CD and distributed job execution, as a library.
//!
//! A pipeline is a saga: an async function made of steps, each journaled in an embedded event
//! log before the saga moves on. After a crash the engine resumes each saga where it stopped.
//!
//! - **A step whose body returned never runs again.** Its result (output or error) is on disk
//!   before the saga body gets it, whatever the body does next and whenever the process dies.
//!   The same holds for a compensation that returned, a branch that ended and a child saga that
//!   finished.
//! - **A step runs again only if the process died while its body was running**, and then only
//!   if its retry policy has attempts left: the cut-off attempt counts as one.
//! - **When a step fails for good, or the saga is cancelled, every step that started is
//!   compensated**, in reverse order: a step whose completion was recorded gets its output, one
//!   that failed or was cut off gets `output: None`.
//! - **A damaged data directory is refused**, never read as a shorter history:
//!   [`Error::Damaged`] names what was lost, and [`SledOptions`] can accept the loss.
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
//! time.
//!
//! # Where things are, by what you do
//!
//! - **Write and run pipelines**: `hodei::{saga, step, Engine, SagaContext, ...}` at the root,
//!   the engine of [`hodei_core`] (all of it under [`core`]).
//! - **Run jobs on workers** (feature `workers`, on by default): [`Node`] starts the journal,
//!   the embedded control plane that workers dial and the engine in one call; [`jobs`] has the
//!   [`jobs::Job`] a step runs (`ctx.run_job(name, job)`) and its rollback.
//! - **Choose where workers come from**: [`providers`]; Docker, Kubernetes and Firecracker are
//!   behind the features of the same names.
//! - **Build a control plane of your own**: [`server`] (hub, log store, CA, scheduler).
//! - **Run or embed the worker side**: [`agent`] (the `hodei-agent` program's library).

#![cfg_attr(docsrs, feature(doc_cfg))]

/// The worker side of the wire: the agent, its connection, and the job runner.
#[cfg(feature = "workers")]
#[cfg_attr(docsrs, doc(cfg(feature = "workers")))]
pub use hodei_agent as agent;
pub use hodei_core as core;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use hodei_core::{PostgresError, PostgresOptions, PostgresStore};
pub use hodei_core::{Saga, SagaShape, StepShape, TypedHandle};
#[cfg(feature = "sled")]
#[cfg_attr(docsrs, doc(cfg(feature = "sled")))]
pub use hodei_core::{SledOptions, SledStore};
#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use hodei_macros::{saga, step};
/// Where workers come from: the [`Provider`](providers::Provider) trait, local workers, and
/// (behind their features) Docker, Kubernetes and Firecracker.
#[cfg(feature = "workers")]
#[cfg_attr(docsrs, doc(cfg(feature = "workers")))]
pub use hodei_providers as providers;
/// The control plane's parts, for a control plane of your own; [`ControlPlane`] wires them.
#[cfg(feature = "workers")]
#[cfg_attr(docsrs, doc(cfg(feature = "workers")))]
pub use hodei_server as server;
/// The operator API: HTTP/JSON and server-sent events to watch and steer runs from outside
/// the process, with bearer tokens, webhooks and an OpenAPI document.
#[cfg(feature = "workers")]
#[cfg_attr(docsrs, doc(cfg(feature = "workers")))]
pub use hodei_server::api;
/// Remote jobs as durable saga steps: the journaled [`Job`](jobs::Job), its secrets' sources,
/// and the dispatcher that runs it on a worker.
#[cfg(feature = "workers")]
#[cfg_attr(docsrs, doc(cfg(feature = "workers")))]
pub use hodei_server::jobs;
#[cfg(feature = "workers")]
#[cfg_attr(docsrs, doc(cfg(feature = "workers")))]
pub use hodei_server::{ControlPlane, ControlPlaneBuilder, ControlPlaneError, Node, NodeBuilder, NodeError};

/// OTLP export of the spans (feature `otel`): [`Otlp`](telemetry::Otlp), [`init_otlp`](telemetry::init_otlp).
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub use hodei_core::telemetry;
/// Testing sagas at the speed of unit tests (feature `testing`): an engine on a virtual clock
/// that skips ahead whenever every saga waits, and stand-ins for steps.
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub use hodei_core::testing;
/// Trace context: where a saga's spans sit in a distributed trace.
pub use hodei_core::trace;

#[doc(hidden)]
pub use hodei_core::__private;
pub use hodei_core::store;
pub use hodei_core::{
    Branch, CompensationContext, Engine, EngineBuilder, EngineConfig, EngineEvent, EngineEventKind, Error,
    Event, EventStore, JoinMode, MemoryStore, Outcome, RecordedEvent, RetryPolicy, SagaContext,
    SagaDefinition, SagaFilter, SagaHandle, SagaId, SagaRecord, SagaRun, SagaStatus, ShutdownReport,
    StepContext, StepError, StepRef, StepStop, Timeline, Timestamp,
};
