//! Writing sagas without macros: definitions, the saga context and the step builder.
//!
//! This is the API that `#[saga]`/`#[step]` expand to, and the one a custom control plane uses
//! to build pipelines at run time (from a job file, say): a step is a name, an input, a retry
//! policy, a timeout, an optional compensation and an async body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{decode_payload, encode_payload};
use crate::driver::{CompensationSpec, RawCompensation, SagaShared, Scope, StepSpec};
use crate::error::{Error, Result};
use crate::event::SagaId;
use crate::retry::{RetryPolicy, StepError};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type ErasedBody =
    Arc<dyn Fn(SagaContext, Vec<u8>) -> BoxFuture<Result<Vec<u8>, StepError>> + Send + Sync>;
#[doc(hidden)]
pub type ErasedCompensation = Arc<dyn Fn(RawCompensation) -> BoxFuture<Result<(), StepError>> + Send + Sync>;

/// A saga definition: a name, a version and the async body. Register it with the engine.
///
/// The body is replayed after a crash, so it must be deterministic apart from its steps: every
/// side effect, clock read or random number goes in a step, whose recorded output replay
/// returns without running it again.
#[derive(Clone)]
pub struct SagaDefinition {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) body: ErasedBody,
    shape: Option<&'static SagaShape>,
}

/// The static shape of a saga, as `#[saga]` reads it from the body: its step calls in the
/// order they appear, each with its compensation. For docs and dashboards; the engine itself
/// runs on the journal, never on the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SagaShape {
    /// The definition name.
    pub name: &'static str,
    /// The definition version.
    pub version: u32,
    /// The step calls, in source order.
    pub steps: &'static [StepShape],
}

/// One step call in a [`SagaShape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepShape {
    /// The step's name.
    pub name: &'static str,
    /// The path of its compensation, as written.
    pub compensation: Option<&'static str>,
}

impl SagaShape {
    #[doc(hidden)]
    pub const fn new(name: &'static str, version: u32, steps: &'static [StepShape]) -> Self {
        Self { name, version, steps }
    }

    /// Whether no two steps share a name. Checked at compile time by `#[saga]`.
    pub const fn has_unique_step_names(&self) -> bool {
        let mut i = 0;
        while i < self.steps.len() {
            let mut j = i + 1;
            while j < self.steps.len() {
                if const_str_eq(self.steps[i].name, self.steps[j].name) {
                    return false;
                }
                j += 1;
            }
            i += 1;
        }
        true
    }
}

impl StepShape {
    #[doc(hidden)]
    pub const fn new(name: &'static str, compensation: Option<&'static str>) -> Self {
        Self { name, compensation }
    }
}

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A saga with static types: what `#[saga]` implements for the type it generates.
pub trait Saga {
    /// The saga's input.
    type Input: Serialize + DeserializeOwned + Send + 'static;
    /// The saga's output.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// The definition name.
    const NAME: &'static str;
    /// The definition version.
    const VERSION: u32;
    /// The definition, ready to register.
    fn definition() -> SagaDefinition;
}

impl SagaDefinition {
    /// Defines a saga from an async function of its context and input.
    pub fn new<I, O, F, Fut>(name: impl Into<String>, version: u32, body: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(SagaContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        let body: ErasedBody = Arc::new(move |ctx, input: Vec<u8>| {
            let started = decode_payload::<I>(&input).map(|input| body(ctx, input));
            Box::pin(async move {
                let output = match started {
                    Ok(running) => running.await?,
                    Err(e) => {
                        return Err(StepError::terminal(format!("the saga input does not decode: {e}")));
                    }
                };
                encode_payload(&output)
                    .map_err(|e| StepError::terminal(format!("the saga output does not encode: {e}")))
            })
        });
        Self { name: name.into(), version, body, shape: None }
    }

    /// Attaches the static shape (what `#[saga]` does).
    pub fn with_shape(mut self, shape: &'static SagaShape) -> Self {
        self.shape = Some(shape);
        self
    }

    /// The static shape, for definitions made by `#[saga]`.
    pub fn shape(&self) -> Option<&'static SagaShape> {
        self.shape
    }

    /// The definition's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The definition's version.
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl fmt::Debug for SagaDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition").field("name", &self.name).field("version", &self.version).finish()
    }
}

/// A request to start a saga: which definition, which id, which input.
#[derive(Clone, Debug)]
pub struct SagaRun {
    pub(crate) definition: String,
    pub(crate) version: Option<u32>,
    pub(crate) id: SagaId,
    pub(crate) input: Vec<u8>,
}

impl SagaRun {
    /// A run of the newest registered version of `definition`.
    pub fn new(definition: impl Into<String>, id: impl Into<String>, input: &impl Serialize) -> Result<Self> {
        let input = encode_payload(input).map_err(|reason| Error::Codec {
            action: "encode",
            what: "the saga input".into(),
            reason,
        })?;
        Ok(Self { definition: definition.into(), version: None, id: SagaId::new(id)?, input })
    }

    /// Pins the definition version instead of taking the newest.
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// The run's id.
    pub fn id(&self) -> &SagaId {
        &self.id
    }
}

/// The handle a saga body gets: its id, and the way to run steps.
#[derive(Clone)]
pub struct SagaContext {
    pub(crate) shared: Arc<SagaShared>,
    /// Where this context's operations are numbered: the top level, or one branch.
    pub(crate) scope: Arc<Scope>,
}

impl fmt::Debug for SagaContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaContext").field("id", self.id()).finish()
    }
}

impl SagaContext {
    /// The saga's id.
    pub fn id(&self) -> &SagaId {
        &self.shared.id
    }

    /// Starts building a step. Operations are numbered in the order the body (or the branch)
    /// calls them; the name and input of each step must match the journal on replay.
    pub fn step(&self, name: impl Into<String>) -> StepBuilder<'_, (), NoCompensation> {
        StepBuilder {
            ctx: self,
            name: name.into(),
            input: (),
            retry: RetryPolicy::default(),
            timeout: None,
            compensation: NoCompensation,
        }
    }
}

/// What a step body is told about itself.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StepContext {
    /// The saga's id.
    pub saga_id: SagaId,
    /// The step's number in the saga, from 0.
    pub step: u32,
    /// The step's name.
    pub name: String,
    /// This attempt, from 1.
    pub attempt: u32,
    /// `saga id/step number`: stable across attempts, restarts and replays. Pass it to
    /// external systems so that a retried side effect happens once.
    pub idempotency_key: String,
    pub(crate) signals: StepSignals,
}

impl StepContext {
    /// Why the engine is stopping this step's body, if it is: read it when the body's future is
    /// dropped (in a drop guard) to tell a cancelled saga, whose remote work should be
    /// cancelled, from an engine shutting down, whose remote work should go on so the step can
    /// pick it up after the restart. `None` while the saga runs normally, and also when the
    /// body is dropped because its step timed out.
    pub fn stop_reason(&self) -> Option<StepStop> {
        if let Some(reason) = self.signals.cancel.borrow().clone() {
            return Some(StepStop::Cancelled(reason));
        }
        (*self.signals.shutdown.borrow()).then_some(StepStop::ShuttingDown)
    }
}

/// Why the engine stops a running step body (see [`StepContext::stop_reason`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepStop {
    /// The saga was cancelled, with this reason.
    Cancelled(String),
    /// The engine is shutting down; the saga resumes on the next start.
    ShuttingDown,
}

/// The saga's cancel and the engine's shutdown, as a step body can observe them.
#[derive(Clone, Debug)]
pub(crate) struct StepSignals {
    pub cancel: tokio::sync::watch::Receiver<Option<String>>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// What a compensation is told: the step's input and, when the step completed, its output.
///
/// `output` is `None` when the step started but its completion was never recorded (it failed,
/// timed out, or the process died in it): its side effect may or may not have happened, so a
/// compensation must tolerate both. Use `idempotency_key` to ask the external system.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CompensationContext<I, O> {
    /// The saga's id.
    pub saga_id: SagaId,
    /// The compensated step's number.
    pub step: u32,
    /// The compensated step's name.
    pub name: String,
    /// This compensation attempt, from 1.
    pub attempt: u32,
    /// The compensated step's idempotency key.
    pub idempotency_key: String,
    /// The step's input.
    pub input: I,
    /// The step's output, if its completion was recorded.
    pub output: Option<O>,
}

/// The marker for a step without a compensation.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCompensation;

/// A step's compensation and its retry policy.
pub struct Compensate<F> {
    run: F,
    retry: Option<RetryPolicy>,
}

impl<F> fmt::Debug for Compensate<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compensate").field("retry", &self.retry).finish_non_exhaustive()
    }
}

/// A step's compensation, or [`NoCompensation`]: what the builder may hold. Sealed.
pub trait IntoCompensation<I, O>: sealed::Sealed<I, O> {}

mod sealed {
    use crate::retry::RetryPolicy;
    use crate::saga::ErasedCompensation;

    pub trait Sealed<I, O> {
        fn into_spec(self, step_retry: RetryPolicy) -> Option<(ErasedCompensation, RetryPolicy)>;
    }
}

impl<I, O> IntoCompensation<I, O> for NoCompensation {}

impl<I, O> sealed::Sealed<I, O> for NoCompensation {
    fn into_spec(self, _: RetryPolicy) -> Option<(ErasedCompensation, RetryPolicy)> {
        None
    }
}

impl<I, O, F, Fut> IntoCompensation<I, O> for Compensate<F>
where
    I: DeserializeOwned + Send + 'static,
    O: DeserializeOwned + Send + 'static,
    F: Fn(CompensationContext<I, O>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), StepError>> + Send + 'static,
{
}

impl<I, O, F, Fut> sealed::Sealed<I, O> for Compensate<F>
where
    I: DeserializeOwned + Send + 'static,
    O: DeserializeOwned + Send + 'static,
    F: Fn(CompensationContext<I, O>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), StepError>> + Send + 'static,
{
    fn into_spec(self, step_retry: RetryPolicy) -> Option<(ErasedCompensation, RetryPolicy)> {
        let run = self.run;
        let erased: ErasedCompensation = Arc::new(move |raw: RawCompensation| {
            let decoded = decode_payload::<I>(&raw.input).and_then(|input| {
                let output = raw.output.as_deref().map(decode_payload::<O>).transpose()?;
                Ok(CompensationContext {
                    saga_id: raw.saga_id,
                    step: raw.step,
                    name: raw.name,
                    attempt: raw.attempt,
                    idempotency_key: raw.idempotency_key,
                    input,
                    output,
                })
            });
            match decoded {
                Ok(ctx) => Box::pin(run(ctx)),
                Err(e) => Box::pin(std::future::ready(Err(StepError::terminal(format!(
                    "the recorded input or output does not decode for the compensation: {e}"
                ))))),
            }
        });
        Some((erased, self.retry.unwrap_or(step_retry)))
    }
}

/// Builds one step. Finish with [`run`](StepBuilder::run).
#[must_use = "a step does nothing until `.run(..).await`"]
pub struct StepBuilder<'c, I, C> {
    ctx: &'c SagaContext,
    name: String,
    input: I,
    retry: RetryPolicy,
    timeout: Option<Duration>,
    compensation: C,
}

impl<I, C> fmt::Debug for StepBuilder<'_, I, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepBuilder")
            .field("name", &self.name)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<'c, I, C> StepBuilder<'c, I, C> {
    /// The step's input: journaled, handed to the body on every attempt, and to the
    /// compensation.
    pub fn input<J>(self, input: J) -> StepBuilder<'c, J, C> {
        StepBuilder {
            ctx: self.ctx,
            name: self.name,
            input,
            retry: self.retry,
            timeout: self.timeout,
            compensation: self.compensation,
        }
    }

    /// The retry policy (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// A time limit per attempt. An attempt past it is cancelled and counts as a retryable
    /// failure.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// The step's compensation, run in reverse order if the saga later fails or is
    /// cancelled. It is retried under the step's retry policy.
    pub fn compensate<F>(self, run: F) -> StepBuilder<'c, I, Compensate<F>> {
        self.compensate_with(run, None)
    }

    /// Like [`compensate`](Self::compensate), with a retry policy of its own.
    pub fn compensate_retrying<F>(self, policy: RetryPolicy, run: F) -> StepBuilder<'c, I, Compensate<F>> {
        self.compensate_with(run, Some(policy))
    }

    fn compensate_with<F>(self, run: F, retry: Option<RetryPolicy>) -> StepBuilder<'c, I, Compensate<F>> {
        StepBuilder {
            ctx: self.ctx,
            name: self.name,
            input: self.input,
            retry: self.retry,
            timeout: self.timeout,
            compensation: Compensate { run, retry },
        }
    }

    /// Runs the step, or returns its journaled result on replay.
    ///
    /// The body may run more than once (retries, or a crash before its completion was
    /// recorded); it never runs again once its completion is recorded.
    pub async fn run<O, F, Fut>(self, body: F) -> Result<O, StepError>
    where
        I: Serialize + DeserializeOwned + Send,
        O: Serialize + DeserializeOwned + Send,
        C: IntoCompensation<I, O>,
        F: Fn(StepContext, I) -> Fut + Send + Sync,
        Fut: Future<Output = Result<O, StepError>> + Send,
    {
        let shared = &self.ctx.shared;
        let input = encode_payload(&self.input).map_err(|e| {
            StepError::terminal(format!("step `{}`: the input does not encode: {e}", self.name))
        })?;
        let compensation = self.compensation.into_spec(self.retry).map(|(run, retry)| CompensationSpec {
            run,
            retry,
            timeout: self.timeout,
        });
        let spec =
            StepSpec { name: self.name, input, retry: self.retry, timeout: self.timeout, compensation };
        let body = &body;
        let (step, output) = shared
            .run_step(&self.ctx.scope, &spec, move |step_ctx: StepContext, input: &[u8]| {
                let started = decode_payload::<I>(input).map(|input| body(step_ctx, input));
                async move {
                    let output = started
                        .map_err(|e| StepError::terminal(format!("the step input does not decode: {e}")))?
                        .await?;
                    encode_payload(&output)
                        .map_err(|e| StepError::terminal(format!("the step output does not encode: {e}")))
                }
            })
            .await?;
        match decode_payload::<O>(&output) {
            Ok(output) => Ok(output),
            Err(e) => {
                let reason = format!(
                    "step {step} `{}`: its journaled output does not decode as the type the code now expects: {e}",
                    spec.name
                );
                shared.park(reason).await
            }
        }
    }
}
