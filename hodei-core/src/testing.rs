//! Testing sagas at the speed of unit tests: an engine on a virtual clock that skips ahead
//! whenever every saga waits, and stand-ins for steps that reach the outside world.
//!
//! A [`TestEnv`] is an [`Engine`] (it derefs to one) on an in-memory store whose clock is
//! virtual. It pauses Tokio's clock, and Tokio moves a paused clock only when every task of the
//! runtime waits, straight to the next timer due: a saga that waits a day for an approval,
//! backs off for an hour between retries or soaks for fifteen minutes runs in milliseconds,
//! and its journal shows the virtual times. Time does not move while any task has work, so the
//! timeline is the one a real run would have had on an idle machine.
//!
//! Steps run their own bodies, or a stand-in the test registers by step name with
//! [`TestEnvBuilder::stand_in`] (and [`TestEnvBuilder::stand_in_compensation`] for the
//! step's compensation). The journal cannot tell a stand-in from the body: replay, retries and
//! compensation work as in production. A stand-in whose input or output type is not the step's
//! fails that step with an error that names both types.
//!
//! The environment needs a current-thread Tokio runtime (what `#[tokio::test]` gives) and the
//! `testing` feature. Step bodies that wait on real I/O let virtual time run on while they
//! wait, as everything under Tokio's paused clock does: give such steps a stand-in.
//!
//! ```
//! use std::time::Duration;
//!
//! use hodei_core::testing::TestEnv;
//! use hodei_core::{Outcome, RetryPolicy, SagaDefinition, SagaRun, StepError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let release = SagaDefinition::new("release", 1, |ctx, version: String| async move {
//!     let approved: Option<bool> = ctx.wait_signal_timeout("approval", Duration::from_secs(24 * 3600)).await?;
//!     if approved != Some(true) {
//!         return Err(StepError::terminal("not approved in a day"));
//!     }
//!     ctx.sleep(Duration::from_secs(15 * 60)).await; // soak
//!     ctx.step("deploy").input(version).run(|_, v: String| async move { Ok::<_, StepError>(v) }).await
//! });
//! let env = TestEnv::builder()
//!     .register(release)
//!     .stand_in("deploy", |_, version: String| async move { Ok::<_, StepError>(format!("deployed {version}")) })
//!     .start()
//!     .await?;
//! let run = env.start(SagaRun::new("release", "release-1", &"1.2.0")?).await?;
//! env.wait_for(run.id(), |event| matches!(event, hodei_core::Event::SignalWaitStarted { .. })).await?;
//! env.advance(Duration::from_secs(3 * 3600)).await; // the approver takes three hours
//! env.signal(run.id(), "approval", &true).await?;
//! let outcome = run.outcome::<String>().await?;
//! assert_eq!(outcome, Outcome::Completed("deployed 1.2.0".into()));
//! // Three hours of waiting and a fifteen-minute soak, in virtual time.
//! assert_eq!(env.elapsed(), Duration::from_secs(3 * 3600 + 15 * 60));
//! # Ok(()) }
//! ```

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::engine::{Engine, EngineBuilder, EngineConfig};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, Timestamp};
use crate::retry::StepError;
use crate::saga::{CompensationContext, SagaDefinition};
use crate::stand_in::{StandInBody, StandInCompensation, StandIns};
use crate::step_context::StepContext;
use crate::store::{EventStore, MemoryStore};

/// An engine on a virtual clock, for tests: see the [module docs](self).
#[derive(Debug)]
pub struct TestEnv {
    engine: Engine,
    clock: Clock,
    started_at: SystemTime,
}

/// Configures and starts a [`TestEnv`].
#[must_use = "a test environment does nothing until `.start().await`"]
pub struct TestEnvBuilder {
    engine: EngineBuilder,
    stand_ins: StandIns,
    start_at: SystemTime,
}

impl std::fmt::Debug for TestEnvBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnvBuilder")
            .field("engine", &self.engine)
            .field("start_at", &self.start_at)
            .finish()
    }
}

impl TestEnv {
    /// Starts configuring a test environment: an in-memory store, no stand-ins, and a virtual
    /// clock that starts at the wall clock's time.
    pub fn builder() -> TestEnvBuilder {
        TestEnvBuilder {
            engine: Engine::builder().store(MemoryStore::new()),
            stand_ins: StandIns::default(),
            start_at: SystemTime::now(),
        }
    }

    /// The engine under test (also reached through `Deref`).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The virtual time now.
    pub fn now(&self) -> SystemTime {
        self.clock.system_time()
    }

    /// The virtual time now, as the journal stamps it.
    pub fn timestamp(&self) -> Timestamp {
        self.clock.now()
    }

    /// The virtual time when the environment started, to the millisecond.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// How much virtual time has passed since the environment started.
    pub fn elapsed(&self) -> Duration {
        self.now().duration_since(self.started_at).unwrap_or_default()
    }

    /// Moves virtual time on by `by` at once, firing every timer, signal deadline and retry
    /// backoff that falls due on the way: what a test does to have something happen at a given
    /// time, such as a signal three hours into a saga's approval window. The sagas woken run
    /// as the test goes on; [`wait_for`](Self::wait_for) waits for what they journal.
    pub async fn advance(&self, by: Duration) {
        tokio::time::advance(by).await;
    }

    /// Waits until the journal of `id` holds an event for which `what` is true, and returns
    /// it: how a test knows a saga has reached a wait before it moves time or sends a signal.
    /// Virtual time moves meanwhile only as far as the sagas' own timers take it.
    pub async fn wait_for(&self, id: &SagaId, what: impl Fn(&Event) -> bool) -> Result<RecordedEvent> {
        let mut journal = self.engine.follow(id, 0)?;
        while let Some(recorded) = journal.next().await {
            let recorded = recorded?;
            if what(&recorded.event) {
                return Ok(recorded);
            }
        }
        Err(Error::TestEnvironment {
            reason: format!("the journal of saga `{id}` ended without the event waited for"),
        })
    }
}

impl Deref for TestEnv {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl TestEnvBuilder {
    /// Registers a definition, as [`EngineBuilder::register`] does.
    pub fn register(mut self, definition: SagaDefinition) -> Self {
        self.engine = self.engine.register(definition);
        self
    }

    /// Registers a resource, as [`EngineBuilder::resource`] does.
    pub fn resource<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.engine = self.engine.resource(value);
        self
    }

    /// Registers a shared resource, as [`EngineBuilder::resource_arc`] does.
    pub fn resource_arc<T: Send + Sync + 'static>(mut self, value: Arc<T>) -> Self {
        self.engine = self.engine.resource_arc(value);
        self
    }

    /// Keeps journals in `store` instead of memory (a sled store in a temporary directory, to
    /// restart an engine on the same journals).
    pub fn store(mut self, store: impl EventStore) -> Self {
        self.engine = self.engine.store(store);
        self
    }

    /// Replaces the engine's configuration, as [`EngineBuilder::config`] does.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.engine = self.engine.config(config);
        self
    }

    /// Where the virtual clock starts (default: the wall clock's time when the builder was
    /// made). A fixed start makes the journal's times the same in every run of a test.
    pub fn start_at(mut self, time: SystemTime) -> Self {
        self.start_at = time;
        self
    }

    /// Runs `body` instead of the body of every step named `step`. The journal records it as
    /// that step: its output, its failures and retries (a retryable error is retried under
    /// the step's policy, on the virtual clock), and its compensation, which is the step's
    /// own. `I` and `O` must be the step's input and output types; a step whose types differ
    /// fails with an error naming both.
    pub fn stand_in<I, O, F, Fut>(mut self, step: impl Into<String>, body: F) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(StepContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<O, StepError>> + Send + 'static,
    {
        let body: Arc<StandInBody<I, O>> = Arc::new(move |ctx, input| Box::pin(body(ctx, input)));
        self.stand_ins.insert_body(step.into(), body);
        self
    }

    /// Runs `compensation` instead of the compensation of every step named `step` (a remote
    /// rollback, say): when the saga fails for good or is cancelled after the step started, it
    /// gets the step's input and, if the step completed, its output. `I` and `O` must be the
    /// step's input and output types, and the step must have a compensation; a step for which
    /// either is not so fails with an error saying which.
    pub fn stand_in_compensation<I, O, F, Fut>(mut self, step: impl Into<String>, compensation: F) -> Self
    where
        I: Send + 'static,
        O: Send + 'static,
        F: Fn(CompensationContext<I, O>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), StepError>> + Send + 'static,
    {
        let compensation: Arc<StandInCompensation<I, O>> = Arc::new(move |ctx| Box::pin(compensation(ctx)));
        self.stand_ins.insert_compensation(step.into(), compensation);
        self
    }

    /// Pauses Tokio's clock and starts the engine on a virtual clock at the configured time.
    ///
    /// Fails with [`Error::TestEnvironment`] outside a current-thread Tokio runtime: only
    /// there can Tokio's clock be paused.
    pub async fn start(self) -> Result<TestEnv> {
        pause_tokio_clock()?;
        let clock = Clock::starting_at(self.start_at);
        let engine = self.engine.resource(self.stand_ins).clock(clock).start().await?;
        let started_at = Timestamp::of(self.start_at).as_system_time();
        Ok(TestEnv { engine, clock, started_at })
    }
}

/// Pauses the current runtime's clock, unless it is paused already (`start_paused = true`).
fn pause_tokio_clock() -> Result<()> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let refuse = |reason: &str| Err(Error::TestEnvironment { reason: reason.into() });
    let Ok(runtime) = Handle::try_current() else {
        return refuse("must start inside a Tokio runtime");
    };
    if runtime.runtime_flavor() != RuntimeFlavor::CurrentThread {
        return refuse(
            "needs a current-thread Tokio runtime (`#[tokio::test]`): only its clock can be paused",
        );
    }
    // A paused clock reads the same however long the thread sleeps; a running one does not.
    let before = tokio::time::Instant::now();
    std::thread::sleep(Duration::from_micros(100));
    if tokio::time::Instant::now() != before {
        tokio::time::pause();
    }
    Ok(())
}
