use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::context::SagaContext;
use super::shape::SagaShape;
use crate::codec::{decode_payload, encode_payload};
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
    shape: Option<&'static SagaShape>,
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
