//! A release pipeline as a durable saga, on the embedded default: a sled event log in
//! `./hodei-data`.
//!
//! The build fails once and is retried; the smoke test then fails for good, so the deploy and
//! the build are compensated in reverse order. The saga's journal is printed as a timeline.
//!
//! ```text
//! cargo run --example quickstart                   # the smoke test fails: watch the rollback
//! HODEI_SMOKE=pass cargo run --example quickstart  # everything passes
//! ```

use std::time::Duration;

use hodei::{
    CompensationContext, Engine, Outcome, SagaContext, StepContext, StepError, Timeline, saga, step,
};

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Release {
    service: String,
    version: String,
    smoke_passes: bool,
}

#[step]
async fn checkout(_ctx: StepContext, version: String) -> Result<String, StepError> {
    Ok(format!("{version}@3f9c2e1"))
}

#[step(retry(max_attempts = 3, backoff = "50ms"), compensate = delete_image)]
async fn build(ctx: StepContext, commit: String) -> Result<String, StepError> {
    // A registry hiccup on the first try, to show a durable retry.
    if ctx.attempt == 1 {
        return Err(StepError::retryable("registry returned 503"));
    }
    Ok(format!("registry.local/app:{commit}"))
}

async fn delete_image(c: CompensationContext<String, String>) -> Result<(), StepError> {
    println!("  ↩ deleting image {:?} built from {}", c.output, c.input);
    Ok(())
}

#[step(timeout = "30s", compensate = roll_back)]
async fn deploy(_ctx: StepContext, image: String) -> Result<String, StepError> {
    Ok(format!("deployment of {image}"))
}

async fn roll_back(c: CompensationContext<String, String>) -> Result<(), StepError> {
    println!("  ↩ rolling back {} (idempotency key {})", c.input, c.idempotency_key);
    Ok(())
}

#[step(name = "smoke-test", retry(max_attempts = 1))]
async fn smoke_test(_ctx: StepContext, passes: bool) -> Result<String, StepError> {
    match passes {
        true => Ok("200 OK".into()),
        false => Err(StepError::terminal("GET /health returned 500")),
    }
}

#[saga]
async fn release(ctx: SagaContext, release: Release) -> Result<String, StepError> {
    let commit = checkout(&ctx, release.version.clone()).await?;
    let image = build(&ctx, commit).await?;
    deploy(&ctx, image).await?;
    smoke_test(&ctx, release.smoke_passes).await?;
    Ok(format!("{} {} is live", release.service, release.version))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let engine = Engine::builder().data_dir("hodei-data").register(release::definition()).start().await?;

    let input = Release {
        service: "checkout-api".into(),
        version: "v2.4.0".into(),
        smoke_passes: std::env::var("HODEI_SMOKE").is_ok_and(|v| v == "pass"),
    };
    // The id is the idempotency key: a new one per run of this example.
    let id = format!("release-{}", hodei::Timestamp::now().0);
    println!("starting saga {id}");
    let run = release::start(&engine, &id, &input).await?;

    match run.outcome().await? {
        Outcome::Completed(message) => println!("completed: {message}"),
        Outcome::Compensated { cause } => println!("compensated after: {cause}"),
        other => println!("{other:?}"),
    }
    println!("\ntimeline of {id} (journal in ./hodei-data):");
    print!("{}", Timeline(&engine.history(run.id())?));

    engine.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
