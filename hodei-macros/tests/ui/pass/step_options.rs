// Every #[step] option, and steps with zero, one and several inputs.
use hodei::{CompensationContext, SagaContext, StepContext, StepError, saga, step};

#[step]
async fn no_input(_ctx: StepContext) -> Result<(), StepError> {
    Ok(())
}

#[step(name = "renamed")]
async fn named(_ctx: StepContext, n: u32) -> Result<u32, StepError> {
    Ok(n)
}

#[step(compensate = undo_pair)]
async fn pair(_ctx: StepContext, a: String, b: u8) -> Result<String, StepError> {
    Ok(format!("{a}{b}"))
}

async fn undo_pair(_c: CompensationContext<(String, u8), String>) -> Result<(), StepError> {
    Ok(())
}

#[step(retry(max_attempts = 5, backoff = "100ms", max_backoff = "1m", multiplier = 1.5, jitter = 0.1))]
async fn retried(_ctx: StepContext) -> Result<(), std::io::Error> {
    Ok(())
}

#[step(timeout = "1m30s")]
async fn bounded(_ctx: StepContext) -> Result<(), StepError> {
    Ok(())
}

#[saga]
async fn all(ctx: SagaContext, _input: ()) -> Result<String, StepError> {
    no_input(&ctx).await?;
    let n = named(&ctx, 1).await?;
    retried(&ctx).await?;
    bounded(&ctx).await?;
    pair(&ctx, "x".into(), n as u8).await
}

fn main() {
    let names: Vec<_> = all::SHAPE.steps.iter().map(|s| s.name).collect();
    assert_eq!(names, ["no_input", "renamed", "retried", "bounded", "pair"]);
}
