//! What a step call brings to the driver: its journaled identity, how it runs, and its
//! compensation, erased.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::event::SagaId;
use crate::resources::Resources;
use crate::retry::{RetryPolicy, StepError};

/// A body's future, boxed so that bodies and compensations of any future type share one type.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
#[doc(hidden)]
pub type ErasedCompensation = Arc<dyn Fn(RawCompensation) -> BoxFuture<Result<(), StepError>> + Send + Sync>;

/// What a step call brings: everything the journal records about it, and its compensation.
pub(crate) struct StepSpec {
    pub name: String,
    pub input: Vec<u8>,
    pub options: StepOptions,
    pub compensation: Option<CompensationSpec>,
}

/// How a step runs, as its builder sets it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepOptions {
    pub retry: RetryPolicy,
    pub timeout: Option<Duration>,
    /// How long a stopped attempt may wind down (see `StepBuilder::cancel_grace`).
    pub wind_down: Duration,
    /// Whether an attempt cut off by a restart counts (see `StepBuilder::interruptions_count`).
    pub interruptions_count: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            timeout: None,
            wind_down: Duration::ZERO,
            interruptions_count: true,
        }
    }
}

#[derive(Clone)]
pub(crate) struct CompensationSpec {
    pub run: ErasedCompensation,
    pub retry: RetryPolicy,
    pub timeout: Option<Duration>,
}

/// What an erased compensation gets; decoded into a typed `CompensationContext`.
#[doc(hidden)]
#[derive(Debug)]
pub struct RawCompensation {
    pub saga_id: SagaId,
    pub step: u32,
    pub name: String,
    pub attempt: u32,
    pub idempotency_key: String,
    pub input: Vec<u8>,
    pub output: Option<Vec<u8>>,
    pub(crate) resources: Arc<Resources>,
}
