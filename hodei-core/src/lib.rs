//! hodei-core: a durable saga engine on an embedded event log.
//!
//! A saga is an async function made of steps. The engine journals every step transition
//! before it moves on; after a crash it replays each saga in flight, returning recorded step
//! results without running them again, and continues live from the first step the journal
//! does not record. When a saga fails for good, or is cancelled, the compensations of the steps
//! it started run in reverse order.
//!
//! When a step may run again: a step's result is durable before the saga body gets it, so a
//! step whose body returned never runs again, whatever the body does next. Only a step whose
//! body was running when the process died runs again, and only if its retry policy has attempts
//! left (the cut-off attempt counts). A started step is compensated whether it completed (its
//! compensation gets the output) or failed or was cut off (`output: None`).
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
//! # Resources
//!
//! What steps need from the application (a client, a connection pool, a job dispatcher) is
//! registered once when the engine is built, one value per type, and reached by type from
//! wherever a saga runs: [`SagaContext::resource`], [`StepContext::resource`] and
//! [`CompensationContext::resource`], in branches and child sagas alike. A type that was not
//! registered is [`Error::MissingResource`], naming it; one registered twice makes
//! [`EngineBuilder::start`] fail with [`Error::DuplicateResource`]. Resources are not
//! journaled: a restarted engine registers its own, and the sagas it resumes use those.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//!
//! use hodei_core::{Engine, MemoryStore, Outcome, SagaDefinition, SagaRun, StepError};
//!
//! /// The application's client of its artifact registry.
//! struct Registry {
//!     host: String,
//!     pushes: AtomicU32,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let publish = SagaDefinition::new("publish", 1, |ctx, image: String| async move {
//!     ctx.step("push")
//!         .input(image)
//!         .run(|step, image: String| async move {
//!             let registry = step.resource::<Registry>().map_err(StepError::terminal)?;
//!             registry.pushes.fetch_add(1, Ordering::SeqCst);
//!             Ok::<_, StepError>(format!("{}/{image}", registry.host))
//!         })
//!         .await
//! });
//! let registry = Arc::new(Registry { host: "registry.local".into(), pushes: AtomicU32::new(0) });
//! let engine = Engine::builder()
//!     .store(MemoryStore::new())
//!     .resource_arc(registry.clone())
//!     .register(publish)
//!     .start()
//!     .await?;
//! let saga = engine.start(SagaRun::new("publish", "publish-1", &"app:1.2.0")?).await?;
//! assert_eq!(saga.outcome::<String>().await?, Outcome::Completed("registry.local/app:1.2.0".into()));
//! assert_eq!(registry.pushes.load(Ordering::SeqCst), 1);
//! # Ok(()) }
//! ```
//!
//! See `ARCHITECTURE.md` in the repository for the event model and the recovery path.

#![warn(clippy::unwrap_used)]

mod bus;
mod clock;
mod codec;
mod driver;
mod engine;
mod error;
mod event;
mod journal_file;
mod lock;
pub mod observe;
mod payload_schema;
mod primitives;
mod replay;
mod replay_check;
mod resources;
mod retry;
mod saga;
mod stand_in;
mod step_context;
pub mod store;
/// OTLP export of the engine's spans.
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod telemetry;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod timeline;
mod timers;
pub mod trace;

pub use bus::{EngineEvent, EngineEventKind};
pub use codec::{PayloadCodec, PayloadError, payload_codec, payload_to_json};
pub use engine::{
    Census, DefinitionInfo, Engine, EngineBuilder, EngineConfig, JournalFollower, Outcome, Page, SagaFilter,
    SagaHandle, ShutdownReport, StepRef, TypedHandle,
};
pub use error::{Error, Result, StorageError};
pub use event::{Event, JoinMode, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};
pub use journal_file::JournalFile;
pub use observe::Observer;
pub use primitives::Branch;
pub use replay_check::{PatchUse, ReplayReport, ReplayVerdict};
pub use retry::{RetryPolicy, StepError};
pub use saga::{
    Compensate, CompensationContext, IntoCompensation, NoCompensation, Saga, SagaContext, SagaDefinition,
    SagaRun, SagaShape, StepBuilder, StepShape,
};
pub use step_context::{StepContext, StepStop};
pub use store::{EventStore, MemoryStore};
#[cfg(feature = "postgres")]
pub use store::{PostgresError, PostgresOptions, PostgresStore, SqlParam, SqlRow};
#[cfg(feature = "sled")]
pub use store::{SledError, SledOptions, SledStore};
pub use timeline::Timeline;

/// What the fuzz targets in `fuzz/` call: the stored record decoder and the replay index, on
/// bytes no store wrote. Only in builds with `--cfg fuzzing` (`cargo fuzz`); not an API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod __fuzz {
    use crate::codec::{self, FORMAT_V1};
    use crate::event::{RecordedEvent, SagaRecord};

    /// The record format of journals from before payload codecs.
    pub const RECORD_FORMAT_V1: u8 = FORMAT_V1;
    /// The record format written now.
    pub const RECORD_FORMAT_V2: u8 = codec::FORMAT_V2;

    /// `body` as a record of `format` whose checksum matches (see `codec::seal_record`).
    pub fn seal_record(format: u8, body: &[u8]) -> Vec<u8> {
        codec::seal_record(format, body)
    }

    /// A record of the journal as the stores read it: a batch of events, legacy payloads tagged.
    pub fn decode_journal_record(bytes: &[u8]) -> Result<Vec<RecordedEvent>, String> {
        let (mut batch, format): (Vec<RecordedEvent>, u8) = codec::decode_record_versioned(bytes)?;
        if format == FORMAT_V1 {
            batch.iter_mut().for_each(|recorded| recorded.event.tag_legacy_payloads());
        }
        Ok(batch)
    }

    /// A saga's summary record as the stores read it.
    pub fn decode_saga_record(bytes: &[u8]) -> Result<SagaRecord, String> {
        codec::decode_record(bytes)
    }

    /// Indexes a journal for replay, as a driver does before it runs the body.
    pub fn index_for_replay(history: &[RecordedEvent]) -> Result<(), String> {
        crate::replay::Replay::new(history).map(drop)
    }
}

/// What the code generated by `hodei-macros` calls. Not a stable API: it changes with the
/// macros, which are released in lockstep with this crate.
#[doc(hidden)]
pub mod __private {
    pub use crate::{
        CompensationContext, Engine, Error, RetryPolicy, Saga, SagaContext, SagaDefinition, SagaShape,
        StepContext, StepError, StepShape, TypedHandle,
    };
    pub use core::time::Duration;

    /// Checks a compensation's signature against its step's input and output types, at the
    /// span of the `compensate = ...` option.
    pub fn compensation<I, O, F, Fut>(compensation: F) -> F
    where
        F: Fn(CompensationContext<I, O>) -> Fut + Send + Sync + 'static,
        Fut: core::future::Future<Output = Result<(), StepError>> + Send + 'static,
    {
        compensation
    }

    /// Fails to compile, at the span of the type, unless it can be journaled.
    pub const fn assert_payload<T: serde::Serialize + serde::de::DeserializeOwned>() {}
}
