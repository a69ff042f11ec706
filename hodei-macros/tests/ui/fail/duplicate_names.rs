use hodei::{SagaContext, StepContext, StepError, saga, step};

#[step(name = "deploy")]
async fn deploy_staging(_ctx: StepContext) -> Result<(), StepError> {
    Ok(())
}

#[step(name = "deploy")]
async fn deploy_production(_ctx: StepContext) -> Result<(), StepError> {
    Ok(())
}

#[saga]
async fn release(ctx: SagaContext, _: ()) -> Result<(), StepError> {
    deploy_staging(&ctx).await?;
    deploy_production(&ctx).await
}

fn main() {}
