//! A release pipeline as a durable saga, on the embedded default: a sled event log, the hub's
//! CA and the jobs' logs, all in `./hodei-data`.
//!
//! Its first three steps are real shell jobs: checkout, build and test. Each runs on a worker
//! the local provider starts on demand: a real `hodei-agent` (in this process) that registers
//! with the embedded control plane over gRPC and mutual TLS on loopback, runs the job, and is
//! destroyed after it. The jobs share a workspace directory; the test job receives a registry
//! token as a secret, which is masked in its log. Then the deploy runs, and the smoke test
//! fails for good, so the deploy is compensated. Each job's stored log and the saga's journal
//! are printed.
//!
//! ```text
//! cargo run --example quickstart                   # the smoke test fails: watch the rollback
//! HODEI_SMOKE=pass cargo run --example quickstart  # everything passes
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hodei::agent::jobs::{Job, JobDispatcher, MemorySecrets, RemoteJobs};
use hodei::agent::logstore::LogStream;
use hodei::providers::ControlPlane;
use hodei::{
    CompensationContext, Engine, Event, Outcome, SagaContext, SledStore, StepContext, StepError, Timeline,
    saga, step,
};

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Release {
    service: String,
    version: String,
    /// Where the jobs check out, build and test.
    workspace: String,
    smoke_passes: bool,
}

/// How the saga's jobs reach the control plane. A saga's body only gets its context and its
/// (journaled) input, so the dispatcher, which holds live connections, is set once at start.
static JOBS: OnceLock<JobDispatcher> = OnceLock::new();

/// A job running `script` with `/bin/sh` on a pooled worker, in `release`'s workspace.
fn shell(release: &Release, script: &str) -> Job {
    Job::pooled_script(["/bin/sh", "-s"], script)
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

// Secrets arrive on stdin as `NAME=<base64>` lines that `sh -s` reads as assignments.
const TEST: &str = r#"
TOKEN=$(printf %s "$REGISTRY_TOKEN" | base64 -d)
out=$("$WS/dist/app" "$VERSION")
[ "$out" = "checkout-api $VERSION says hello" ] || { echo "unexpected output: $out" >&2; exit 1; }
echo "1 test passed: $out"
echo "logging in to the registry with $TOKEN"
echo "test results in $WS/report" >&2
"#;

#[step(timeout = "30s", compensate = roll_back)]
async fn deploy(_ctx: StepContext, release: Release) -> Result<String, StepError> {
    Ok(format!("deployment of {}:{}", release.service, release.version))
}

async fn roll_back(c: CompensationContext<Release, String>) -> Result<(), StepError> {
    println!("  ↩ rolling back {:?} (idempotency key {})", c.output, c.idempotency_key);
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
    let jobs = JOBS.get().ok_or_else(|| StepError::terminal("the job dispatcher is not set"))?;
    ctx.run_job(jobs, "checkout", shell(&release, CHECKOUT)).await?;
    ctx.run_job(jobs, "build", shell(&release, BUILD)).await?;
    ctx.run_job(jobs, "test", shell(&release, TEST).secret("REGISTRY_TOKEN", "registry-token")).await?;
    deploy(&ctx, release.clone()).await?;
    smoke_test(&ctx, release.smoke_passes).await?;
    Ok(format!("{} {} is live", release.service, release.version))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The control plane: the hub's CA and listeners on loopback, the log store, and a scheduler
    // whose default provider starts in-process local workers.
    let control = ControlPlane::builder("hodei-data").start().await?;
    let secrets = MemorySecrets::new().insert("registry-token", "rt-9f3c51d7e2a4");
    JOBS.set(control.dispatcher(Arc::new(secrets))).map_err(|_| anyhow::anyhow!("dispatcher set twice"))?;
    // The sled event log, shared with the engine: it says which sagas an earlier, interrupted
    // run left in flight. Their workers are kept for them, and every other leftover destroyed,
    // before the engine resumes them.
    let journal = Arc::new(SledStore::open("hodei-data")?);
    let reaped = control.reap_orphans(journal.as_ref()).await?;
    if !reaped.destroyed.is_empty() {
        println!("reaped {} worker(s) left by an earlier run", reaped.destroyed.len());
    }
    let engine = Engine::builder().store(journal).register(release::definition()).start().await?;

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
    let run = release::start(&engine, &id, &input).await?;

    match run.outcome().await? {
        Outcome::Completed(message) => println!("completed: {message}"),
        Outcome::Compensated { cause } => println!("compensated after: {cause}"),
        other => println!("{other:?}"),
    }

    let history = engine.history(run.id())?;
    println!("\njob logs (stored by the control plane in ./hodei-data/logs):");
    let stored = control.logs().jobs().await?;
    for event in &history {
        let Event::StepStarted { step, name, .. } = &event.event else { continue };
        // A job's log is kept per attempt, as `saga id/step#attempt`.
        let attempts = format!("{id}/{step}#");
        for job in stored.iter().filter(|job| job.starts_with(&attempts)) {
            println!("  {name} ({job})");
            for stream in [LogStream::Stdout, LogStream::Stderr] {
                let log = control.logs().read(job, stream, 0, 64 * 1024).await?;
                for line in String::from_utf8_lossy(&log.bytes).lines() {
                    println!("    {stream}| {line}");
                }
            }
        }
    }
    println!("\ntimeline of {id} (journal in ./hodei-data):");
    print!("{}", Timeline(&history));

    engine.shutdown(Duration::from_secs(5)).await?;
    control.shutdown().await?;
    let _ = std::fs::remove_dir_all(&workspace);
    Ok(())
}
