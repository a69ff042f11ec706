//! A CI pipeline: checkout, build, test and deploy as durable steps, with rollback
//! compensations for the deploy.
//!
//! ```text
//! cargo run --example ci_pipeline                      # everything passes
//! cargo run --example ci_pipeline -- --fail verify     # the post-deploy check fails:
//!                                                      # the deploys are rolled back
//! HODEI_FAIL=test cargo run --example ci_pipeline      # a failing test: nothing to roll back
//! ```
//! `--fail` (or `HODEI_FAIL`) takes `checkout`, `build`, `test`, `deploy-staging`,
//! `deploy-production` or `verify`.

use std::time::Duration;

use hodei::{
    CompensationContext, Engine, Outcome, SagaContext, StepContext, StepError, Timeline, saga, step,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Pipeline {
    repository: String,
    branch: String,
    /// The step that fails, to show what happens then.
    fail: Option<String>,
}

fn maybe_fail(ctx: &StepContext, fail: &Option<String>) -> Result<(), StepError> {
    match fail {
        Some(step) if *step == ctx.name => Err(StepError::terminal(format!("{step}: exit status 1"))),
        _ => Ok(()),
    }
}

#[step(retry(max_attempts = 3, backoff = "200ms"))]
async fn checkout(ctx: StepContext, pipeline: Pipeline) -> Result<String, StepError> {
    maybe_fail(&ctx, &pipeline.fail)?;
    Ok(format!("{}@{}:9b1d4e0", pipeline.repository, pipeline.branch))
}

#[step(timeout = "10m")]
async fn build(ctx: StepContext, commit: String, fail: Option<String>) -> Result<String, StepError> {
    maybe_fail(&ctx, &fail)?;
    Ok(format!("target/release/app ({commit})"))
}

#[step(timeout = "20m")]
async fn test(ctx: StepContext, artifact: String, fail: Option<String>) -> Result<u32, StepError> {
    maybe_fail(&ctx, &fail)?;
    let _ = artifact;
    Ok(1_284)
}

#[step(name = "deploy-staging", compensate = roll_back, timeout = "5m")]
async fn deploy_staging(
    ctx: StepContext,
    artifact: String,
    fail: Option<String>,
) -> Result<String, StepError> {
    maybe_fail(&ctx, &fail)?;
    Ok(format!("staging now runs {artifact}"))
}

#[step(name = "deploy-production", compensate = roll_back, timeout = "5m")]
async fn deploy_production(
    ctx: StepContext,
    artifact: String,
    fail: Option<String>,
) -> Result<String, StepError> {
    maybe_fail(&ctx, &fail)?;
    Ok(format!("production now runs {artifact}"))
}

/// Rolls a deploy back. Runs for a deploy that completed and, with `output` None, for one that
/// started but whose completion was never recorded.
async fn roll_back(c: CompensationContext<(String, Option<String>), String>) -> Result<(), StepError> {
    match c.output {
        Some(done) => println!("  ↩ {}: rolling back ({done})", c.name),
        None => println!("  ↩ {}: rolling back a deploy that may have half happened", c.name),
    }
    Ok(())
}

#[step(retry(max_attempts = 2, backoff = "100ms"))]
async fn verify(ctx: StepContext, fail: Option<String>) -> Result<(), StepError> {
    maybe_fail(&ctx, &fail)
}

#[saga(name = "ci", version = 1)]
async fn ci(ctx: SagaContext, pipeline: Pipeline) -> Result<String, StepError> {
    let fail = pipeline.fail.clone();
    let commit = checkout(&ctx, pipeline).await?;
    let artifact = build(&ctx, commit, fail.clone()).await?;
    let passed = test(&ctx, artifact.clone(), fail.clone()).await?;
    deploy_staging(&ctx, artifact.clone(), fail.clone()).await?;
    deploy_production(&ctx, artifact.clone(), fail.clone()).await?;
    verify(&ctx, fail).await?;
    Ok(format!("{passed} tests passed; {artifact} is in production"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let fail = match args.iter().position(|a| a == "--fail") {
        Some(i) => Some(args.get(i + 1).cloned().ok_or_else(|| anyhow::anyhow!("--fail needs a step name"))?),
        None => std::env::var("HODEI_FAIL").ok(),
    };
    let known: Vec<&str> = ci::SHAPE.steps.iter().map(|s| s.name).collect();
    if let Some(step) = fail.as_deref().filter(|s| !known.contains(s)) {
        anyhow::bail!("--fail {step}: no such step; the steps are {}", known.join(", "));
    }

    println!("pipeline `{}` v{}:", ci::NAME, ci::VERSION);
    for step in ci::SHAPE.steps {
        let undo = step.compensation.map(|c| format!(" (compensated by {c})")).unwrap_or_default();
        println!("  - {}{undo}", step.name);
    }

    let engine = Engine::builder().data_dir("hodei-data").register(ci::definition()).start().await?;
    let pipeline = Pipeline { repository: "acme/shop".into(), branch: "main".into(), fail };
    let id = format!("ci-{}", hodei::Timestamp::now().0);
    let run = ci::start(&engine, &id, &pipeline).await?;
    match run.outcome().await? {
        Outcome::Completed(summary) => println!("\n{id} passed: {summary}"),
        Outcome::Compensated { cause } => println!("\n{id} failed ({cause}); every deploy was rolled back"),
        Outcome::Failed { cause } => println!("\n{id} failed ({cause}); nothing to roll back"),
        other => println!("\n{id}: {other:?}"),
    }
    println!("\ntimeline:");
    print!("{}", Timeline(&engine.history(run.id())?));
    engine.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
