use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::codec::decode_payload;
use crate::driver::{ErasedCompensation, RawCompensation};
use crate::error::Result;
use crate::event::SagaId;
use crate::resources::Resources;
use crate::retry::{RetryPolicy, StepError};

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
    resources: Arc<Resources>,
}

impl<I, O> CompensationContext<I, O> {
    /// The resource of type `T` registered with the engine, as a step gets it (see
    /// [`StepContext::resource`](crate::StepContext::resource)).
    pub fn resource<T: Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        self.resources.get()
    }
}

/// The marker for a step without a compensation.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCompensation;

/// A step's compensation and its retry policy.
pub struct Compensate<F> {
    pub(super) run: F,
    pub(super) retry: Option<RetryPolicy>,
}

impl<F> fmt::Debug for Compensate<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compensate").field("retry", &self.retry).finish_non_exhaustive()
    }
}

/// A step's compensation, or [`NoCompensation`]: what the builder may hold. Sealed.
pub trait IntoCompensation<I, O>: sealed::Sealed<I, O> {}

mod sealed {
    use crate::driver::ErasedCompensation;
    use crate::retry::RetryPolicy;

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
        Some((erase(self.run), self.retry.unwrap_or(step_retry)))
    }
}

/// A compensation of a step that takes `I` and returns `O`, as the driver runs it: on the
/// journaled payloads, decoded.
pub(super) fn erase<I, O, F, Fut>(run: F) -> ErasedCompensation
where
    I: DeserializeOwned + Send + 'static,
    O: DeserializeOwned + Send + 'static,
    F: Fn(CompensationContext<I, O>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), StepError>> + Send + 'static,
{
    Arc::new(move |raw: RawCompensation| {
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
                resources: raw.resources,
            })
        });
        match decoded {
            Ok(ctx) => Box::pin(run(ctx)),
            Err(e) => Box::pin(std::future::ready(Err(StepError::terminal(format!(
                "the recorded input or output does not decode for the compensation: {e}"
            ))))),
        }
    })
}
