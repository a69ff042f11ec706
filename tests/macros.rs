//! Behaviour of sagas written with `#[saga]` and `#[step]`: the declared retry policy, the
//! timeout and the compensations are the ones the engine applies. The crash test of a macro
//! saga is `tests/macros_crash.rs`; compile errors are `tests/macros_ui.rs`.

use std::sync::Mutex;

use hodei::{
    CompensationContext, Engine, Event, MemoryStore, Outcome, SagaContext, SagaId, StepContext, StepError,
    saga, step,
};

/// Side effects as `(saga id, effect)`: the tests run concurrently and read only their own.
static EFFECTS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn effect(saga: &SagaId, e: String) {
    EFFECTS.lock().unwrap().push((saga.to_string(), e));
}

fn effects_of(saga: &str) -> Vec<String> {
    EFFECTS.lock().unwrap().iter().filter(|(s, _)| s == saga).map(|(_, e)| e.clone()).collect()
}

#[step(retry(max_attempts = 3, backoff = "10ms", multiplier = 2.0, jitter = 0.0))]
async fn fetch(ctx: StepContext, url: String) -> Result<String, StepError> {
    effect(&ctx.saga_id, format!("fetch attempt {}", ctx.attempt));
    if ctx.attempt < 3 { Err(StepError::retryable("503")) } else { Ok(format!("body of {url}")) }
}

#[step(name = "store-it", compensate = unstore)]
async fn store(ctx: StepContext, key: String, body: String) -> Result<u64, StepError> {
    effect(&ctx.saga_id, format!("store {key}"));
    Ok(body.len() as u64)
}

async fn unstore(c: CompensationContext<(String, String), u64>) -> Result<(), StepError> {
    effect(&c.saga_id, format!("unstore {} {:?}", c.input.0, c.output));
    Ok(())
}

#[step(compensate = unindex)]
async fn index(ctx: StepContext, size: u64) -> Result<(), StepError> {
    effect(&ctx.saga_id, format!("index {size}"));
    Ok(())
}

async fn unindex(c: CompensationContext<u64, ()>) -> Result<(), StepError> {
    effect(&c.saga_id, format!("unindex {}", c.input));
    Ok(())
}

#[step(timeout = "20ms", retry(max_attempts = 1))]
async fn hang(_ctx: StepContext) -> Result<(), StepError> {
    std::future::pending().await
}

/// Fetches a page, stores and indexes it; hangs at the end when asked to.
#[saga(name = "mirror", version = 2)]
async fn mirror(ctx: SagaContext, hang_at_end: bool) -> Result<u64, StepError> {
    let body = fetch(&ctx, "https://example.invalid".into()).await?;
    let size = store(&ctx, "page".into(), body).await?;
    index(&ctx, size).await?;
    if hang_at_end {
        hang(&ctx).await?;
    }
    Ok(size)
}

async fn engine() -> Engine {
    Engine::builder().store(MemoryStore::new()).register(mirror::definition()).start().await.unwrap()
}

#[tokio::test]
async fn the_declared_retry_policy_is_journaled_and_followed() {
    let engine = engine().await;
    let run = mirror::start(&engine, "m1", &false).await.unwrap();
    assert_eq!(run.outcome().await.unwrap(), Outcome::Completed(31));
    let waits: Vec<u64> = engine
        .history(&SagaId::new("m1").unwrap())
        .unwrap()
        .iter()
        .filter_map(|r| match &r.event {
            Event::StepAttemptFailed { retry_at, .. } => Some(retry_at.0 - r.at.0),
            _ => None,
        })
        .collect();
    assert_eq!(waits, [10, 20], "backoff 10ms, multiplier 2, no jitter");
    assert_eq!(
        effects_of("m1"),
        ["fetch attempt 1", "fetch attempt 2", "fetch attempt 3", "store page", "index 31"]
    );
}

#[tokio::test]
async fn a_timeout_fails_the_saga_and_compensations_run_in_reverse() {
    let engine = engine().await;
    let run = mirror::start(&engine, "m2", &true).await.unwrap();
    match run.outcome().await.unwrap() {
        Outcome::Compensated { cause } => assert_eq!(cause, "step `hang` timed out after 20ms"),
        other => panic!("{other:?}"),
    }
    assert_eq!(effects_of("m2")[3..], ["store page", "index 31", "unindex 31", "unstore page Some(31)"]);
}

#[test]
fn the_shape_lists_the_step_calls_with_their_compensations() {
    let names: Vec<_> = mirror::SHAPE.steps.iter().map(|s| (s.name, s.compensation)).collect();
    assert_eq!(
        names,
        [("fetch", None), ("store-it", Some("unstore")), ("index", Some("unindex")), ("hang", None)]
    );
    assert_eq!(mirror::definition().shape(), Some(&mirror::SHAPE));
    assert_eq!((mirror::NAME, mirror::VERSION), ("mirror", 2));
}
