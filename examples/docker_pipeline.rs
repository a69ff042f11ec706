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
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hodei::jobs::{Job, MemorySecrets, RemoteJobs, Resources};
use hodei::providers::Provider;
use hodei::providers::docker::{DockerConfig, DockerProvider, INSTANCE_LABEL};
use hodei::server::ProviderPolicy;
use hodei::server::logstore::{LogStore, LogStoreError, LogStream};
use hodei::{ControlPlane, Event, Node, Outcome, SagaContext, StepContext, StepError, Timeline, saga, step};

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

// Each secret is a shell variable holding its value (set from stdin, never exported).
const TEST: &str = r#"
got=$(sha256sum "$WS/dist/app" | cut -d' ' -f1)
[ "$got" = "$ARTIFACT_SHA256" ] || { echo "artifact $got is not the build's $ARTIFACT_SHA256" >&2; exit 1; }
echo "testing the build's artifact sha256 $got"
out=$("$WS/dist/app" "$VERSION")
[ "$out" = "checkout-api $VERSION says hello" ] || { echo "unexpected output: $out" >&2; exit 1; }
echo "1 test passed: $out"
echo "logging in to the registry with $REGISTRY_TOKEN"
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
    Job::pooled_script(["/bin/sh"], format!("set -e\n{CHECKOUT}{script}"))
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
async fn artifact_digest(ctx: StepContext, build_job: String) -> Result<String, StepError> {
    // The control plane's log store: the node shares it with every step.
    let logs = ctx.resource::<LogStore>().map_err(|e| StepError::terminal(e.to_string()))?;
    let stdout = stored_log(&logs, &build_job, LogStream::Stdout)
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
    ctx.run_job("checkout", shell(&release, r#"echo "checked out $VERSION into $WS""#)).await?;
    let build = ctx.run_job("build", shell(&release, BUILD)).await?;
    let digest = artifact_digest(&ctx, build.job_id).await?;
    // The build again, then the test: the container has nothing of the build's.
    let test = shell(&release, &format!("{BUILD}{TEST}"))
        .env("ARTIFACT_SHA256", &digest)
        .secret("REGISTRY_TOKEN", "registry-token")
        .resources(Resources::new(Some(500), Some(64 << 20)));
    ctx.run_job("test", test).await?;
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

    let node = Node::builder(DATA_DIR)
        .control_plane(|control| {
            control.provider(docker.clone(), ProviderPolicy::new().ephemeral().max_workers(2))
        })
        .register(pipeline::definition())
        .secrets(MemorySecrets::new().insert("registry-token", "rt-9f3c51d7e2a4"))
        .start()
        .await?;
    if !node.reaped().destroyed.is_empty() {
        println!("reaped {} container(s) left by an earlier run", node.reaped().destroyed.len());
    }

    let id = format!("pipeline-{}", hodei::Timestamp::now().0);
    let input = Release { service: "checkout-api".into(), version: "v2.4.0".into() };
    let started = unix_now();
    println!("starting saga {id} on Docker, image {image}");
    let run = pipeline::start(node.engine(), &id, &input).await?;
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

    let history = node.engine().history(run.id())?;
    if succeeded {
        print_job_logs(node.control_plane(), &id, &history).await?;
        println!("\ntimeline of {id} (journal in ./{DATA_DIR}):");
        print!("{}", Timeline(&history));
    }
    node.shutdown(Duration::from_secs(5)).await?;

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
