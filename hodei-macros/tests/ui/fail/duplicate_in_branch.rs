// Two calls of one step in the same branch are two steps sharing a name.
use hodei::{Branch, SagaContext, StepContext, StepError, saga, step};

#[step]
async fn build(_ctx: StepContext, target: String) -> Result<String, StepError> {
    Ok(target)
}

#[saga]
async fn release(ctx: SagaContext, target: String) -> Result<Vec<String>, StepError> {
    ctx.all(
        "builds",
        vec![Branch::new(move |branch| async move {
            build(&branch, target.clone()).await?;
            build(&branch, target).await
        })],
    )
    .await
}

fn main() {}
