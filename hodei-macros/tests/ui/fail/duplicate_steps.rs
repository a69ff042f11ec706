use hodei::{SagaContext, StepContext, StepError, saga, step};

#[step]
async fn deploy(_ctx: StepContext, env: String) -> Result<(), StepError> {
    let _ = env;
    Ok(())
}

#[saga]
async fn release(ctx: SagaContext, _: ()) -> Result<(), StepError> {
    deploy(&ctx, "staging".into()).await?;
    deploy(&ctx, "production".into()).await
}

fn main() {}
