//! Behaviour of sagas written with `#[saga]` and `#[step]`.

use std::sync::Mutex;

use hodei::{
    CompensationContext, Engine, MemoryStore, Outcome, SagaContext, StepContext, StepError, saga, step,
};

static EFFECTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn effect(e: String) {
    EFFECTS.lock().unwrap().push(e);
}

#[step(retry(max_attempts = 3, backoff = "10ms", multiplier = 2.0, jitter = 0.0))]
async fn fetch(ctx: StepContext, url: String) -> Result<String, StepError> {
    effect(format!("fetch {url} attempt {}", ctx.attempt));
    if ctx.attempt < 3 { Err(StepError::retryable("503")) } else { Ok(format!("body of {url}")) }
}

#[step(name = "store-it", compensate = unstore)]
async fn store(_ctx: StepContext, key: String, body: String) -> Result<u64, StepError> {
    effect(format!("store {key}"));
    Ok(body.len() as u64)
}

async fn unstore(c: CompensationContext<(String, String), u64>) -> Result<(), StepError> {
    effect(format!("unstore {} {:?}", c.input.0, c.output));
    Ok(())
}

#[step(timeout = "20ms", retry(max_attempts = 1))]
async fn hang(_ctx: StepContext) -> Result<(), StepError> {
    std::future::pending().await
}

/// Fetches a page and stores it; hangs at the end when asked to.
#[saga(name = "mirror", version = 2)]
async fn mirror(ctx: SagaContext, hang_at_end: bool) -> Result<u64, StepError> {
    let body = fetch(&ctx, "https://example.invalid".into()).await?;
    let size = store(&ctx, "page".into(), body).await?;
    if hang_at_end {
        hang(&ctx).await?;
    }
    Ok(size)
}

#[tokio::test]
async fn macro_sagas_retry_compensate_and_time_out() {
    let engine =
        Engine::builder().store(MemoryStore::new()).register(mirror::definition()).start().await.unwrap();
    let done = mirror::start(&engine, "m1", &false).await.unwrap();
    assert_eq!(done.outcome().await.unwrap(), Outcome::Completed(31));
    let failed = mirror::start(&engine, "m2", &true).await.unwrap();
    assert!(
        matches!(failed.outcome().await.unwrap(), Outcome::Compensated { cause } if cause.contains("timed out after 20ms"))
    );
    let effects = std::mem::take(&mut *EFFECTS.lock().unwrap());
    assert_eq!(effects.len(), 9, "{effects:?}");
    assert_eq!(effects.last().unwrap(), "unstore page Some(31)");
    assert_eq!(mirror::SHAPE.steps.iter().map(|s| s.name).collect::<Vec<_>>(), ["fetch", "store-it", "hang"]);
    assert_eq!(mirror::SHAPE.steps[1].compensation, Some("unstore"));
    assert_eq!(mirror::definition().shape(), Some(&mirror::SHAPE));
    assert_eq!((mirror::NAME, mirror::VERSION), ("mirror", 2));
}
