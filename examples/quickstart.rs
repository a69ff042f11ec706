//! A release pipeline as a durable saga, on the embedded default: a sled event log, the hub's
//! CA and the jobs' logs, all in `./hodei-data`.
//!
//! Its first three steps are real shell jobs: checkout, build and test. Each runs on a worker
//! the local provider starts on demand: a real `hodei-agent` (in this process) that registers
//! with the embedded control plane over gRPC and mutual TLS on loopback, runs the job, and is
//! destroyed after it. The jobs share a workspace directory; the test job receives a registry
//! token as a secret, which is masked in its log. Then the deploy job runs, with a rollback
//! job as its compensation, and the smoke test fails for good, so the deploy is rolled back.
//! Each job's stored log and the saga's journal are printed.
//!
//! ```text
//! cargo run --example quickstart                   # the smoke test fails: watch the rollback
//! HODEI_SMOKE=pass cargo run --example quickstart  # everything passes
//! ```

use std::time::Duration;

use hodei::jobs::{Job, MemorySecrets, RemoteJobs, saga_jobs};
use hodei::server::logstore::LogStream;
use hodei::{Node, Outcome, SagaContext, StepContext, StepError, Timeline, saga, step};

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Release {
    service: String,
    version: String,
    /// Where the jobs check out, build and test.
    workspace: String,
    smoke_passes: bool,
}

/// A job running `script` with `/bin/sh` on a pooled worker, in `release`'s workspace.
fn shell(release: &Release, script: &str) -> Job {
    Job::pooled_script(["/bin/sh"], script)
        .env("PATH", "/usr/bin:/bin")
        .env("WS", &release.workspace)
        .env("VERSION", &release.version)
        .timeout(Duration::from_secs(60))
}

const CHECKOUT: &str = r#"
mkdir -p "$WS/src"
printf '#!/bin/sh\necho "checkout-api $1 says hello"\n' > "$WS/src/app.sh"
echo "checked out $VERSION into $WS"
"#;

const BUILD: &str = r#"
mkdir -p "$WS/dist"
cp "$WS/src/app.sh" "$WS/dist/app" && chmod +x "$WS/dist/app"
echo "built dist/app, sha256 $(sha256sum "$WS/dist/app" | cut -c1-12)"
"#;

// Each secret is a shell variable holding its value (set from stdin, never exported).
const TEST: &str = r#"
out=$("$WS/dist/app" "$VERSION")
[ "$out" = "checkout-api $VERSION says hello" ] || { echo "unexpected output: $out" >&2; exit 1; }
echo "1 test passed: $out"
echo "logging in to the registry with $REGISTRY_TOKEN"
echo "test results in $WS/report" >&2
"#;

const DEPLOY: &str = r#"
mkdir -p "$WS/live" && cp "$WS/dist/app" "$WS/live/app"
echo "deployed checkout-api $VERSION to $WS/live"
"#;

const ROLL_BACK: &str = r#"
rm -f "$WS/live/app"
echo "rolled back checkout-api $VERSION: $WS/live is empty again"
"#;

#[step(name = "smoke-test", retry(max_attempts = 1))]
async fn smoke_test(_ctx: StepContext, passes: bool) -> Result<String, StepError> {
    match passes {
        true => Ok("200 OK".into()),
        false => Err(StepError::terminal("GET /health returned 500")),
    }
}

#[saga]
async fn release(ctx: SagaContext, release: Release) -> Result<String, StepError> {
    ctx.run_job("checkout", shell(&release, CHECKOUT)).await?;
    ctx.run_job("build", shell(&release, BUILD)).await?;
    ctx.run_job("test", shell(&release, TEST).secret("REGISTRY_TOKEN", "registry-token")).await?;
    // If a later step fails for good, the rollback job undoes the deploy.
    ctx.job("deploy", shell(&release, DEPLOY)).rollback(shell(&release, ROLL_BACK)).run().await?;
    smoke_test(&ctx, release.smoke_passes).await?;
    Ok(format!("{} {} is live", release.service, release.version))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The sled journal, the control plane (its CA and listeners on loopback, the jobs' logs, a
    // scheduler that starts in-process local workers) and the engine, all in ./hodei-data.
    // Workers an earlier, interrupted run left are kept for its sagas still in flight, the
    // others destroyed, before the engine resumes those sagas.
    let node = Node::builder("hodei-data")
        .register(release::definition())
        .secrets(MemorySecrets::new().insert("registry-token", "rt-9f3c51d7e2a4"))
        .start()
        .await?;
    if !node.reaped().destroyed.is_empty() {
        println!("reaped {} worker(s) left by an earlier run", node.reaped().destroyed.len());
    }

    // The id is the idempotency key: a new one per run of this example.
    let id = format!("release-{}", hodei::Timestamp::now().0);
    let workspace = std::env::temp_dir().join(format!("hodei-quickstart-{id}"));
    let input = Release {
        service: "checkout-api".into(),
        version: "v2.4.0".into(),
        workspace: workspace.display().to_string(),
        smoke_passes: std::env::var("HODEI_SMOKE").is_ok_and(|v| v == "pass"),
    };
    println!("starting saga {id}");
    let run = release::start(node.engine(), &id, &input).await?;

    match run.outcome().await? {
        Outcome::Completed(message) => println!("completed: {message}"),
        Outcome::Compensated { cause } => println!("compensated after: {cause}"),
        other => println!("{other:?}"),
    }

    let history = node.engine().history(run.id())?;
    println!("\njob logs (stored by the control plane in ./hodei-data/logs):");
    // Every attempt of every job, by step: its id is `saga id/operation key#attempt`.
    for job in saga_jobs(node.control_plane().hub(), run.id(), &history).await? {
        println!("  {} ({})", job.name, job.job_id);
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let log = node.control_plane().logs().read(&job.job_id, stream, 0, 64 * 1024).await?;
            for line in String::from_utf8_lossy(&log.bytes).lines() {
                println!("    {stream}| {line}");
            }
        }
    }
    println!("\ntimeline of {id} (journal in ./hodei-data):");
    print!("{}", Timeline(&history));

    node.shutdown(Duration::from_secs(5)).await?;
    let _ = std::fs::remove_dir_all(&workspace);
    Ok(())
}
