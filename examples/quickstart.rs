//! A release pipeline as a durable saga, on the embedded default: a sled event log in
//! `./hodei-data`.
//!
//! Four steps run; the last one fails for good, so the completed ones are compensated in
//! reverse order. The program then prints the saga's journal as a timeline.
//!
//! ```text
//! cargo run --example quickstart              # the smoke test fails: watch the rollback
//! HODEI_SMOKE=pass cargo run --example quickstart   # everything passes
//! ```

use std::time::Duration;

use hodei::{
    CompensationContext, Engine, Event, Outcome, RecordedEvent, RetryPolicy, SagaDefinition, SagaRun,
    StepError,
};

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Release {
    service: String,
    version: String,
    smoke_passes: bool,
}

fn release_pipeline() -> SagaDefinition {
    SagaDefinition::new("release", 1, |ctx, release: Release| async move {
        let commit = ctx
            .step("checkout")
            .input(release.version.clone())
            .run(|_, version: String| async move { Ok::<_, StepError>(format!("{version}@3f9c2e1")) })
            .await?;

        let image = ctx
            .step("build")
            .input(commit)
            .retry(RetryPolicy::attempts(3).initial_backoff(Duration::from_millis(50)))
            .compensate(|c: CompensationContext<String, String>| async move {
                println!("  ↩ deleting image {:?} built from {}", c.output, c.input);
                Ok(())
            })
            .run(|step, commit: String| async move {
                // A registry hiccup on the first try, to show a durable retry.
                if step.attempt == 1 {
                    return Err(StepError::retryable("registry returned 503"));
                }
                Ok(format!("registry.local/app:{commit}"))
            })
            .await?;

        ctx.step("deploy")
            .input(image)
            .timeout(Duration::from_secs(30))
            .compensate(|c: CompensationContext<String, String>| async move {
                println!("  ↩ rolling back deployment {} (idempotency key {})", c.input, c.idempotency_key);
                Ok(())
            })
            .run(|_, image: String| async move { Ok::<_, StepError>(format!("deployment of {image}")) })
            .await?;

        ctx.step("smoke-test")
            .input(release.smoke_passes)
            .retry(RetryPolicy::none())
            .run(|_, passes: bool| async move {
                match passes {
                    true => Ok("200 OK".to_string()),
                    false => Err(StepError::terminal("GET /health returned 500")),
                }
            })
            .await?;
        Ok(format!("{} {} is live", release.service, release.version))
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let engine = Engine::builder().data_dir("hodei-data").register(release_pipeline()).start().await?;

    let release = Release {
        service: "checkout-api".into(),
        version: "v2.4.0".into(),
        smoke_passes: std::env::var("HODEI_SMOKE").is_ok_and(|v| v == "pass"),
    };
    // The id is the idempotency key: a new one per run of this example.
    let id = format!("release-{}", hodei::Timestamp::now().0);
    println!("starting saga {id}");
    let run = engine.start(SagaRun::new("release", &id, &release)?).await?;

    match run.outcome::<String>().await? {
        Outcome::Completed(message) => println!("completed: {message}"),
        Outcome::Compensated { cause } => println!("compensated after: {cause}"),
        Outcome::Failed { cause } => println!("failed: {cause}"),
        Outcome::CompensationFailed { step, error, undone } => {
            println!("compensation of `{}` failed ({error}); left undone: {undone:?}", step.name)
        }
        other => println!("{other:?}"),
    }

    println!("\ntimeline of {id} (journal in ./hodei-data):");
    let history = engine.history(run.id())?;
    let start = history.first().map_or(0, |r| r.at.0);
    let mut names = std::collections::HashMap::new();
    for recorded in &history {
        if let Event::StepStarted { step, name, .. } = &recorded.event {
            names.insert(*step, name.clone());
        }
        println!("  +{:>4} ms  #{:<2} {}", recorded.at.0 - start, recorded.seq, describe(recorded, &names));
    }

    engine.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}

fn describe(recorded: &RecordedEvent, names: &std::collections::HashMap<u32, String>) -> String {
    let name = |step: &u32| names.get(step).cloned().unwrap_or_else(|| format!("step {step}"));
    match &recorded.event {
        Event::SagaStarted { definition, version, .. } => format!("saga started ({definition} v{version})"),
        Event::StepStarted { step, .. } => format!("{} started", name(step)),
        Event::StepRetried { step, attempt } => format!("{} attempt {attempt} started", name(step)),
        Event::StepAttemptFailed { step, attempt, error, .. } => {
            format!("{} attempt {attempt} failed: {error} (will retry)", name(step))
        }
        Event::StepCompleted { step, .. } => format!("{} completed", name(step)),
        Event::StepFailed { step, error, .. } => format!("{} failed for good: {error}", name(step)),
        Event::BodyFailed { cause } => format!("saga failed: {cause}; compensating"),
        Event::CancelRequested { reason } => format!("cancel requested: {reason}"),
        Event::CompensationStarted { step, .. } => format!("compensating {}", name(step)),
        Event::CompensationCompleted { step } => format!("{} compensated", name(step)),
        Event::CompensationAttemptFailed { step, error, .. } => {
            format!("compensating {} failed: {error}", name(step))
        }
        Event::CompensationFailed { step, error } => {
            format!("compensation of {} failed: {error}", name(step))
        }
        Event::SagaCompleted { .. } => "saga completed".into(),
        Event::SagaCompensated { .. } => "saga compensated".into(),
        Event::SagaFailed { cause } => format!("saga failed: {cause}"),
        Event::SagaCompensationFailed { step, .. } => {
            format!("saga stopped: compensation of {} failed", name(step))
        }
        other => format!("{other:?}"),
    }
}
