//! Shared helpers of the integration tests.
#![allow(dead_code)] // each test crate uses its own subset

#[cfg(unix)]
pub mod crash;
#[cfg(unix)]
pub mod kill_point_store;
pub mod seed;
pub mod sleepers;

use std::future::Future;
use std::sync::{Arc, Mutex};

use hodei_core::{Engine, EventStore, SagaContext, SagaDefinition, SagaId, StepError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Side effects observed by step bodies and compensations, in the order they happened.
#[derive(Clone, Default)]
pub struct Effects(Arc<Mutex<Vec<String>>>);

impl Effects {
    pub fn push(&self, effect: String) {
        self.0.lock().unwrap().push(effect);
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    pub fn count(&self, effect: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|e| *e == effect).count()
    }
}

/// A definition, with the closure types spelled once.
pub fn saga<I, O, F, Fut>(name: &str, version: u32, body: F) -> SagaDefinition
where
    I: Serialize + DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(SagaContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send + 'static,
{
    SagaDefinition::new(name, version, body)
}

pub async fn engine_with(
    store: impl EventStore,
    definitions: impl IntoIterator<Item = SagaDefinition>,
) -> Engine {
    let mut builder = Engine::builder().store(store);
    for definition in definitions {
        builder = builder.register(definition);
    }
    builder.start().await.unwrap()
}

/// The names of the saga's journaled events, in order.
pub fn events_of(engine: &Engine, id: &str) -> Vec<&'static str> {
    engine.history(&SagaId::new(id).unwrap()).unwrap().iter().map(|r| event_name(&r.event)).collect()
}

pub fn event_name(event: &hodei_core::Event) -> &'static str {
    use hodei_core::Event::*;
    match event {
        SagaStarted { .. } => "SagaStarted",
        StepStarted { .. } => "StepStarted",
        StepRetried { .. } => "StepRetried",
        StepAttemptFailed { .. } => "StepAttemptFailed",
        StepCompleted { .. } => "StepCompleted",
        StepFailed { .. } => "StepFailed",
        BodyFailed { .. } => "BodyFailed",
        CancelRequested { .. } => "CancelRequested",
        CompensationStarted { .. } => "CompensationStarted",
        CompensationAttemptFailed { .. } => "CompensationAttemptFailed",
        CompensationCompleted { .. } => "CompensationCompleted",
        CompensationFailed { .. } => "CompensationFailed",
        SagaCompleted { .. } => "SagaCompleted",
        SagaFailed { .. } => "SagaFailed",
        SagaCompensated { .. } => "SagaCompensated",
        SagaCompensationFailed { .. } => "SagaCompensationFailed",
        _ => "Unknown",
    }
}
