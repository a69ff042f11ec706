//! The local provider end to end: real agents (in-process, or the real `hodei-agent` binary as
//! child processes) registering over mutual TLS on loopback with a real control plane, running
//! real jobs for real sagas.

mod pipeline;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hodei_agent::protocol::v1;
use hodei_core::{Engine, MemoryStore, RetryPolicy, SagaContext, SagaDefinition, SagaRun, StepError};
use hodei_providers::{
    AgentEnv, LocalProvider, Provider, ProviderError, WorkerInfo, WorkerSpec, WorkerState,
};
use hodei_server::jobs::{Job, MemorySecrets};
use hodei_server::logstore::LogStream;
use hodei_server::{ControlPlane, ProviderPolicy};
use pipeline::{completed, failure, fast_hub, matrix, outcome, start, stored, wait_for_stdout, within};

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
        Job::pooled_script(["/bin/sh"], body).env("PATH", "/usr/bin:/bin").env("WS", ws.to_string())
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
                "test -s \"$WS/artifact\" || exit 1\n\
                 echo \"testing with $DEPLOY\"; echo 'all tests passed' >&2"
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
        LocalProvider::child_process(dir.path().join("workers"), pipeline::agent_binary::agent_binary())
            .kill_on_drop(true);
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
    assert!(cmdline.starts_with(&pipeline::agent_binary::agent_binary().display().to_string()), "{cmdline}");
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
    let restarted = Arc::new(
        LocalProvider::child_process(&root, pipeline::agent_binary::agent_binary()).kill_on_drop(true),
    );
    let control = ControlPlane::builder(dir.path().join("data"))
        .hub_config(fast_hub())
        .provider(restarted.clone(), ProviderPolicy::new().ephemeral())
        .start()
        .await
        .unwrap();
    // What the control plane "before the restart" left running: its own provider instance.
    let earlier =
        LocalProvider::child_process(&root, pipeline::agent_binary::agent_binary()).kill_on_drop(true);
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

/// Child-process workers given a broken agent setting: a registration address where no hub
/// answers (the agent retries until the deadline), or a CA bundle that is no PEM (the agent
/// exits 2 at once).
#[derive(Debug)]
struct Misconfigured {
    local: LocalProvider,
    /// The registration address, when set: it closes the first connections, then refuses.
    no_hub: std::sync::Mutex<Option<tokio::net::TcpListener>>,
}

#[async_trait::async_trait]
impl Provider for Misconfigured {
    fn name(&self) -> &str {
        self.local.name()
    }
    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        let mut spec = spec.clone();
        let no_hub = self.no_hub.lock().unwrap().take();
        match &no_hub {
            Some(listener) => spec.agent.registration_addr = listener.local_addr().unwrap().to_string(),
            None => spec.agent.ca_bundle_pem = "not a certificate".to_owned(),
        }
        let info = self.local.provision(&spec).await?;
        if let Some(listener) = no_hub {
            // The registration deadline starts once this returns. The agent says that it failed
            // before it tries again, so by its second connection its stderr has the failure,
            // however long a busy machine took to start it.
            for _ in 0..2 {
                drop(listener.accept().await.unwrap());
            }
        }
        Ok(info)
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
async fn failure_with(dir: &Path, no_hub: Option<tokio::net::TcpListener>, deadline: Duration) -> String {
    let local = LocalProvider::child_process(dir.join("workers"), pipeline::agent_binary::agent_binary())
        .kill_on_drop(true);
    let provider = Arc::new(Misconfigured { local, no_hub: std::sync::Mutex::new(no_hub) });
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
    let no_hub = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = no_hub.local_addr().unwrap();
    let deadline = Duration::from_millis(1500);
    // The deadline starts after this.
    let started = Instant::now();
    let cause = failure_with(dir.path(), Some(no_hub), deadline).await;
    assert!(cause.contains("did not register within 1.5s"), "{cause}");
    // The agent's own words, from its stderr file.
    assert!(cause.contains(&format!("with the control plane at {addr}")), "{cause}");
    assert!(cause.contains("registration failed"), "{cause}");
    let waited = started.elapsed();
    assert!(waited >= deadline, "failed after {waited:?}, before the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_worker_that_exits_before_registering_fails_at_once_with_its_stderr() {
    let dir = tempfile::tempdir().unwrap();
    // Never reached: the failure must come from the exit, which the cause tells apart.
    let cause = failure_with(dir.path(), None, Duration::from_secs(3600)).await;
    assert!(cause.contains("exited before registering (exit code 2)"), "{cause}");
    assert!(cause.contains("--ca-bundle (HODEI_CA_BUNDLE)"), "{cause}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_workers_exit_is_an_event_with_its_status_and_destroy_then_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlPlane::builder(dir.path().join("data")).start().await.unwrap();
    let local =
        LocalProvider::child_process(dir.path().join("workers"), pipeline::agent_binary::agent_binary());
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
    let provider = Arc::new(
        LocalProvider::child_process(dir.path().join("workers"), pipeline::agent_binary::agent_binary())
            .kill_on_drop(true),
    );
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

/// After a restart, several jobs in flight at once, in two sagas and in parallel branches, are
/// each re-attached to their own step: every job's command starts once, no attempt starts a
/// second copy on a worker that runs a sibling's job, and each log is complete and closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_every_job_in_flight_re_attaches_to_its_own_step_and_none_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (data, root) = (dir.path().join("data"), dir.path().join("workers"));
    let markers = dir.path().join("markers");
    let store = Arc::new(MemoryStore::new());
    let names = ["unit", "integration", "docs", "lint"];
    let gate = |name: &str| dir.path().join(format!("gate-{name}"));
    let job = |name: &str| {
        assert!(std::process::Command::new("mkfifo").arg(gate(name)).status().unwrap().success());
        Job::pooled_script(
            ["/bin/sh"],
            format!(
                "echo 'start {name}' >> '{m}'; echo started; read go < '{g}'; echo 'end {name}' >> '{m}'; echo finished",
                m = markers.display(),
                g = gate(name).display()
            ),
        )
        .env("PATH", "/usr/bin:/bin")
    };
    let control_plane = |provider: LocalProvider| {
        ControlPlane::builder(&data)
            .hub_config(fast_hub())
            .provider(Arc::new(provider), ProviderPolicy::new())
            .start()
    };
    let engine_over = |control: &ControlPlane| {
        let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new()));
        Engine::builder()
            .store(store.clone())
            .register(matrix(dispatcher.clone()))
            .register(pipeline::pipeline(dispatcher))
            .start()
    };
    // Before: the jobs start on child-process workers, then the control plane stops for a
    // restart, leaving the workers (and their jobs) running: its provider, dropped with it, must
    // not kill them. The control plane after the restart destroys them at the end.
    let jobs: Vec<(String, Job)> = names[..3].iter().map(|name| (name.to_string(), job(name))).collect();
    let before = control_plane(
        LocalProvider::child_process(&root, pipeline::agent_binary::agent_binary()).kill_on_drop(false),
    )
    .await
    .unwrap();
    let engine = engine_over(&before).await.unwrap();
    engine.start(SagaRun::new("matrix", "tests", &jobs).unwrap()).await.unwrap();
    start(&engine, "lint", vec![("lint", job("lint"))]).await;
    // Branch b of the group at key 0 runs its job as step key 0.b.0.
    let job_ids: Vec<String> =
        (0..3).map(|b| format!("tests/0.{b}.0#1")).chain(["lint/0#1".to_string()]).collect();
    for id in &job_ids {
        wait_for_stdout(before.logs(), id, "started").await;
    }
    before.detach().await.unwrap();
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(engine);

    // After: a new provider instance finds the workers by their records; the sagas resume on
    // them, each step on the worker that runs its job.
    let provider =
        LocalProvider::child_process(&root, pipeline::agent_binary::agent_binary()).kill_on_drop(true);
    let after = control_plane(provider).await.unwrap();
    let report = after.reap_orphans(store.as_ref()).await.unwrap();
    assert_eq!(report.adopted.len(), 4, "{report:?}");
    let engine = engine_over(&after).await.unwrap();
    for name in names {
        let gate = gate(name);
        tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    }
    let tests = engine.handle(&hodei_core::SagaId::new("tests").unwrap()).unwrap();
    let lint = engine.handle(&hodei_core::SagaId::new("lint").unwrap()).unwrap();
    let mut ran: Vec<String> =
        completed(within(tests.outcome::<Vec<hodei_server::jobs::JobOutcome>>()).await.unwrap())
            .into_iter()
            .chain(completed(within(lint.outcome::<Vec<hodei_server::jobs::JobOutcome>>()).await.unwrap()))
            .map(|outcome| outcome.job_id)
            .collect();
    ran.sort();
    let mut expected = job_ids.clone();
    expected.sort();
    assert_eq!(ran, expected, "each step's outcome is its first attempt's job, re-attached");
    let mut lines: Vec<String> =
        std::fs::read_to_string(&markers).unwrap().lines().map(str::to_owned).collect();
    lines.sort();
    let mut once: Vec<String> =
        names.iter().flat_map(|n| [format!("end {n}"), format!("start {n}")]).collect();
    once.sort();
    assert_eq!(lines, once, "every job's command started and ended exactly once");
    for id in &job_ids {
        assert_eq!(stored(after.logs(), id, LogStream::Stdout).await, "started\nfinished\n", "{id}");
    }
    // One call lists a saga's jobs by step, branches included.
    let saga = hodei_core::SagaId::new("tests").unwrap();
    let history = engine.history(&saga).unwrap();
    let mut listed: Vec<(String, String, u32, String, Option<i32>)> =
        hodei_server::jobs::saga_jobs(after.hub(), &saga, &history)
            .await
            .unwrap()
            .into_iter()
            .map(|job| {
                let code = job.result.and_then(|r| match r.outcome {
                    Some(v1::job_result::Outcome::ExitCode(code)) => Some(code),
                    _ => None,
                });
                (job.job_id, job.key, job.attempt, job.name, code)
            })
            .collect();
    listed.sort();
    let expected: Vec<(String, String, u32, String, Option<i32>)> = names[..3]
        .iter()
        .enumerate()
        .map(|(b, name)| (format!("tests/0.{b}.0#1"), format!("0.{b}.0"), 1, name.to_string(), Some(0)))
        .collect();
    assert_eq!(listed, expected);
    after.shutdown().await.unwrap();
}

const DIES_WITH_CHILD_ENV: &str = "HODEI_LOCAL_DIES_WITH_CHILD";
const DIES_WITH_CHILD_TEST: &str = "in_process_jobs_die_with_their_process_child";

/// The control plane and engine of the test below, over `dir`: in-process workers (the
/// embedded default), the journal on sled.
async fn default_set_up(dir: &Path) -> (ControlPlane, Engine) {
    let control = ControlPlane::builder(dir.join("data"))
        .hub_config(fast_hub())
        .provider(Arc::new(LocalProvider::in_process(dir.join("workers"))), ProviderPolicy::new())
        .start()
        .await
        .unwrap();
    let engine = Engine::builder()
        .data_dir(dir.join("journal"))
        .register(pipeline::pipeline(control.dispatcher(Arc::new(MemorySecrets::new()))))
        .start()
        .await
        .unwrap();
    (control, engine)
}

/// The child of the test below: runs a quiet job (nothing on stdout, so no dead pipe can end
/// it) that keeps `fifo` open in its shell and in a background process, and waits for ever.
/// Its second attempt finds the marker the first left and ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_jobs_die_with_their_process_child() {
    let Ok(dir) = std::env::var(DIES_WITH_CHILD_ENV) else { return };
    let dir = PathBuf::from(dir);
    let (_control, engine) = default_set_up(&dir).await;
    let script = format!(
        "[ -e '{m}' ] && exit 0; : > '{m}'; exec 3> '{f}'; sleep 1000 & sleep 1000",
        m = dir.join("marker").display(),
        f = dir.join("fifo").display()
    );
    let job = Job::pooled_script(["/bin/sh"], script).env("PATH", "/usr/bin:/bin");
    let run = start(&engine, "quiet", vec![("quiet", job)]).await;
    // Killed while it waits.
    let _ = run.outcome::<Vec<hodei_server::jobs::JobOutcome>>().await;
    unreachable!("the quiet job never ends by itself");
}

/// The embedded default keeps its promise: when the process that runs in-process workers is
/// SIGKILLed, the processes of the jobs they ran die too (each job's sentinel kills its group),
/// so the retry after the restart never runs beside them. The job's processes hold the write
/// end of a FIFO; reading it ends only once every one of them is gone. After the restart the
/// retry runs, and the first attempt's log is closed with a result that says it was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_jobs_die_with_their_process() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", DIES_WITH_CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(DIES_WITH_CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let died = tokio::task::spawn_blocking(move || {
        // Opening blocks until the job has opened the FIFO, reading until every process
        // holding it has died.
        let mut reader = std::fs::File::open(&fifo).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map(|_| rest)
    });
    // Were a process of the job to outlive the process that ran its worker, the FIFO would stay
    // open for the 1000 s of its `sleep`.
    let read = tokio::time::timeout(Duration::from_secs(60), died)
        .await
        .expect("hung: a process of the job still holds the FIFO open");
    assert_eq!(read.unwrap().unwrap(), b"", "the job wrote nothing");

    let (control, engine) = default_set_up(dir.path()).await;
    let saga = hodei_core::SagaId::new("quiet").unwrap();
    let outcomes = completed(outcome(engine.handle(&saga).unwrap()).await);
    assert_eq!(outcomes[0].job_id, "quiet/0#2", "the retry ran the job again");
    let history = engine.history(&saga).unwrap();
    let attempts: Vec<(String, Option<v1::job_result::Outcome>)> =
        hodei_server::jobs::saga_jobs(control.hub(), &saga, &history)
            .await
            .unwrap()
            .into_iter()
            .map(|job| (job.job_id, job.result.and_then(|r| r.outcome)))
            .collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(
        matches!(&attempts[0], (id, Some(v1::job_result::Outcome::Lost(reason))) if id == "quiet/0#1" && reason.contains("quiet/0#2 replaced it")),
        "{attempts:?}"
    );
    assert_eq!(attempts[1], ("quiet/0#2".to_string(), Some(v1::job_result::Outcome::ExitCode(0))));
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    control.shutdown().await.unwrap();
}

/// Fail-fast: when one job of a matrix fails, the running sibling's job is cancelled on its
/// worker and waited for, so that by the time the saga's outcome is published the sibling's
/// step has its end in the journal and its job a stored `Cancelled` result (its log closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_cancels_its_running_sibling_whose_result_is_stored_before_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("started");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let control = ControlPlane::builder(dir.path().join("data"))
        .hub_config(fast_hub())
        .provider(Arc::new(LocalProvider::in_process(dir.path().join("workers"))), ProviderPolicy::new())
        .start()
        .await
        .unwrap();
    let engine = Engine::builder()
        .store(MemoryStore::new())
        .register(matrix(control.dispatcher(Arc::new(MemorySecrets::new()))))
        .start()
        .await
        .unwrap();
    let script = |text: String| Job::pooled_script(["/bin/sh"], text).env("PATH", "/usr/bin:/bin");
    let jobs = vec![
        // Fails once its sibling runs.
        ("lint".to_string(), script(format!("read go < '{}'; exit 1", fifo.display()))),
        ("tests".to_string(), script(format!("echo go > '{}'; exec sleep 1000", fifo.display()))),
    ];
    let handle = engine.start(SagaRun::new("matrix", "ci", &jobs).unwrap()).await.unwrap();
    match within(handle.outcome::<Vec<hodei_server::jobs::JobOutcome>>()).await.unwrap() {
        hodei_core::Outcome::Failed { cause } => assert!(cause.contains("exited with code 1"), "{cause}"),
        other => panic!("unexpected {other:?}"),
    }
    let saga = hodei_core::SagaId::new("ci").unwrap();
    let history = engine.history(&saga).unwrap();
    let jobs = hodei_server::jobs::saga_jobs(control.hub(), &saga, &history).await.unwrap();
    let outcomes: Vec<(String, Option<v1::job_result::Outcome>)> =
        jobs.into_iter().map(|job| (job.name, job.result.and_then(|r| r.outcome))).collect();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert!(outcomes.contains(&("lint".into(), Some(v1::job_result::Outcome::ExitCode(1)))), "{outcomes:?}");
    assert!(
        outcomes.iter().any(|(name, outcome)| name == "tests"
            && matches!(outcome, Some(v1::job_result::Outcome::Cancelled(reason)) if reason.contains("branch 0 of `jobs` failed"))),
        "{outcomes:?}"
    );
    let ended = history.iter().any(
        |r| matches!(&r.event, hodei_core::Event::StepCancelled { reason, .. } if reason == "branch 0 of `jobs` failed"),
    );
    assert!(ended, "the cancelled step's end is journaled");
    control.shutdown().await.unwrap();
}

/// A failed job's error says why in its own words: the last lines of its stderr and stdout,
/// as stored (masked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_s_error_carries_the_last_lines_of_its_output_masked() {
    let dir = tempfile::tempdir().unwrap();
    let control =
        ControlPlane::builder(dir.path().join("data")).hub_config(fast_hub()).start().await.unwrap();
    let secrets = MemorySecrets::new().insert("deploy-token", "tok-2718281828");
    let engine = pipeline::engine(control.dispatcher(Arc::new(secrets))).await;
    let script = "i=1; while [ $i -le 30 ]; do echo \"line $i\"; i=$((i+1)); done\n\
                  echo \"token $TOKEN\"\n\
                  echo 'sh: 1: cargo: not found' >&2\n\
                  exit 127\n";
    let job =
        Job::pooled_script(["/bin/sh"], script).env("PATH", "/usr/bin:/bin").secret("TOKEN", "deploy-token");
    let cause = failure(outcome(start(&engine, "failing", vec![("build", job)]).await).await);
    assert!(cause.contains("exited with code 127"), "{cause}");
    assert!(cause.contains("last lines of stderr:\n  sh: 1: cargo: not found\n"), "{cause}");
    let stdout_tail: String = (22..=30).map(|i| format!("  line {i}\n")).collect();
    assert!(cause.contains(&format!("last lines of stdout:\n{stdout_tail}  token ***")), "{cause}");
    assert!(!cause.contains("line 21\n"), "ten lines of each stream, no more: {cause}");
    assert!(!cause.contains("tok-2718281828"), "{cause}");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    control.shutdown().await.unwrap();
}

const PROVISION_CRASH_ENV: &str = "HODEI_LOCAL_PROVISION_CRASH";
/// The message of the local provider's debug event the child stops at.
const PROVISION_CRASH_AT_ENV: &str = "HODEI_LOCAL_PROVISION_CRASH_AT";
const PROVISION_CRASH_TEST: &str = "a_control_plane_killed_while_provisioning_child";
const STOPPED: &str = "hodei-provision-crash: stopped";
const CRASH_WORKER: &str = "w-cut-short";
const CRASH_SAGA: &str = "saga-cut-short";

/// In the child: at the local provider's debug event with the message given, prints the event's
/// fields and stops the thread for good, so that the parent kills the process exactly there.
#[derive(Debug)]
struct StopAt(String);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StopAt {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !event.metadata().target().starts_with("hodei_providers::local") {
            return;
        }
        let mut fields = EventFields::default();
        event.record(&mut fields);
        if fields.message == self.0 {
            println!("{STOPPED}{}", fields.rest);
            loop {
                std::thread::park();
            }
        }
    }
}

#[derive(Debug, Default)]
struct EventFields {
    message: String,
    rest: String,
}

impl tracing::field::Visit for EventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

/// The child of the test below: a control plane provisioning one child-process worker for a
/// saga, stopped (then killed) at a point of the provisioning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_while_provisioning_child() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let Ok(dir) = std::env::var(PROVISION_CRASH_ENV) else { return };
    let stop_at = std::env::var(PROVISION_CRASH_AT_ENV).unwrap();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(StopAt(stop_at))).unwrap();
    let dir = PathBuf::from(dir);
    let control = ControlPlane::builder(dir.join("data")).hub_config(fast_hub()).start().await.unwrap();
    let provider = LocalProvider::child_process(dir.join("workers"), pipeline::agent_binary::agent_binary());
    let mut spec = spec_for(&control, CRASH_WORKER, CRASH_SAGA);
    // Nothing listens there: however long the parent takes to kill this process, the agent
    // cannot have registered by then, as it could not have before a real crash either.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    spec.agent.registration_addr = nowhere.to_string();
    provider.provision(&spec).await.unwrap();
    unreachable!("the child stops in the provisioning");
}

/// Whether `pid` is a live (not zombie) `hodei-agent` whose command line names `worker`.
fn agent_runs(pid: u32, worker: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    !zombie
        && cmdline.starts_with(&pipeline::agent_binary::agent_binary().display().to_string())
        && cmdline.contains(worker)
}

/// Kills the agent a failed test left, so that no test leaves a process behind.
struct KillLeftAgent(Option<u32>);

impl Drop for KillLeftAgent {
    fn drop(&mut self) {
        if let Some(pid) = self.0
            && agent_runs(pid, CRASH_WORKER)
        {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

/// A control plane killed while provisioning a child-process worker, just before the agent
/// starts or just after (before its pid is recorded), leaves nothing the next one cannot find:
/// the restarted control plane lists the worker and reaps it, and the agent process that did
/// start is gone. Its saga is live, but the worker never registered, so it is destroyed rather
/// than adopted. The kill lands at the provider's own debug events, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_provisioning_a_killed_control_plane_cut_short_is_found_and_reaped() {
    use std::io::BufRead as _;
    // Built before the child needs it.
    let agent = pipeline::agent_binary::agent_binary();
    for (stop_at, agent_started) in [("starting the agent process", false), ("agent process started", true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", PROVISION_CRASH_TEST, "--nocapture", "--test-threads=1"])
            .env(PROVISION_CRASH_ENV, dir.path())
            .env(PROVISION_CRASH_AT_ENV, stop_at)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let child_pid = child.id().to_string();
        let stopped = tokio::task::spawn_blocking(move || {
            // The line may follow the test harness's own words on it.
            let line = std::io::BufReader::new(stdout)
                .lines()
                .map(Result::unwrap)
                .find_map(|line| line.split_once(STOPPED).map(|(_, fields)| fields.to_owned()));
            child.kill().unwrap();
            child.wait().unwrap();
            line.expect("the child stops where it was told")
        });
        let Ok(stopped) = tokio::time::timeout(pipeline::LIMIT, stopped).await else {
            // Killed, so that the reader ends and the test fails rather than hangs.
            let _ = std::process::Command::new("kill").args(["-KILL", &child_pid]).status();
            panic!("{stop_at}: the child did not stop there within {:?}", pipeline::LIMIT);
        };
        let stopped = stopped.unwrap();
        let pid: Option<u32> = stopped.split_once(" pid=").map(|(_, pid)| pid.trim().parse().unwrap());
        let _left = KillLeftAgent(pid);
        assert_eq!(pid.is_some(), agent_started, "{stopped}");
        if let Some(pid) = pid {
            let output = dir.path().join("workers").join(CRASH_WORKER).join("agent.log");
            assert!(
                agent_runs(pid, CRASH_WORKER),
                "the agent outlived the control plane that started it; its output: {:?}",
                std::fs::read_to_string(output)
            );
        }

        let root = dir.path().join("workers");
        let provider = Arc::new(LocalProvider::child_process(&root, agent).kill_on_drop(true));
        let control = ControlPlane::builder(dir.path().join("data"))
            .hub_config(fast_hub())
            .provider(provider.clone(), ProviderPolicy::new())
            .start()
            .await
            .unwrap();
        let listed = provider.list().await.unwrap();
        assert_eq!(listed.len(), 1, "{stop_at}: {listed:?}");
        assert_eq!(listed[0].worker_id, CRASH_WORKER);
        assert_eq!(listed[0].state == WorkerState::Running, agent_started, "{stop_at}: {listed:?}");
        if let Some(pid) = pid {
            assert_eq!(listed[0].handle, pid.to_string(), "found by its command line");
        }

        let report = control.scheduler().reap_orphans(|saga| saga == CRASH_SAGA).await;
        assert!(report.errors.is_empty(), "{stop_at}: {:?}", report.errors);
        assert_eq!(report.destroyed, [CRASH_WORKER], "{stop_at}: {report:?}");
        assert!(report.adopted.is_empty(), "{stop_at}: {report:?}");
        if let Some(pid) = pid {
            assert!(!agent_runs(pid, CRASH_WORKER), "{stop_at}: the agent is still running");
        }
        assert!(!root.join(CRASH_WORKER).exists(), "{stop_at}");
        assert!(provider.list().await.unwrap().is_empty(), "{stop_at}");
        control.shutdown().await.unwrap();
    }
}

/// A control plane killed after creating a worker's directory and before its record was whole
/// leaves a directory holding nothing else (and no process, which starts only after the
/// record): it is listed as a worker that has exited, and destroying it removes it. A directory
/// holding anything else is not a worker, and is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_directory_left_without_its_record_is_listed_as_exited_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("workers");
    std::fs::create_dir_all(root.join("w-half")).unwrap();
    std::fs::write(root.join("w-half/worker.partial"), "lab").unwrap();
    std::fs::create_dir_all(root.join("not-a-worker")).unwrap();
    std::fs::write(root.join("not-a-worker/notes.txt"), "mine").unwrap();
    let provider = LocalProvider::child_process(&root, pipeline::agent_binary::agent_binary());

    let listed = provider.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].worker_id, "w-half");
    assert!(matches!(listed[0].state, WorkerState::Exited { .. }), "{listed:?}");
    provider.destroy("w-half").await.unwrap();
    assert!(!root.join("w-half").exists());
    assert!(root.join("not-a-worker/notes.txt").exists());
    assert!(provider.list().await.unwrap().is_empty());
    assert_eq!(provider.state("w-half").await.unwrap(), WorkerState::Gone);
}
