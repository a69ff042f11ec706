//! The control plane killed (SIGKILL) while its saga's job runs in a Docker worker. On restart
//! over the same data directory, the container of the live saga is adopted and the step
//! re-attaches to its job there (no rerun); a container of a saga that is no longer live is
//! reaped; and nothing of this test is left on the engine at the end.
//!
//! The test binary runs itself again as the control plane (`docker_control_plane_process`,
//! which does nothing in a normal run).

#[macro_use]
mod docker_support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use docker_support::{Containers, JOBS_IMAGE};
use hodei_core::{Engine, Outcome, RetryPolicy, SagaContext, SagaDefinition, SagaRun, SledStore};
use hodei_providers::docker::{DockerConfig, DockerProvider};
use hodei_providers::docker::{INSTANCE_LABEL, container_name};
use hodei_providers::{AgentEnv, Provider, WorkerSpec};
use hodei_server::ControlPlane;
use hodei_server::jobs::{Job, JobOutcome, MemorySecrets, RemoteJobs};
use hodei_server::logstore::LogStream;
use hodei_server::scheduler::ProviderPolicy;

const CHILD_DIR: &str = "HODEI_TEST_DOCKER_CP_DIR";
const CHILD_INSTANCE: &str = "HODEI_TEST_DOCKER_INSTANCE";
const READY: &str = "hodei-test: job running";
const LEASED: &str = "hodei-test: worker leased";
const OUTCOME: &str = "hodei-test: outcome";
const SAGA: &str = "docker-restart";
/// Where the job leaves its pid in its container: the agent's directory is writable to any user.
const JOB_PID_FILE: &str = "/hodei/job.pid";

/// Runs until the test sends it SIGUSR1, so that it spans the kill and the restart however
/// long they take. The jobs image has `sh`, `sleep` and `cat`; `kill` and `wait` are built in.
fn job_script() -> String {
    format!(
        "trap 'kill $!; echo finished; exit 0' USR1\n\
         sleep 1000 &\n\
         echo $$ > {JOB_PID_FILE}\n\
         echo started\n\
         wait\n"
    )
}

fn docker_config(instance: &str) -> DockerConfig {
    DockerConfig::default().network_mode("host").image(JOBS_IMAGE).instance(instance)
}

/// The control plane, when run as the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_control_plane_process() {
    let (Ok(dir), Ok(instance)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_INSTANCE)) else { return };
    let dir = PathBuf::from(dir);
    let provider = DockerProvider::connect(docker_config(&instance)).await.unwrap();
    let control_plane = ControlPlane::builder(&dir)
        .provider(
            Arc::new(provider),
            ProviderPolicy::default().registration_deadline(Duration::from_secs(60)),
        )
        .start()
        .await
        .unwrap();
    let store = Arc::new(SledStore::open(dir.join("journal")).unwrap());
    let reaped = control_plane.reap_orphans(store.as_ref()).await.unwrap();
    println!("hodei-test: reaped {reaped:?}");
    let jobs = control_plane
        .dispatcher(Arc::new(MemorySecrets::new()))
        .retry(RetryPolicy::attempts(10).initial_backoff(Duration::from_millis(200)));
    let job = Job::pooled_script(["/bin/sh"], job_script());
    let definition = SagaDefinition::new("pipeline", 1, move |ctx: SagaContext, (): ()| {
        let (jobs, job) = (jobs.clone(), job.clone());
        async move { ctx.run_job_on(&jobs, "build", job).await }
    });
    let engine = Engine::builder().store(store).register(definition).start().await.unwrap();
    let handle = engine.start(SagaRun::new("pipeline", SAGA, &()).unwrap()).await.unwrap();
    // After the restart, the step holds the adopted worker from when it re-attaches to the job
    // until the job ends, which only the test's signal makes it do.
    let mut counts = control_plane.scheduler().watch_counts();
    if counts.wait_for(|c| c.leased > 0).await.is_ok() {
        println!("{LEASED}");
    }
    let mut follower =
        control_plane.logs().follow(&format!("{SAGA}/0#1"), LogStream::Stdout, 0).await.unwrap();
    if let Some(chunk) = follower.next().await {
        chunk.unwrap();
        println!("{READY}");
    }
    let outcome = handle.outcome::<JobOutcome>().await.unwrap();
    match outcome {
        Outcome::Completed(job) => println!("{OUTCOME} completed {}", job.job_id),
        other => println!("{OUTCOME} {other:?}"),
    }
    control_plane.shutdown().await.unwrap();
}

struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_control_plane(dir: &std::path::Path, instance: &str) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "docker_control_plane_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_INSTANCE, instance)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdout)
}

/// The first line containing `needle`, read on a blocking thread.
async fn line_containing(
    mut stdout: BufReader<ChildStdout>,
    needle: &'static str,
) -> (Option<String>, BufReader<ChildStdout>) {
    docker_support::within(async move {
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            loop {
                line.clear();
                if stdout.read_line(&mut line).unwrap() == 0 {
                    return (None, stdout);
                }
                if let Some(at) = line.find(needle) {
                    return (Some(line[at..].trim_end().to_owned()), stdout);
                }
            }
        })
        .await
        .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_control_plane_adopts_its_live_sagas_container_and_reaps_the_others() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    // Builds the test images, or skips the test when no engine answers.
    let _engine = require_engine!();
    let tmp = tempfile::tempdir().unwrap();
    let instance = format!("restart-{}", std::process::id());
    let mut containers = Containers::default();
    containers.guard_label(INSTANCE_LABEL, &instance);
    let mut reaper = Reaper(Vec::new());

    let (first, stdout) = spawn_control_plane(tmp.path(), &instance);
    reaper.0.push(first);
    let (running, _stdout) = line_containing(stdout, READY).await;
    assert!(running.is_some(), "the job never started");
    let mut first = reaper.0.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();

    // A worker of a saga that is not live, left by "an earlier run": it must be reaped.
    let ours = DockerProvider::connect(docker_config(&instance)).await.unwrap();
    let mut stale = WorkerSpec::new("w-stale-restart", AgentEnv::new("127.0.0.1:9", "127.0.0.1:9", "x", "x"));
    stale.saga_id = Some("finished-long-ago".to_owned());
    containers.guard("w-stale-restart".to_owned());
    ours.provision(&stale).await.unwrap();
    let listed: Vec<String> = ours.list().await.unwrap().into_iter().map(|w| w.worker_id).collect();
    assert_eq!(listed.len(), 2, "the live saga's worker and the stale one: {listed:?}");

    let live = listed.iter().find(|id| *id != "w-stale-restart").unwrap().clone();

    let (second, stdout) = spawn_control_plane(tmp.path(), &instance);
    reaper.0.push(second);
    let (leased, stdout) = line_containing(stdout, LEASED).await;
    assert!(leased.is_some(), "the restarted control plane never leased the worker");
    // Only now may the job end: the resumed step holds the worker the job runs on.
    let signalled = docker_support::within(
        tokio::process::Command::new("docker")
            .args(["exec", &container_name(&live), "/bin/sh", "-c"])
            .arg(format!("read pid < {JOB_PID_FILE} && kill -USR1 \"$pid\""))
            .output(),
    )
    .await
    .unwrap();
    assert!(signalled.status.success(), "signalling the job: {}", String::from_utf8_lossy(&signalled.stderr));
    let (outcome, _stdout) = line_containing(stdout, OUTCOME).await;
    assert_eq!(outcome.as_deref(), Some(format!("{OUTCOME} completed {SAGA}/0#1").as_str()), "re-attached");
    reaper.0[0].wait().unwrap();
    drop(reaper);

    let logs = hodei_server::logstore::LogStore::open(tmp.path()).await.unwrap();
    let chunk = logs.read(&format!("{SAGA}/0#1"), LogStream::Stdout, 0, 1 << 16).await.unwrap();
    assert_eq!(chunk.bytes, b"started\nfinished\n", "one run, every line once");
    let left = ours.list().await.unwrap();
    assert!(left.is_empty(), "containers left: {left:?}");
}
