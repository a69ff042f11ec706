//! The local provider end to end: real agents (in-process, or the real `hodei-agent` binary as
//! child processes) registering over mutual TLS on loopback with a real control plane, running
//! real jobs for real sagas.

mod pipeline;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hodei_agent::jobs::{Job, MemorySecrets};
use hodei_agent::logstore::LogStream;
use hodei_agent::protocol::v1;
use hodei_core::{Engine, MemoryStore, RetryPolicy, SagaContext, SagaDefinition, SagaRun, StepError};
use hodei_providers::{
    AgentEnv, ControlPlane, LocalProvider, Provider, ProviderError, ProviderPolicy, WorkerInfo, WorkerSpec,
    WorkerState,
};
use pipeline::{completed, failure, fast_hub, outcome, start, stored, wait_for_stdout, within};

/// The `hodei-agent` binary of this target directory (tests run from `<target>/debug/deps`),
/// built once if it is not there yet.
fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir =
            exe.parent().and_then(Path::parent).expect("tests run from <target>/<profile>/deps");
        let binary = profile_dir.join("hodei-agent");
        if !binary.exists() {
            let target_dir = profile_dir.parent().expect("a target directory");
            let status = std::process::Command::new(option_env!("CARGO").unwrap_or("cargo"))
                .args(["build", "-p", "hodei-agent", "--bin", "hodei-agent"])
                .env("CARGO_TARGET_DIR", target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .unwrap();
            assert!(status.success() && binary.exists(), "building hodei-agent failed");
        }
        binary
    })
}

/// A spec for `worker_id` labelled with `saga`, with a fresh token from `control`'s PKI.
fn spec_for(control: &ControlPlane, worker_id: &str, saga: &str) -> WorkerSpec {
    let pki = control.hub().pki();
    let token = pki.issue_token(worker_id).unwrap();
    let agent = AgentEnv::new(
        control.registration_addr().to_string(),
        control.session_addr().to_string(),
        token.as_str(),
        pki.ca_bundle_pem(),
    );
    let mut spec = WorkerSpec::new(worker_id, agent);
    spec.saga_id = Some(saga.to_owned());
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_runs_three_jobs_on_default_local_workers_and_their_results_and_masked_logs_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    // No provider given: the in-process local provider under the data directory.
    let control =
        ControlPlane::builder(dir.path().join("data")).hub_config(fast_hub()).start().await.unwrap();
    let secrets = MemorySecrets::new().insert("deploy-token", "tok-3141592653");
    let engine = pipeline::engine(control.dispatcher(Arc::new(secrets))).await;
    let workspace = dir.path().join("workspace");
    let ws = workspace.display();
    let script = |body: String| {
        Job::pooled_script(["/bin/sh", "-s"], body).env("PATH", "/usr/bin:/bin").env("WS", ws.to_string())
    };
    let jobs = vec![
        (
            "checkout",
            script(
                "mkdir -p \"$WS\" && echo 'int main() { return 0; }' > \"$WS/main.c\" && echo checked out"
                    .into(),
            ),
        ),
        (
            "build",
            script(
                "wc -c < \"$WS/main.c\" > \"$WS/artifact\" && echo built $(cat \"$WS/artifact\") bytes"
                    .into(),
            ),
        ),
        (
            "test",
            script(
                "TOKEN=$(printf %s \"$DEPLOY\" | base64 -d)\n\
                 test -s \"$WS/artifact\" || exit 1\n\
                 echo \"testing with $TOKEN\"; echo 'all tests passed' >&2"
                    .into(),
            )
            .secret("DEPLOY", "deploy-token"),
        ),
    ];

    let outcomes = completed(outcome(start(&engine, "pipeline-1", jobs).await).await);
    let ids: Vec<&str> = outcomes.iter().map(|o| o.job_id.as_str()).collect();
    assert_eq!(ids, ["pipeline-1/0#1", "pipeline-1/1#1", "pipeline-1/2#1"]);
    assert!(outcomes.iter().all(|o| o.exit_code == 0));
    let logs = control.logs();
    assert_eq!(stored(logs, "pipeline-1/0#1", LogStream::Stdout).await, "checked out\n");
    assert_eq!(stored(logs, "pipeline-1/1#1", LogStream::Stdout).await, "built 25 bytes\n");
    assert_eq!(stored(logs, "pipeline-1/2#1", LogStream::Stdout).await, "testing with ***\n");
    assert_eq!(stored(logs, "pipeline-1/2#1", LogStream::Stderr).await, "all tests passed\n");
    assert_eq!(outcomes[2].stdout_bytes, "testing with ***\n".len() as u64);

    // Ephemeral by default: every worker is gone, process, session and directory.
    within(control.scheduler().watch_counts().wait_for(|c| c.workers() == 0)).await.unwrap();
    within(control.hub().watch_workers().wait_for(|workers| workers.is_empty())).await.unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path().join("data/workers")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_process_worker_registers_with_the_token_out_of_argv_runs_a_job_and_dies_with_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let control =
        ControlPlane::builder(dir.path().join("data")).hub_config(fast_hub()).start().await.unwrap();
    let provider =
        LocalProvider::child_process(dir.path().join("workers"), agent_binary()).kill_on_drop(true);
    let spec = spec_for(&control, "child-1", "saga-1");
    let token = spec.agent.token.clone();

    let mut connected = control.hub().watch_workers();
    let info = provider.provision(&spec).await.unwrap();
    within(connected.wait_for(|workers| workers.contains_key("child-1"))).await.unwrap();
    let pid = provider.pid("child-1").await.expect("a child process");
    assert_eq!(info.handle, pid.to_string());
    assert_eq!(info.labels.get("hodei.dev/saga-id").map(String::as_str), Some("saga-1"));

    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(!cmdline.contains(&token), "the token is in argv: {cmdline}");
    assert!(cmdline.starts_with(&agent_binary().display().to_string()), "{cmdline}");
    let output = provider.output("child-1").await.unwrap();
    assert!(output.contains("registered; certificate stored"), "{output}");

    // Jobs run in the worker's directory unless they say otherwise.
    let job = v1::JobSpec {
        job_id: "child-job".to_owned(),
        command: vec!["/bin/sh".to_owned(), "-c".to_owned(), "pwd".to_owned()],
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        ..v1::JobSpec::default()
    };
    let result = within(control.hub().run_job("child-1", job)).await.unwrap();
    assert_eq!(result.outcome, Some(v1::job_result::Outcome::ExitCode(0)));
    let pwd = stored(control.logs(), "child-job", LogStream::Stdout).await;
    assert_eq!(
        pwd.trim_end(),
        dir.path().join("workers/child-1").canonicalize().unwrap().display().to_string()
    );
    assert_eq!(provider.list().await.unwrap().len(), 1);

    within(provider.destroy("child-1")).await.unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the agent is still there");
    within(connected.wait_for(|workers| workers.is_empty())).await.unwrap();
    assert_eq!(provider.state("child-1").await.unwrap(), WorkerState::Gone);
    assert!(!dir.path().join("workers/child-1").exists());
    // Idempotent.
    provider.destroy("child-1").await.unwrap();
    assert!(provider.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_finds_child_workers_by_pid_file_reaps_dead_sagas_and_adopts_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("workers");
    // The provider of the control plane "after the restart": it knows no worker in memory.
    let restarted = Arc::new(LocalProvider::child_process(&root, agent_binary()).kill_on_drop(true));
    let control = ControlPlane::builder(dir.path().join("data"))
        .hub_config(fast_hub())
        .provider(restarted.clone(), ProviderPolicy::new().ephemeral())
        .start()
        .await
        .unwrap();
    // What the control plane "before the restart" left running: its own provider instance.
    let earlier = LocalProvider::child_process(&root, agent_binary()).kill_on_drop(true);
    let mut connected = control.hub().watch_workers();
    for (worker, saga) in [("old-dead", "dead"), ("old-live", "live")] {
        earlier.provision(&spec_for(&control, worker, saga)).await.unwrap();
    }
    within(connected.wait_for(|workers| workers.len() == 2)).await.unwrap();
    let listed = restarted.list().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|w| w.state == WorkerState::Running), "{listed:?}");

    let report = control.scheduler().reap_orphans(|saga| saga == "live").await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (report.destroyed.as_slice(), report.adopted.as_slice()),
        (&["old-dead".to_owned()][..], &["old-live".to_owned()][..])
    );
    // Signalled through its pid file by a provider that never started it: SIGTERM ended it.
    let dead = earlier.state("old-dead").await.unwrap();
    assert_eq!(dead, WorkerState::Exited { code: Some(0), reason: None });
    within(connected.wait_for(|workers| !workers.contains_key("old-dead"))).await.unwrap();

    // The live saga's job runs on its adopted worker (in that worker's directory).
    let engine = pipeline::engine(control.dispatcher(Arc::new(MemorySecrets::new()))).await;
    let pwd = Job::pooled_command(["/bin/sh", "-c", "pwd"]).env("PATH", "/usr/bin:/bin");
    completed(outcome(start(&engine, "live", vec![("resume", pwd)]).await).await);
    let output = stored(control.logs(), "live/0#1", LogStream::Stdout).await;
    assert!(output.trim_end().ends_with("/workers/old-live"), "{output}");

    // Ephemeral: destroyed after that job, again through its pid file.
    within(control.scheduler().watch_counts().wait_for(|c| c.workers() == 0)).await.unwrap();
    assert!(matches!(earlier.state("old-live").await.unwrap(), WorkerState::Exited { .. }));
    assert!(restarted.list().await.unwrap().is_empty());
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    control.shutdown().await.unwrap();
}

/// Child-process workers given a broken agent setting: a registration address where nothing
/// listens (the agent retries until the deadline), or a CA bundle that is no PEM (the agent
/// exits 2 at once).
#[derive(Debug)]
struct Misconfigured {
    local: LocalProvider,
    refused_addr: Option<String>,
}

#[async_trait::async_trait]
impl Provider for Misconfigured {
    fn name(&self) -> &str {
        self.local.name()
    }
    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        let mut spec = spec.clone();
        match &self.refused_addr {
            Some(addr) => spec.agent.registration_addr = addr.clone(),
            None => spec.agent.ca_bundle_pem = "not a certificate".to_owned(),
        }
        self.local.provision(&spec).await
    }
    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        self.local.state(worker_id).await
    }
    async fn exited(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        self.local.exited(worker_id).await
    }
    async fn output(&self, worker_id: &str) -> Result<String, ProviderError> {
        self.local.output(worker_id).await
    }
    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        self.local.destroy(worker_id).await
    }
    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        self.local.list().await
    }
}

/// Runs one job on a `Misconfigured` child-process worker and returns why the saga failed.
async fn failure_with(dir: &Path, refused_addr: Option<String>, deadline: Duration) -> String {
    let local = LocalProvider::child_process(dir.join("workers"), agent_binary()).kill_on_drop(true);
    let provider = Arc::new(Misconfigured { local, refused_addr });
    let control = ControlPlane::builder(dir.join("data"))
        .provider(provider.clone(), ProviderPolicy::new().registration_deadline(deadline))
        .start()
        .await
        .unwrap();
    let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new())).retry(RetryPolicy::none());
    let engine = pipeline::engine(dispatcher).await;
    let job = Job::pooled_command(["/bin/true"]);
    let cause = failure(outcome(start(&engine, "doomed", vec![("build", job)]).await).await);
    // The worker was destroyed: no process, no directory.
    within(control.scheduler().watch_counts().wait_for(|c| c.workers() == 0)).await.unwrap();
    assert!(provider.list().await.unwrap().is_empty());
    control.shutdown().await.unwrap();
    cause
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_worker_that_cannot_reach_the_hub_is_destroyed_at_the_deadline_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was just free: nothing listens there.
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let started = Instant::now();
    let cause = failure_with(dir.path(), Some(refused.clone()), Duration::from_millis(1500)).await;
    assert!(cause.contains("did not register within 1.5s"), "{cause}");
    // The agent's own words, from its stderr file.
    assert!(cause.contains(&format!("with the control plane at {refused}")), "{cause}");
    assert!(cause.contains("registration failed"), "{cause}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_worker_that_exits_before_registering_fails_at_once_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let cause = failure_with(dir.path(), None, Duration::from_secs(30)).await;
    assert!(cause.contains("exited before registering (exit code 2)"), "{cause}");
    assert!(cause.contains("--ca-bundle (HODEI_CA_BUNDLE)"), "{cause}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_workers_exit_is_an_event_with_its_status_and_destroy_then_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlPlane::builder(dir.path().join("data")).start().await.unwrap();
    let local = LocalProvider::child_process(dir.path().join("workers"), agent_binary());
    // A CA bundle that is not one: the agent exits with status 2 before dialling.
    let mut spec = spec_for(&control, "exits", "saga-1");
    spec.agent.ca_bundle_pem = "not a certificate".to_owned();
    local.provision(&spec).await.unwrap();
    let ended = within(local.exited("exits")).await.unwrap();
    assert_eq!(ended, WorkerState::Exited { code: Some(2), reason: None });
    assert_eq!(local.state("exits").await.unwrap(), ended, "state agrees with the event");
    local.destroy("exits").await.unwrap();
    assert_eq!(local.state("exits").await.unwrap(), WorkerState::Gone);
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_agent_that_outlives_its_control_plane_reconnects_to_the_restarted_one_and_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A provider of its own, so that stopping the first control plane leaves the worker running.
    let provider =
        Arc::new(LocalProvider::child_process(dir.path().join("workers"), agent_binary()).kill_on_drop(true));
    let first = ControlPlane::builder(&data).hub_config(fast_hub()).start().await.unwrap();
    let addresses = (first.registration_addr(), first.session_addr());
    let mut connected = first.hub().watch_workers();
    provider.provision(&spec_for(&first, "survivor", "still-running")).await.unwrap();
    within(connected.wait_for(|workers| workers.contains_key("survivor"))).await.unwrap();
    first.shutdown().await.unwrap();
    assert_eq!(provider.state("survivor").await.unwrap(), WorkerState::Running);

    // Same data directory: same CA, same ports, so the agent's own reconnect finds it.
    let restarted = ControlPlane::builder(&data)
        .hub_config(fast_hub())
        .provider(provider.clone(), ProviderPolicy::new())
        .start()
        .await
        .unwrap();
    assert_eq!((restarted.registration_addr(), restarted.session_addr()), addresses);
    let mut connected = restarted.hub().watch_workers();
    within(connected.wait_for(|workers| workers.contains_key("survivor"))).await.unwrap();
    let report = restarted.scheduler().reap_orphans(|saga| saga == "still-running").await;
    assert_eq!(report.adopted, ["survivor"]);
    assert_eq!(restarted.scheduler().counts().idle, 1);
    restarted.shutdown().await.unwrap();
    assert_eq!(provider.state("survivor").await.unwrap(), WorkerState::Gone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaping_keeps_the_workers_of_sagas_the_store_has_in_flight_and_destroys_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(LocalProvider::in_process(dir.path().join("workers")));
    let control = ControlPlane::builder(dir.path().join("data"))
        .hub_config(fast_hub())
        .provider(provider.clone(), ProviderPolicy::new())
        .start()
        .await
        .unwrap();
    // A store with one saga in flight (its step never ends) and one finished.
    let store = Arc::new(MemoryStore::new());
    let definition = SagaDefinition::new("waits", 1, |ctx: SagaContext, (): ()| async move {
        ctx.step("wait").run(|_, (): ()| std::future::pending::<Result<(), StepError>>()).await
    });
    let quick =
        SagaDefinition::new("quick", 1, |_: SagaContext, (): ()| async move { Ok::<(), StepError>(()) });
    let engine =
        Engine::builder().store(store.clone()).register(definition).register(quick).start().await.unwrap();
    engine.start(SagaRun::new("waits", "in-flight", &()).unwrap()).await.unwrap();
    let done = engine.start(SagaRun::new("quick", "finished", &()).unwrap()).await.unwrap();
    within(done.outcome::<()>()).await.unwrap();
    let mut connected = control.hub().watch_workers();
    for saga in ["in-flight", "finished"] {
        provider.provision(&spec_for(&control, &format!("w-{saga}"), saga)).await.unwrap();
    }
    within(connected.wait_for(|workers| workers.len() == 2)).await.unwrap();

    let report = control.reap_orphans(store.as_ref()).await.unwrap();
    assert_eq!(report.destroyed, ["w-finished"]);
    assert_eq!(report.adopted, ["w-in-flight"]);
    within(connected.wait_for(|workers| workers.keys().eq(["w-in-flight"]))).await.unwrap();
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_saga_re_attaches_to_its_job_still_running_on_its_adopted_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (data, root, gate) = (dir.path().join("data"), dir.path().join("workers"), dir.path().join("gate"));
    assert!(std::process::Command::new("mkfifo").arg(&gate).status().unwrap().success());
    let store = Arc::new(MemoryStore::new());
    let job = Job::pooled_script(
        ["/bin/sh", "-s"],
        format!("echo started; read go < '{}'; echo finished", gate.display()),
    )
    .env("PATH", "/usr/bin:/bin");
    let control_plane = |provider: LocalProvider| {
        ControlPlane::builder(&data)
            .hub_config(fast_hub())
            .provider(Arc::new(provider), ProviderPolicy::new())
            .start()
    };
    let engine_over = |control: &ControlPlane| {
        let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new()));
        Engine::builder().store(store.clone()).register(pipeline::pipeline(dispatcher)).start()
    };

    // Before: the job starts on a child-process worker, then the control plane stops for a
    // restart, leaving the worker (and its job) running: its provider, dropped with it, must not
    // kill it. The control plane after the restart destroys it at the end.
    let before =
        control_plane(LocalProvider::child_process(&root, agent_binary()).kill_on_drop(false)).await.unwrap();
    let engine = engine_over(&before).await.unwrap();
    start(&engine, "release", vec![("wait", job)]).await;
    wait_for_stdout(before.logs(), "release/0#1", "started").await;
    before.detach().await.unwrap();
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(engine);

    // After: a new provider instance finds the worker by its record; the saga resumes on it.
    let provider = LocalProvider::child_process(&root, agent_binary()).kill_on_drop(true);
    let after = control_plane(provider).await.unwrap();
    let report = after.reap_orphans(store.as_ref()).await.unwrap();
    assert_eq!(report.adopted.len(), 1, "{report:?}");
    let engine = engine_over(&after).await.unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    let handle = engine.handle(&hodei_core::SagaId::new("release").unwrap()).unwrap();
    let outcomes = completed(within(handle.outcome::<Vec<hodei_agent::jobs::JobOutcome>>()).await.unwrap());
    // The job that ran is the first attempt's, once: re-attached, not run again.
    assert_eq!(outcomes[0].job_id, "release/0#1");
    assert_eq!(stored(after.logs(), "release/0#1", LogStream::Stdout).await, "started\nfinished\n");
    assert_eq!(after.scheduler().counts().provisioning, 0);
    after.shutdown().await.unwrap();
}
