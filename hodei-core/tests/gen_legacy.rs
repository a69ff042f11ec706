//! One-off: writes tests/fixtures/legacy-v1 with the code of before JSON payloads.
use std::time::Duration;

use hodei_core::{Engine, Event, Outcome, SagaContext, SagaDefinition, SagaId, SagaRun, StepError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Request {
    repo: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Approval {
    by: String,
    ticket: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Done {
    summary: String,
    count: u64,
}

fn deploy() -> SagaDefinition {
    SagaDefinition::new("legacy-deploy", 1, |ctx: SagaContext, input: Request| async move {
        let sha = ctx
            .step("checkout")
            .input(input.repo.clone())
            .run(|_, repo: String| async move { Ok::<_, StepError>(format!("{repo}@abc123")) })
            .await?;
        let first: Approval = ctx.wait_signal("approve").await?;
        let second: Approval = ctx.wait_signal("second").await?;
        ctx.step("deploy")
            .input((sha, first.by, second.by, first.ticket + second.ticket))
            .run(|_, (sha, a, b, t): (String, String, String, u32)| async move {
                Ok::<_, StepError>(Done { summary: format!("{sha} approved by {a} and {b}"), count: t as u64 })
            })
            .await
    })
}

fn done() -> SagaDefinition {
    SagaDefinition::new("legacy-done", 1, |ctx: SagaContext, input: Request| async move {
        let n = ctx.step("count").input(input.repo.clone()).run(|_, r: String| async move { Ok::<_, StepError>(r.len() as u64) }).await?;
        Ok::<_, StepError>(Done { summary: format!("{} done", input.repo), count: n })
    })
}

#[tokio::test]
#[ignore]
async fn generate() {
    let dir = std::path::PathBuf::from(std::env::var("FIXTURE").unwrap());
    let engine = Engine::builder().data_dir(&dir).register(deploy()).register(done()).start().await.unwrap();
    let h = engine.start(SagaRun::new("legacy-done", "done-1", &Request { repo: "hodei".into() }).unwrap()).await.unwrap();
    assert_eq!(h.outcome::<Done>().await.unwrap(), Outcome::Completed(Done { summary: "hodei done".into(), count: 5 }));
    engine.start(SagaRun::new("legacy-deploy", "deploy-1", &Request { repo: "hodei".into() }).unwrap()).await.unwrap();
    let id = SagaId::new("deploy-1").unwrap();
    engine.signal(&id, "approve", &Approval { by: "ana".into(), ticket: 40 }).await.unwrap();
    loop {
        let h = engine.history(&id).unwrap();
        if h.iter().any(|r| matches!(&r.event, Event::SignalWaitStarted { name, .. } if name == "second")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for r in engine.history(&id).unwrap() {
        println!("{r:?}");
    }
    engine.shutdown(Duration::ZERO).await.unwrap();
}
