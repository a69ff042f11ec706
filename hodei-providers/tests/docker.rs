//! The Docker provider against the real engine: containers from an image built from this
//! checkout, whose agent registers with a real hub over mutual TLS on loopback.
//!
//! Without an engine each test says it was skipped and passes; `HODEI_REQUIRE_DOCKER=1` (set by
//! `.ci/run`) makes that a failure.

#![cfg(feature = "docker")]

#[macro_use]
mod docker_support;
mod pipeline;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::query_parameters::{
    EventsOptionsBuilder, InspectContainerOptions, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
};
use docker_support::{Containers, TestHub, shell, unique_worker, within};
use futures_util::TryStreamExt;
use hodei_agent::protocol::v1::job_result::Outcome;
use hodei_core::RetryPolicy;
use hodei_providers::docker::{DockerConfig, DockerProvider, INSTANCE_LABEL, build_command, container_name};
use hodei_providers::{
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, Provider, ProviderError, SAGA_ID_LABEL, WORKER_ID_LABEL, WorkerSpec,
    WorkerState,
};
use hodei_server::hub::HubError;
use hodei_server::jobs::{Job, JobOutcome, MemorySecrets, Resources};
use hodei_server::logstore::LogStream;
use hodei_server::{ControlPlane, ProviderPolicy};

/// Containers labelled with this worker id, as the Docker API lists them (stopped ones too).
async fn containers_of(provider: &DockerProvider, worker_id: &str) -> usize {
    let filters: HashMap<&str, Vec<String>> = [(
        "label",
        vec![format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"), format!("{WORKER_ID_LABEL}={worker_id}")],
    )]
    .into();
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    provider.client().await.unwrap().list_containers(Some(options)).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_container_registers_over_mtls_runs_a_job_and_is_removed() {
    let provider = require_engine!();
    let hub = TestHub::start().await;
    let mut containers = Containers::default();
    let worker = containers.guard(unique_worker("e2e"));
    let mut spec = WorkerSpec::new(&worker, hub.agent_env(&worker));
    spec.saga_id = Some("saga-docker-1".to_owned());
    spec.labels.insert("team".to_owned(), "ci".to_owned());

    let info = within(provider.provision(&spec)).await.unwrap();
    assert_eq!(info.worker_id, worker);
    assert_eq!(info.labels.get(SAGA_ID_LABEL).map(String::as_str), Some("saga-docker-1"));
    hub.wait_registered(&worker).await;

    let script = "i=1; while [ $i -le 500 ]; do echo line $i; i=$((i+1)); done; echo oops >&2; exit 3";
    let result = within(hub.hub.run_job(&worker, shell("saga-docker-1/build", script))).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(3)), "{result:?}");
    let expected: String = (1..=500).map(|i| format!("line {i}\n")).collect();
    assert_eq!(hub.stored("saga-docker-1/build", LogStream::Stdout).await, expected.as_bytes());
    assert_eq!(hub.stored("saga-docker-1/build", LogStream::Stderr).await, b"oops\n");

    let listed = provider.list().await.unwrap();
    let mine = listed.iter().find(|w| w.worker_id == worker).expect("listed by its labels");
    assert_eq!(mine.handle, info.handle);
    assert_eq!(mine.state, WorkerState::Running);
    assert_eq!(mine.labels.get("team").map(String::as_str), Some("ci"));
    assert_eq!(provider.state(&worker).await.unwrap(), WorkerState::Running);
    let output = provider.output(&worker).await.unwrap();
    assert!(output.contains(&format!("session open as {worker}")), "{output}");

    within(provider.destroy(&worker)).await.unwrap();
    assert_eq!(provider.state(&worker).await.unwrap(), WorkerState::Gone);
    assert_eq!(containers_of(&provider, &worker).await, 0, "nothing left with our labels");
    within(provider.destroy(&worker)).await.expect("destroying a removed worker is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_memory_limits_reach_the_container_and_its_cgroup() {
    let provider = require_engine!();
    let hub = TestHub::start().await;
    let mut containers = Containers::default();
    let resources = Resources::new(Some(500), Some(128 << 20));
    let worker = hub.registered_worker(&provider, &mut containers, "limits", resources).await;

    let docker = provider.client().await.unwrap();
    let inspected =
        docker.inspect_container(&container_name(&worker), None::<InspectContainerOptions>).await.unwrap();
    let host = inspected.host_config.expect("a host config");
    assert_eq!(host.nano_cpus, Some(500_000_000), "half a cpu");
    assert_eq!(host.memory, Some(128 << 20));
    assert_eq!(host.memory_swap, Some(128 << 20), "no swap beyond the limit");
    assert_eq!(host.network_mode.as_deref(), Some("host"));
    let labels = inspected.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get(WORKER_ID_LABEL), Some(&worker));

    // The kernel's own view from inside, cgroup v1 or v2.
    let script = "if [ -r /sys/fs/cgroup/memory.max ]; then cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; \
                  else cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us \
                  /sys/fs/cgroup/cpu/cpu.cfs_period_us; fi";
    let result = within(hub.hub.run_job(&worker, shell("limits/read", script))).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");
    let seen = String::from_utf8(hub.stored("limits/read", LogStream::Stdout).await).unwrap();
    let numbers: Vec<&str> = seen.split_whitespace().collect();
    assert_eq!(numbers, ["134217728", "50000", "100000"], "memory limit, then cpu quota and period");
    within(provider.destroy(&worker)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_memory_limit_ends_as_out_of_memory() {
    let provider = require_engine!();
    let hub = TestHub::start().await;
    let mut containers = Containers::default();
    let resources = Resources::new(None, Some(64 << 20));
    let worker = hub.registered_worker(&provider, &mut containers, "oom", resources).await;

    // The string doubles until the cgroup's limit; the shell is by far the largest process.
    let job = shell("oom/grow", "echo growing; x=0123456789abcdef; while :; do x=$x$x; done");
    let result = within(hub.hub.run_job(&worker, job)).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::Signal(9)), "killed by the OOM killer: {result:?}");
    let reason = provider.job_end_reason(&worker, &result).await.unwrap().expect("a reason");
    assert!(reason.starts_with("out of memory"), "{reason}");
    assert!(reason.contains("67108864 bytes"), "{reason}");
    assert!(provider.out_of_memory(&worker).await.unwrap(), "the engine's oom event stays on record");
    assert_eq!(hub.stored("oom/grow", LogStream::Stdout).await, b"growing\n");

    // The agent survived its job and still serves.
    let after = within(hub.hub.run_job(&worker, shell("oom/after", "echo alive"))).await.unwrap();
    assert_eq!(after.outcome, Some(Outcome::ExitCode(0)), "{after:?}");
    assert_eq!(provider.job_end_reason(&worker, &after).await.unwrap(), None);
    within(provider.destroy(&worker)).await.unwrap();
}

/// Through the scheduler, the step's error says what the result alone cannot: the SIGKILL
/// was the OOM killer's, for going over the worker's memory limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_job_over_its_memory_limit_fails_its_step_as_out_of_memory() {
    let provider = Arc::new(require_engine!());
    let saga = unique_worker("oom-saga");
    let mut containers = Containers::default();
    containers.guard_label(SAGA_ID_LABEL, &saga);
    let dir = tempfile::tempdir().unwrap();
    let control =
        control_plane(dir.path().join("control"), &provider, ProviderPolicy::new().ephemeral()).await;
    let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new())).retry(RetryPolicy::none());
    let engine = pipeline::engine(dispatcher).await;
    let grow = docker_job("echo growing; x=0123456789abcdef; while :; do x=$x$x; done")
        .resources(Resources::new(None, Some(64 << 20)));
    let handle = pipeline::start(&engine, &saga, vec![("grow", grow)]).await;
    let cause = pipeline::failure(within(handle.outcome::<Vec<JobOutcome>>()).await.unwrap());
    assert!(cause.contains("was killed by signal 9: out of memory"), "{cause}");
    assert!(cause.contains("67108864 bytes"), "{cause}");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_mid_job_loses_the_worker_and_the_job_runs_on_a_new_one() {
    let provider = require_engine!();
    let hub = TestHub::start().await;
    let mut containers = Containers::default();
    let first = hub.registered_worker(&provider, &mut containers, "killed", Resources::default()).await;

    let job = shell("kill/wait", "echo ready; sleep 1000");
    let run = hub.spawn_job(&first, job);
    hub.wait_for_stdout("kill/wait", b"ready\n").await;
    let docker = provider.client().await.unwrap();
    let kill = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
    docker.kill_container(&container_name(&first), Some(kill)).await.unwrap();

    let error = within(run).await.unwrap().unwrap_err();
    assert!(
        matches!(&error, HubError::WorkerLost { worker_id, job_id } if *worker_id == first && job_id == "kill/wait"),
        "{error:?}"
    );
    assert!(error.is_retryable());
    let state = within(provider.wait_exit(&first)).await.unwrap();
    assert!(matches!(state, WorkerState::Exited { code: Some(137), .. }), "SIGKILL: {state:?}");

    // What the scheduler does with a retryable loss: the next attempt on a new worker.
    let second = hub.registered_worker(&provider, &mut containers, "retry", Resources::default()).await;
    let retried = shell("kill/wait-attempt-2", "echo ready; exit 0");
    let result = within(hub.hub.run_job(&second, retried)).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");
    for worker in [&first, &second] {
        within(provider.destroy(worker)).await.unwrap();
        assert_eq!(containers_of(&provider, worker).await, 0);
    }
}

#[tokio::test]
async fn an_unreachable_daemon_is_reported_with_its_socket() {
    let socket = "/nonexistent/hodei-test/docker.sock";
    let error = DockerProvider::connect(DockerConfig::default().socket(socket)).await.unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(&error, ProviderError::Unreachable { endpoint, .. } if endpoint == &format!("unix://{socket}")),
        "{error:?}"
    );
    assert!(message.contains(socket) && message.contains("is the Docker daemon running?"), "{message}");
    assert!(error.is_retryable(), "the daemon may come back");

    // A provider built before the daemon answers reports the same on first use.
    let provider = DockerProvider::new(DockerConfig::default().socket(socket));
    let agent = hodei_providers::AgentEnv::new("127.0.0.1:1", "127.0.0.1:2", "token", "pem");
    let error = provider.provision(&WorkerSpec::new("w-unreachable", agent)).await.unwrap_err();
    assert!(matches!(error, ProviderError::Unreachable { .. }), "{error:?}");
    assert!(matches!(provider.list().await.unwrap_err(), ProviderError::Unreachable { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_names_the_command_that_builds_it() {
    let provider = require_engine!();
    let hub = TestHub::start().await;
    let mut containers = Containers::default();
    let worker = containers.guard(unique_worker("noimage"));
    let mut spec = WorkerSpec::new(&worker, hub.agent_env(&worker));
    spec.image = Some("hodei-agent:no-such-tag".to_owned());

    let error = within(provider.provision(&spec)).await.unwrap_err();
    assert!(
        matches!(&error, ProviderError::ImageMissing { image, .. } if image == "hodei-agent:no-such-tag"),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(&build_command("hodei-agent:no-such-tag")), "{message}");
    assert!(message.contains("docker/build-agent-image.sh hodei-agent:no-such-tag"), "{message}");
    assert!(!error.is_retryable(), "building the image is the operator's job");
    assert_eq!(containers_of(&provider, &worker).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_whose_agent_is_refused_exits_with_the_agent_s_error() {
    let provider = require_engine!();
    let hub = TestHub::start().await;
    let mut containers = Containers::default();
    let worker = containers.guard(unique_worker("refused"));
    // A token for another worker: the hub refuses it and the agent exits instead of retrying.
    let agent = hub.agent_env("w-someone-else");
    within(provider.provision(&WorkerSpec::new(&worker, agent))).await.unwrap();
    let state = within(provider.wait_exit(&worker)).await.unwrap();
    assert_eq!(state, WorkerState::Exited { code: Some(1), reason: None }, "the agent's code for a refusal");
    assert_eq!(provider.state(&worker).await.unwrap(), state);
    let output = provider.output(&worker).await.unwrap();
    assert!(output.contains("hodei-agent: registration failed"), "{output}");
    let error = provider.exited_before_registering(&worker).await;
    assert!(
        matches!(&error, ProviderError::ExitedBeforeRegistering { status, .. } if status == "exited with code 1"),
        "{error:?}"
    );
    assert!(error.to_string().contains("hodei-agent: registration failed"), "{error}");
    assert!(error.is_retryable());
    assert!(!hub.hub.connected_workers().contains_key(&worker));
    within(provider.destroy(&worker)).await.unwrap();
    assert_eq!(containers_of(&provider, &worker).await, 0);
}

/// A control plane in `data_dir` whose only provider is `provider`.
async fn control_plane(
    data_dir: PathBuf,
    provider: &Arc<DockerProvider>,
    policy: ProviderPolicy,
) -> ControlPlane {
    ControlPlane::builder(data_dir)
        .hub_config(pipeline::fast_hub())
        .provider(provider.clone(), policy)
        .start()
        .await
        .unwrap()
}

/// A pooled `sh -c script` for Docker workers (jobs start with an empty environment).
fn docker_job(script: &str) -> Job {
    Job::pooled_command(["/bin/sh", "-c", script]).env("PATH", "/usr/bin:/bin").provider("docker")
}

/// Containers the engine created with `label` since `since` (unix seconds), from its events.
async fn created_with(provider: &DockerProvider, label: &str, since: u64) -> usize {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let filters: HashMap<&str, Vec<String>> = [
        ("type", vec!["container".to_owned()]),
        ("event", vec!["create".to_owned()]),
        ("label", vec![label.to_owned()]),
    ]
    .into();
    let options = EventsOptionsBuilder::new()
        .since(&since.to_string())
        .until(&format!("{}.{:09}", now.as_secs(), now.subsec_nanos()))
        .filters(&filters)
        .build();
    let events: Vec<_> = provider.client().await.unwrap().events(Some(options)).try_collect().await.unwrap();
    events.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_s_jobs_run_in_docker_workers_through_the_scheduler_and_leave_nothing() {
    let provider = Arc::new(require_engine!());
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let saga = unique_worker("saga");
    let mut containers = Containers::default();
    containers.guard_label(SAGA_ID_LABEL, &saga);
    let dir = tempfile::tempdir().unwrap();
    let control = control_plane(
        dir.path().join("control"),
        &provider,
        ProviderPolicy::new().ephemeral().max_workers(2),
    )
    .await;
    let engine = pipeline::engine(control.dispatcher(Arc::new(MemorySecrets::new()))).await;

    // PID 1 of a worker container is its agent: proof that the job ran in one.
    let build = docker_job("cat /proc/1/cmdline; echo; echo built");
    let test = docker_job("echo tested; exit 0");
    let handle = pipeline::start(&engine, &saga, vec![("build", build), ("test", test)]).await;
    let outcomes = pipeline::completed(within(handle.outcome::<Vec<JobOutcome>>()).await.unwrap());
    assert_eq!(outcomes.iter().map(|o| o.exit_code).collect::<Vec<_>>(), [0, 0], "{outcomes:?}");
    let built = pipeline::stored(control.logs(), &outcomes[0].job_id, LogStream::Stdout).await;
    assert_eq!(built, "/hodei-agent\0\nbuilt\n");
    let tested = pipeline::stored(control.logs(), &outcomes[1].job_id, LogStream::Stdout).await;
    assert_eq!(tested, "tested\n");

    within(control.scheduler().watch_counts().wait_for(|c| c.workers() == 0)).await.unwrap();
    let label = format!("{SAGA_ID_LABEL}={saga}");
    assert_eq!(created_with(&provider, &label, since).await, 2, "one ephemeral container per job");
    let filters: HashMap<&str, Vec<String>> = [("label", vec![label])].into();
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let left = provider.client().await.unwrap().list_containers(Some(options)).await.unwrap();
    assert!(left.is_empty(), "nothing left: {left:?}");
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_new_scheduler_reaps_the_containers_of_sagas_no_longer_live() {
    // Its own instance: the reaper must not touch the containers of tests running beside it.
    let instance = unique_worker("reap");
    let config =
        DockerConfig::default().network_mode("host").image(docker_support::JOBS_IMAGE).instance(&instance);
    let Some(_) = docker_support::engine().await else { return };
    let provider = Arc::new(DockerProvider::connect(config).await.unwrap());
    let mut containers = Containers::default();
    containers.guard_label(INSTANCE_LABEL, &instance);
    let (dead, live) = (format!("{instance}-dead"), format!("{instance}-live"));
    let dir = tempfile::tempdir().unwrap();

    // The first control plane keeps its workers idle after their jobs.
    let first = control_plane(
        dir.path().join("first"),
        &provider,
        ProviderPolicy::new().reuse_for(Duration::from_secs(600)),
    )
    .await;
    // No retries: the job lost when its container is reaped must not come back on a new one.
    let dispatcher = first.dispatcher(Arc::new(MemorySecrets::new())).retry(RetryPolicy::none());
    let engine = pipeline::engine(dispatcher).await;
    // When it dies, the dead saga's job is still running and the live saga's worker is idle (a
    // reused worker serves any saga, so the first must be busy for the second to get its own).
    let held = pipeline::start(&engine, &dead, vec![("hold", docker_job("echo holding; sleep 1000"))]).await;
    within(first.scheduler().watch_counts().wait_for(|c| c.leased == 1)).await.unwrap();
    let handle = pipeline::start(&engine, &live, vec![("one", docker_job("echo one"))]).await;
    pipeline::completed(within(handle.outcome::<Vec<JobOutcome>>()).await.unwrap());
    let mut by_saga = BTreeMap::new();
    for worker in provider.list().await.unwrap() {
        assert_eq!(worker.state, WorkerState::Running, "{worker:?}");
        by_saga.insert(worker.labels[SAGA_ID_LABEL].clone(), worker.worker_id);
    }
    assert_eq!(by_saga.len(), 2, "{by_saga:?}");
    // It dies as a killed process does: nothing of it cleans up, and its containers run on.
    std::mem::forget(held);
    std::mem::forget(engine);
    std::mem::forget(first);

    // The restarted control plane is the same one to its workers: the same CA, and its record
    // of the workers it certified (the forgotten first still holds its log store's lock, so the
    // second cannot open the whole directory in this process).
    let pki = hodei_server::pki::pki_dir(&dir.path().join("second"));
    std::fs::create_dir_all(&pki).unwrap();
    for file in std::fs::read_dir(hodei_server::pki::pki_dir(&dir.path().join("first"))).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), pki.join(file.file_name())).unwrap();
    }
    let second = control_plane(
        dir.path().join("second"),
        &provider,
        ProviderPolicy::new().reuse_for(Duration::from_millis(500)),
    )
    .await;
    let report = within(second.scheduler().reap_orphans(|saga| saga == live)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.destroyed, [by_saga[&dead].clone()]);
    assert_eq!(report.adopted, [by_saga[&live].clone()]);
    assert_eq!(provider.state(&by_saga[&dead]).await.unwrap(), WorkerState::Gone);
    assert_eq!(provider.state(&by_saga[&live]).await.unwrap(), WorkerState::Running);

    // The live saga never claims its adopted worker here: it goes at the claim timeout.
    within(second.scheduler().watch_counts().wait_for(|c| c.workers() == 0)).await.unwrap();
    assert!(provider.list().await.unwrap().is_empty());
    second.shutdown().await.unwrap();
}
