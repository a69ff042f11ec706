use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::context::SagaContext;
use super::shape::SagaShape;
use crate::codec::{decode_payload, encode_payload, same_value};
use crate::driver::BoxFuture;
use crate::retry::StepError;

pub(crate) type ErasedBody =
    Arc<dyn Fn(SagaContext, Vec<u8>) -> BoxFuture<Result<Vec<u8>, StepError>> + Send + Sync>;

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
    pub(crate) input: InputType,
    shape: Option<&'static SagaShape>,
}

/// The definition's input type, erased: what the engine needs of it before the body runs.
#[derive(Clone, Copy)]
pub(crate) struct InputType {
    /// Whether a payload decodes as the input type: a start whose input does not is refused,
    /// rather than started to fail at once (inputs given as JSON are checked only here).
    pub check: fn(&[u8]) -> Result<(), String>,
    /// Whether a journaled input and a new one hold the same value of the input type: the
    /// idempotent start compares as the code's type, not the bytes (see `codec::same_value`).
    pub same: fn(&[u8], &[u8]) -> Result<bool, String>,
}

impl InputType {
    fn of<I: Serialize + DeserializeOwned>() -> Self {
        fn check<I: DeserializeOwned>(payload: &[u8]) -> Result<(), String> {
            decode_payload::<I>(payload).map(drop)
        }
        fn same<I: Serialize + DeserializeOwned>(recorded: &[u8], new: &[u8]) -> Result<bool, String> {
            if recorded == new {
                return Ok(true);
            }
            same_value(recorded, &decode_payload::<I>(new)?)
        }
        Self { check: check::<I>, same: same::<I> }
    }
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
    ///
    /// The input is `Serialize` too: an idempotent start compares a new input with the
    /// journaled one as values of `I`, which it re-encodes.
    pub fn new<I, O, F, Fut>(name: impl Into<String>, version: u32, body: F) -> Self
    where
        I: Serialize + DeserializeOwned + Send + 'static,
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
        Self { name: name.into(), version, body, input: InputType::of::<I>(), shape: None }
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
