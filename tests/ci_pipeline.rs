//! The CI example's pipeline in the time-skipping test environment: its jobs stood in for, its
//! 24-hour approval window and its retries on the virtual clock. What a user of Hodei does to
//! test a pipeline of their own without workers and without waiting.

#[path = "../examples/support/ci.rs"]
mod ci_saga;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ci_saga::{APPROVAL, Approval, Pipeline, SUITES, ci};
use hodei::core::testing::{TestEnv, TestEnvBuilder};
use hodei::jobs::{Job, JobOutcome};
use hodei::{CompensationContext, Event, Outcome, SagaRun, StepContext, StepError};

const HOUR: Duration = Duration::from_secs(3600);

/// Every job step and rollback the pipeline ran, by name, in order.
type Ran = Arc<Mutex<Vec<String>>>;

/// The pipeline with a stand-in for each of its jobs (which would need workers) and for the
/// deploys' rollbacks, each recording its name.
fn pipeline_env(ran: &Ran) -> TestEnvBuilder {
    let steps = ["checkout", "build", "deploy-staging", "deploy-production"]
        .into_iter()
        .map(String::from)
        .chain(SUITES.iter().map(|suite| format!("test-{suite}")));
    let mut env = TestEnv::builder().register(ci::definition());
    for step in steps {
        let ran = ran.clone();
        env = env.stand_in(step, move |ctx: StepContext, _: Job| {
            ran.lock().unwrap().push(ctx.name.clone());
            async move { Ok::<_, StepError>(JobOutcome::succeeded(ctx.idempotency_key)) }
        });
    }
    for deploy in ["deploy-staging", "deploy-production"] {
        let ran = ran.clone();
        env = env.stand_in_compensation(deploy, move |c: CompensationContext<Job, JobOutcome>| {
            ran.lock().unwrap().push(format!("{} rollback", c.name));
            async { Ok(()) }
        });
    }
    env
}

fn run(id: &str) -> SagaRun {
    let pipeline = Pipeline { repository: "acme/shop".into(), branch: "main".into(), fail: None };
    SagaRun::new("ci", id, &pipeline).unwrap()
}

#[tokio::test]
async fn a_pipeline_approved_two_hours_in_reaches_production() {
    let real = Instant::now();
    let ran = Ran::default();
    let env = pipeline_env(&ran).start().await.unwrap();
    let pipeline = env.start(run("ci-1")).await.unwrap();
    env.wait_for(pipeline.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    env.advance(2 * HOUR).await;
    env.signal(pipeline.id(), APPROVAL, &Approval { comment: Some("LGTM".into()) }).await.unwrap();
    let outcome = pipeline.outcome::<String>().await.unwrap();
    assert_eq!(
        outcome,
        Outcome::Completed(
            "acme/shop@main is in production (LGTM); GET https://shop.example.invalid/health: 200".into()
        )
    );
    let mut ran = ran.lock().unwrap().clone();
    ran.sort();
    assert_eq!(
        ran,
        [
            "build",
            "checkout",
            "deploy-production",
            "deploy-staging",
            "test-doc",
            "test-e2e",
            "test-integration",
            "test-unit"
        ],
        "every job ran once, on its stand-in, and nothing was rolled back"
    );
    assert_eq!(env.elapsed(), 2 * HOUR);
    assert!(real.elapsed() < Duration::from_secs(1), "two hours of pipeline took {:?}", real.elapsed());
}

#[tokio::test]
async fn a_pipeline_nobody_approves_rolls_staging_back_a_day_later() {
    let ran = Ran::default();
    let env = pipeline_env(&ran).start().await.unwrap();
    let pipeline = env.start(run("ci-2")).await.unwrap();
    let outcome = pipeline.outcome::<String>().await.unwrap();
    assert_eq!(
        outcome,
        Outcome::Compensated { cause: "nobody approved the production deploy within 24 h".into() }
    );
    assert_eq!(env.elapsed(), 24 * HOUR, "the approval window is a day, from the wait's start");
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran.last().map(String::as_str), Some("deploy-staging rollback"), "{ran:?}");
    assert!(!ran.iter().any(|step| step.starts_with("deploy-production")), "{ran:?}");
}
