//! Sagas whose steps run shell jobs on a `Node`'s pooled local workers, shared by the tests
//! that run a whole node.

use hodei_core::{Engine, Outcome, SagaContext, SagaDefinition, SagaRun, StepError};
use hodei_server::jobs::{Job, JobOutcome, RemoteJobs};

use super::within;

/// `sh -c script` on a pooled worker, with a minimal PATH (jobs start with an empty environment).
pub fn shell(script: &str) -> Job {
    Job::pooled_script(["/bin/sh"], script).env("PATH", "/usr/bin:/bin")
}

/// Deploys with a rollback job, then fails for good when asked to.
pub fn deploy() -> SagaDefinition {
    SagaDefinition::new("deploy", 1, |ctx: SagaContext, fail: bool| async move {
        let deployed = ctx
            .job("deploy", shell("echo deployed"))
            .rollback(shell("echo rolled back; echo 'undo log' >&2"))
            .run()
            .await?;
        ctx.step("verify")
            .input(fail)
            .run(|_, fail: bool| async move {
                if fail { Err(StepError::terminal("verification failed")) } else { Ok(()) }
            })
            .await?;
        Ok::<JobOutcome, StepError>(deployed)
    })
}

/// Starts `saga` as run `id` and waits (bounded) for its outcome.
pub async fn run<T: serde::de::DeserializeOwned>(
    engine: &Engine,
    saga: &str,
    id: &str,
    input: &impl serde::Serialize,
) -> Outcome<T> {
    let handle = engine.start(SagaRun::new(saga, id, input).unwrap()).await.unwrap();
    within(handle.outcome::<T>()).await.unwrap()
}
