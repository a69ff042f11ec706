//! The CI example's pipeline: what `examples/ci_pipeline.rs` serves, and what
//! `tests/ci_pipeline.rs` runs on a virtual clock with stand-ins for its jobs.

use std::time::Duration;

use hodei::jobs::{Job, RemoteJobs};
use hodei::{SagaContext, StepContext, StepError, saga, step};
use serde::{Deserialize, Serialize};

/// The signal the approval gate waits for.
pub const APPROVAL: &str = "approval";
/// How long the gate waits. The deadline is journaled when the wait begins, so restarts do not
/// extend it; past it the pipeline fails and staging is rolled back.
pub const APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// The test matrix, and how many suites run at once.
pub const SUITES: [&str; 4] = ["unit", "integration", "doc", "e2e"];
const PARALLEL_SUITES: usize = 2;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Pipeline {
    pub repository: String,
    pub branch: String,
    /// The step that fails, to show what happens then.
    #[serde(default)]
    pub fail: Option<String>,
}

/// The payload of the `approval` signal. Who approved is journaled from the API token.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Approval {
    #[serde(default)]
    pub comment: Option<String>,
}

/// A shell job on a pooled local worker; `FAIL` names the step that must fail.
fn shell(pipeline: &Pipeline, step: &str, script: &str) -> Job {
    let fail = pipeline.fail.as_deref() == Some(step);
    Job::pooled_script(["/bin/sh"], script)
        .env("PATH", "/usr/bin:/bin")
        .env("REPO", &pipeline.repository)
        .env("BRANCH", &pipeline.branch)
        .env("FAIL", if fail { "1" } else { "" })
        .timeout(Duration::from_secs(600))
}

const CHECKOUT: &str = r#"
echo "Cloning https://git.example.invalid/$REPO.git (branch $BRANCH)"
sleep 0.3
echo "HEAD is now at 9b1d4e0 Merge pull request #412"
[ -z "$FAIL" ] || { echo "fatal: could not read from remote repository" >&2; exit 128; }
"#;

const BUILD: &str = r#"
for crate in serde tokio axum shop-core shop-api shop; do
  echo "   Compiling $crate v1.0.0"
  sleep 0.25
done
[ -z "$FAIL" ] || { echo "error[E0308]: mismatched types" >&2; exit 101; }
echo "    Finished release [optimized] target(s) in 1.52s"
"#;

const TEST: &str = r#"
echo "running $COUNT tests ($SUITE)"
i=1
while [ $i -le $COUNT ]; do
  echo "test $SUITE::case_$i ... ok"
  i=$((i + 1))
  sleep 0.05
done
if [ -n "$FAIL" ] && [ "$SUITE" = integration ]; then
  echo "test integration::checkout_flow ... FAILED" >&2
  exit 101
fi
echo "test result: ok. $COUNT passed; 0 failed"
"#;

const DEPLOY: &str = r#"
echo "deploying $REPO@$BRANCH to $TARGET"
sleep 0.5
[ -z "$FAIL" ] || { echo "deploy to $TARGET failed: health check timed out" >&2; exit 1; }
echo "$TARGET now runs $REPO@$BRANCH"
"#;

const ROLL_BACK: &str = r#"
echo "rolling $TARGET back to the previous release"
sleep 0.2
echo "$TARGET rolled back"
"#;

fn deploy(pipeline: &Pipeline, step: &str, target: &str) -> (Job, Job) {
    (
        shell(pipeline, step, DEPLOY).env("TARGET", target),
        shell(pipeline, step, ROLL_BACK).env("TARGET", target),
    )
}

#[step(retry(max_attempts = 2, backoff = "1s"))]
async fn verify(ctx: StepContext, fail: Option<String>) -> Result<String, StepError> {
    match fail {
        Some(step) if step == ctx.name => {
            Err(StepError::terminal("GET https://shop.example.invalid/health: 500"))
        }
        _ => Ok("GET https://shop.example.invalid/health: 200".into()),
    }
}

// Version 3: the steps became jobs on workers, so runs of earlier versions must not replay
// against it.
#[saga(name = "ci", version = 3)]
pub async fn ci(ctx: SagaContext, pipeline: Pipeline) -> Result<String, StepError> {
    ctx.run_job("checkout", shell(&pipeline, "checkout", CHECKOUT)).await?;
    ctx.run_job("build", shell(&pipeline, "build", BUILD)).await?;
    let suites = SUITES.iter().map(|s| s.to_string()).collect();
    let for_matrix = pipeline.clone();
    ctx.matrix("tests", suites, PARALLEL_SUITES, move |ctx, suite: String| {
        let count = match suite.as_str() {
            "unit" => 24,
            "integration" => 12,
            _ => 6,
        };
        let job = shell(&for_matrix, "test", TEST).env("SUITE", &suite).env("COUNT", count.to_string());
        async move { ctx.run_job(&format!("test-{suite}"), job).await }
    })
    .await?;
    let (staging, undo_staging) = deploy(&pipeline, "deploy-staging", "staging");
    ctx.job("deploy-staging", staging).rollback(undo_staging).run().await?;
    let approval = ctx
        .wait_signal_timeout::<Approval>(APPROVAL, APPROVAL_TIMEOUT)
        .await?
        .ok_or_else(|| StepError::terminal("nobody approved the production deploy within 24 h"))?;
    let (production, undo_production) = deploy(&pipeline, "deploy-production", "production");
    ctx.job("deploy-production", production).rollback(undo_production).run().await?;
    let health = verify(&ctx, pipeline.fail.clone()).await?;
    let note = approval.comment.map(|c| format!(" ({c})")).unwrap_or_default();
    Ok(format!("{}@{} is in production{note}; {health}", pipeline.repository, pipeline.branch))
}
