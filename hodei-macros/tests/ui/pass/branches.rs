// Steps called inside branches: with the branch's own context (whatever its name), the same step
// in several branches, inside `vec![...]`, and in a matrix. The shape lists each step once.
use hodei::{Branch, SagaContext, StepContext, StepError, saga, step};

#[step]
async fn build(_ctx: StepContext, target: String) -> Result<String, StepError> {
    Ok(target)
}

#[step]
async fn suite(_ctx: StepContext, name: String) -> Result<u32, StepError> {
    Ok(name.len() as u32)
}

#[step]
async fn publish(_ctx: StepContext, artifacts: Vec<String>) -> Result<usize, StepError> {
    Ok(artifacts.len())
}

#[saga]
async fn release(ctx: SagaContext, targets: Vec<String>) -> Result<usize, StepError> {
    let linux = targets[0].clone();
    let mac = targets[1].clone();
    let artifacts = ctx
        .all(
            "builds",
            vec![
                Branch::new(move |branch| async move { build(&branch, linux).await }),
                Branch::new(move |ctx: SagaContext| async move { build(&ctx, mac).await }),
            ],
        )
        .await?;
    let suites = vec!["unit".to_string(), "integration".to_string()];
    ctx.matrix("tests", suites, 2, |lane, name| async move { suite(&lane, name).await }).await?;
    publish(&ctx, artifacts).await
}

fn main() {
    let names: Vec<&str> = release::SHAPE.steps.iter().map(|s| s.name).collect();
    assert_eq!(names, ["build", "suite", "publish"]);
}
