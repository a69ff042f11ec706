//! The quickstart's pipeline on Docker: checkout, build and test as shell jobs, each in its own
//! ephemeral container that the Docker provider starts for it and removes after it.
//!
//! Each container's agent dials the embedded control plane (`./hodei-data-docker`) on the host's
//! loopback over gRPC and mutual TLS, which is why the containers use the host's network. The
//! containers share no files: like CI jobs on fresh runners, every job checks the source out
//! again, and what passes from one job to the next goes through the saga's journal. The build
//! prints its artifact's sha256, a step reads it from the build's stored log, and the test job
//! receives it as input and refuses an artifact that does not match it. The test job also gets
//! a registry token as a secret, masked in its stored log, and runs under cpu and memory limits.
//!
//! ```text
//! docker/build-agent-image.sh --with-tools            # hodei-agent:tools: the agent and a shell
//! cargo run --example docker_pipeline --features docker
//! ```
//!
//! `HODEI_DOCKER_IMAGE` names another image; it must hold `/bin/sh` and the tools below.

use std::collections::BTreeMap;
use std::process::{Command, ExitCode};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hodei::agent::jobs::{Job, JobDispatcher, MemorySecrets, RemoteJobs, Resources};
use hodei::agent::logstore::{LogStore, LogStoreError, LogStream};
use hodei::providers::docker::{DockerConfig, DockerProvider, INSTANCE_LABEL};
use hodei::providers::{ControlPlane, Provider, ProviderPolicy};
use hodei::{Engine, Event, Outcome, SagaContext, SledStore, StepContext, StepError, Timeline, saga, step};

/// Where the control plane keeps its CA, the jobs' logs and the saga journal.
const DATA_DIR: &str = "hodei-data-docker";
/// The image built by `docker/build-agent-image.sh --with-tools`.
const TOOLS_IMAGE: &str = "hodei-agent:tools";
/// Tags this example's containers, so that it lists, reaps and reports only its own.
const INSTANCE: &str = "docker-pipeline";

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Release {
    service: String,
    version: String,
}

/// How the saga's jobs reach the control plane, set once at start: a saga's body only gets its
/// context and its journaled input.
static JOBS: OnceLock<JobDispatcher> = OnceLock::new();
/// The control plane's log store, where the digest step reads the build's output.
static LOGS: OnceLock<Arc<LogStore>> = OnceLock::new();

/// The checkout every job starts with: its container has nothing of the jobs before it.
const CHECKOUT: &str = r#"
WS=/tmp/ws
mkdir -p "$WS/src"
printf '#!/bin/sh\necho "checkout-api $1 says hello"\n' > "$WS/src/app.sh"
"#;

const BUILD: &str = r#"
mkdir -p "$WS/dist"
cp "$WS/src/app.sh" "$WS/dist/app" && chmod +x "$WS/dist/app"
echo "artifact dist/app sha256 $(sha256sum "$WS/dist/app" | cut -d' ' -f1)"
"#;

// Secrets arrive on stdin as `NAME=<base64>` lines that `sh -s` reads as assignments.
const TEST: &str = r#"
got=$(sha256sum "$WS/dist/app" | cut -d' ' -f1)
[ "$got" = "$ARTIFACT_SHA256" ] || { echo "artifact $got is not the build's $ARTIFACT_SHA256" >&2; exit 1; }
echo "testing the build's artifact sha256 $got"
TOKEN=$(printf %s "$REGISTRY_TOKEN" | base64 -d)
out=$("$WS/dist/app" "$VERSION")
[ "$out" = "checkout-api $VERSION says hello" ] || { echo "unexpected output: $out" >&2; exit 1; }
echo "1 test passed: $out"
echo "logging in to the registry with $TOKEN"
# The limits the job runs under, as the kernel enforces them.
if [ -r /sys/fs/cgroup/memory.max ]; then
    echo "limits (cgroup v2): cpu.max $(cat /sys/fs/cgroup/cpu.max), memory.max $(cat /sys/fs/cgroup/memory.max)" >&2
else
    cg=/sys/fs/cgroup
    echo "limits (cgroup v1): cpu $(cat $cg/cpu/cpu.cfs_quota_us)/$(cat $cg/cpu/cpu.cfs_period_us) us, memory $(cat $cg/memory/memory.limit_in_bytes) bytes" >&2
fi
"#;

/// A job running the checkout and then `script` with `/bin/sh` in a fresh container.
fn shell(release: &Release, script: &str) -> Job {
    Job::pooled_script(["/bin/sh", "-s"], format!("set -e\n{CHECKOUT}{script}"))
        .env("PATH", "/usr/bin:/bin")
        .env("VERSION", &release.version)
        .timeout(Duration::from_secs(60))
}

/// Everything stored for `stream` of `job`.
async fn stored_log(logs: &LogStore, job: &str, stream: LogStream) -> Result<String, LogStoreError> {
    let mut bytes = Vec::new();
    loop {
        let chunk = logs.read(job, stream, bytes.len() as u64, 64 * 1024).await?;
        if chunk.bytes.is_empty() {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        bytes.extend_from_slice(&chunk.bytes);
    }
}

/// The digest the build job printed, read from its stored stdout. A step, so that it is
/// journaled: a resumed saga hands the test job the digest of the build it already ran.
#[step(name = "artifact-digest")]
async fn artifact_digest(_ctx: StepContext, build_job: String) -> Result<String, StepError> {
    let logs = LOGS.get().ok_or_else(|| StepError::terminal("the log store is not set"))?;
    let stdout = stored_log(logs, &build_job, LogStream::Stdout)
        .await
        .map_err(|e| StepError::retryable(format!("reading the log of {build_job}: {e}")))?;
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("artifact dist/app sha256 "))
        .filter(|digest| digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .ok_or_else(|| StepError::terminal(format!("the build job {build_job} printed no artifact digest")))
}

#[step(timeout = "30s")]
async fn publish(_ctx: StepContext, artifact: (Release, String)) -> Result<String, StepError> {
    let (release, digest) = artifact;
    Ok(format!("{}:{} published as sha256:{}", release.service, release.version, &digest[..12]))
}

#[saga]
async fn pipeline(ctx: SagaContext, release: Release) -> Result<String, StepError> {
    let jobs = JOBS.get().ok_or_else(|| StepError::terminal("the job dispatcher is not set"))?;
    ctx.run_job(jobs, "checkout", shell(&release, r#"echo "checked out $VERSION into $WS""#)).await?;
    let build = ctx.run_job(jobs, "build", shell(&release, BUILD)).await?;
    let digest = artifact_digest(&ctx, build.job_id).await?;
    // The build again, then the test: the container has nothing of the build's.
    let test = shell(&release, &format!("{BUILD}{TEST}"))
        .env("ARTIFACT_SHA256", &digest)
        .secret("REGISTRY_TOKEN", "registry-token")
        .resources(Resources::new(Some(500), Some(64 << 20)));
    ctx.run_job(jobs, "test", test).await?;
    publish(&ctx, (release, digest)).await
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    let image = std::env::var("HODEI_DOCKER_IMAGE").unwrap_or_else(|_| TOOLS_IMAGE.to_owned());
    // Host networking: the agent dials the hub on 127.0.0.1, which in a bridged container
    // would be the container itself.
    let config = DockerConfig::default().image(&image).network_mode("host").instance(INSTANCE);
    let docker = match DockerProvider::connect(config).await {
        Ok(docker) => Arc::new(docker),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };

    let control = ControlPlane::builder(DATA_DIR)
        .provider(docker.clone(), ProviderPolicy::new().ephemeral().max_workers(2))
        .start()
        .await?;
    let secrets = MemorySecrets::new().insert("registry-token", "rt-9f3c51d7e2a4");
    JOBS.set(control.dispatcher(Arc::new(secrets))).map_err(|_| anyhow::anyhow!("dispatcher set twice"))?;
    LOGS.set(control.logs().clone()).map_err(|_| anyhow::anyhow!("log store set twice"))?;
    let journal = Arc::new(SledStore::open(DATA_DIR)?);
    let reaped = control.reap_orphans(journal.as_ref()).await?;
    if !reaped.destroyed.is_empty() {
        println!("reaped {} container(s) left by an earlier run", reaped.destroyed.len());
    }
    let engine = Engine::builder().store(journal).register(pipeline::definition()).start().await?;

    let id = format!("pipeline-{}", hodei::Timestamp::now().0);
    let input = Release { service: "checkout-api".into(), version: "v2.4.0".into() };
    let started = unix_now();
    println!("starting saga {id} on Docker, image {image}");
    let run = pipeline::start(&engine, &id, &input).await?;
    let succeeded = match run.outcome().await? {
        Outcome::Completed(message) => {
            println!("completed: {message}");
            true
        }
        Outcome::Failed { cause } | Outcome::Compensated { cause } => {
            eprintln!("error: {cause}");
            if image == TOOLS_IMAGE {
                eprintln!("({TOOLS_IMAGE} is built with `docker/build-agent-image.sh --with-tools`)");
            }
            false
        }
        other => {
            eprintln!("error: {other:?}");
            false
        }
    };

    let history = engine.history(run.id())?;
    if succeeded {
        print_job_logs(&control, &id, &history).await?;
        println!("\ntimeline of {id} (journal in ./{DATA_DIR}):");
        print!("{}", Timeline(&history));
    }
    engine.shutdown(Duration::from_secs(5)).await?;
    control.shutdown().await?;

    let containers = containers_since(&started)?;
    let left = docker.list().await?;
    println!("\ncontainers of this run, from the engine's event log:");
    for (name, container) in &containers {
        let fate = if container.destroyed { "removed" } else { "NOT removed" };
        println!("  {name}  {}  {fate}", &container.id[..12.min(container.id.len())]);
    }
    println!("containers of this instance the provider still lists: {}", left.len());
    for worker in &left {
        eprintln!("  left behind: {} ({})", worker.worker_id, worker.handle);
    }
    let all_removed = left.is_empty() && containers.values().all(|container| container.destroyed);
    Ok(if succeeded && all_removed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Each job's stored stdout and stderr, per attempt (`saga id/step#attempt`).
async fn print_job_logs(
    control: &ControlPlane,
    id: &str,
    history: &[hodei::RecordedEvent],
) -> anyhow::Result<()> {
    println!("\njob logs (stored by the control plane in ./{DATA_DIR}/logs):");
    let stored = control.logs().jobs().await?;
    for event in history {
        let Event::StepStarted { step, name, .. } = &event.event else { continue };
        let attempts = format!("{id}/{step}#");
        for job in stored.iter().filter(|job| job.starts_with(&attempts)) {
            println!("  {name} ({job})");
            for stream in [LogStream::Stdout, LogStream::Stderr] {
                for line in stored_log(control.logs(), job, stream).await?.lines() {
                    println!("    {stream}| {line}");
                }
            }
        }
    }
    Ok(())
}

fn unix_now() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// A container the engine reported created.
#[derive(Debug)]
struct SeenContainer {
    id: String,
    destroyed: bool,
}

/// This example's containers created since `since`, by name, and whether each was destroyed:
/// the engine's event log replayed up to now, so that none is missed however briefly it lived.
fn containers_since(since: &str) -> anyhow::Result<BTreeMap<String, SeenContainer>> {
    let output = Command::new("docker")
        .args(["events", "--since", since, "--until", &unix_now()])
        .args(["--filter", "type=container", "--filter", "event=create", "--filter", "event=destroy"])
        .arg("--filter")
        .arg(format!("label={INSTANCE_LABEL}={INSTANCE}"))
        .args(["--format", "{{.Action}} {{.Actor.ID}} {{index .Actor.Attributes \"name\"}}"])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "docker events failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let mut seen = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut fields = line.split_whitespace();
        let (Some(action), Some(id), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let container = seen
            .entry(name.to_owned())
            .or_insert_with(|| SeenContainer { id: id.to_owned(), destroyed: false });
        container.destroyed |= action == "destroy";
    }
    Ok(seen)
}
