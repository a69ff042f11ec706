//! The scheduler through real sagas: a real engine, a real hub with mutual TLS on loopback,
//! in-process local workers that really register, and pooled jobs that run real processes.
//! Fake providers stand in only where a worker must misbehave (never register, or crash).

mod pipeline;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hodei_core::{Engine, RetryPolicy, SagaHandle};
use hodei_providers::{
    AgentEnv, LocalProvider, Provider, ProviderError, WorkerInfo, WorkerSpec, WorkerState,
};
use hodei_server::jobs::{Job, MemorySecrets};
use hodei_server::{ControlPlane, ProviderPolicy, SchedulerCounts};
use pipeline::{completed, failure, fast_hub, outcome, wait_for_stdout, within};
use tempfile::TempDir;

/// What a provider was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Provision(String),
    Destroy(String),
}

/// Forwards to `inner` and records provisions and destroys.
#[derive(Debug)]
struct Recorded {
    inner: Arc<dyn Provider>,
    calls: Mutex<Vec<Call>>,
}

impl Recorded {
    fn new(inner: impl Provider + 'static) -> Arc<Self> {
        Arc::new(Self { inner: Arc::new(inner), calls: Mutex::new(Vec::new()) })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn provisioned(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| if let Call::Provision(id) = c { Some(id) } else { None })
            .collect()
    }

    fn destroyed(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| if let Call::Destroy(id) = c { Some(id) } else { None })
            .collect()
    }
}

#[async_trait::async_trait]
impl Provider for Recorded {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn labels(&self) -> BTreeMap<String, String> {
        self.inner.labels()
    }
    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        self.calls.lock().unwrap().push(Call::Provision(spec.worker_id.clone()));
        self.inner.provision(spec).await
    }
    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        self.inner.state(worker_id).await
    }
    async fn output(&self, worker_id: &str) -> Result<String, ProviderError> {
        self.inner.output(worker_id).await
    }
    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        self.calls.lock().unwrap().push(Call::Destroy(worker_id.to_owned()));
        self.inner.destroy(worker_id).await
    }
    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        self.inner.list().await
    }
}

/// A provider whose workers start nothing that could register: they run, silently, until the
/// deadline, or (`crashes`) report an exit at once.
#[derive(Debug)]
struct Broken {
    crashes: bool,
}

const BROKEN_OUTPUT: &str = "hodei-agent: registration failed: connection refused; retrying in 400ms";

#[async_trait::async_trait]
impl Provider for Broken {
    fn name(&self) -> &str {
        "broken"
    }
    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        Ok(WorkerInfo::new(&spec.worker_id, "none", spec.all_labels(), WorkerState::Running))
    }
    async fn state(&self, _: &str) -> Result<WorkerState, ProviderError> {
        Ok(if self.crashes {
            WorkerState::Exited { code: Some(2), reason: None }
        } else {
            WorkerState::Running
        })
    }
    async fn output(&self, _: &str) -> Result<String, ProviderError> {
        Ok(BROKEN_OUTPUT.to_owned())
    }
    async fn destroy(&self, _: &str) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        Ok(Vec::new())
    }
}

struct Setup {
    dir: TempDir,
    control: ControlPlane,
    engine: Engine,
}

impl Setup {
    /// A control plane with `provider` under `policy`, and an engine running `pipeline` sagas
    /// whose steps retry per `retry`.
    async fn new(provider: Arc<dyn Provider>, policy: ProviderPolicy, retry: RetryPolicy) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlPlane::builder(dir.path().join("control"))
            .hub_config(fast_hub())
            .provider(provider, policy)
            .start()
            .await
            .unwrap();
        let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new())).retry(retry);
        let engine = pipeline::engine(dispatcher).await;
        Self { dir, control, engine }
    }

    fn local(dir: &Path) -> LocalProvider {
        LocalProvider::in_process(dir.join("workers"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn start(&self, id: &str, jobs: Vec<(&str, Job)>) -> SagaHandle {
        pipeline::start(&self.engine, id, jobs).await
    }

    async fn wait_counts(&self, condition: impl FnMut(&SchedulerCounts) -> bool) {
        within(self.control.scheduler().watch_counts().wait_for(condition)).await.unwrap();
    }
}

/// A pooled `sh -c script` with a minimal PATH.
fn shell(script: &str) -> Job {
    Job::pooled_command(["/bin/sh", "-c", script]).env("PATH", "/usr/bin:/bin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cap_of_one_waiting_jobs_run_by_priority_then_arrival_one_worker_at_a_time() {
    let root = tempfile::tempdir().unwrap();
    let provider = Recorded::new(Setup::local(root.path()));
    let setup = Setup::new(provider.clone(), ProviderPolicy::new().max_workers(1), RetryPolicy::none()).await;
    let (gate, order) = (setup.path("gate"), setup.path("order"));
    let made = std::process::Command::new("mkfifo").arg(&gate).status().unwrap();
    assert!(made.success());

    // The first job holds the only worker until the test opens the gate.
    let hold =
        shell(&format!("echo holding; read go < '{}'; echo a >> '{}'", gate.display(), order.display()));
    let first = setup.start("cap-a", vec![("hold", hold)]).await;
    wait_for_stdout(setup.control.logs(), "cap-a/0#1", "holding").await;

    let mut waiting = Vec::new();
    for (n, (id, priority)) in [("b", 0), ("c", 5), ("d", 0)].into_iter().enumerate() {
        let job = shell(&format!("echo {id} >> '{}'", order.display())).priority(priority);
        waiting.push(setup.start(&format!("cap-{id}"), vec![("record", job)]).await);
        // Queued before the next arrives, so that arrival order is what the test says.
        setup.wait_counts(|c| c.queued == n + 1).await;
    }
    assert_eq!(setup.control.scheduler().counts().workers(), 1);

    tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    completed(outcome(first).await);
    for handle in waiting {
        completed(outcome(handle).await);
    }
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "a\nc\nb\nd\n");

    // Never two workers at once: every provision follows the previous worker's destroy.
    setup.wait_counts(|c| c.workers() == 0).await;
    let calls = provider.calls();
    assert_eq!(calls.len(), 8, "{calls:?}");
    for pair in calls.chunks(2) {
        assert!(matches!(&pair, [Call::Provision(p), Call::Destroy(d)] if p == d), "{calls:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_worker_runs_one_job_and_is_destroyed_after_it() {
    let root = tempfile::tempdir().unwrap();
    let provider = Recorded::new(Setup::local(root.path()));
    let setup = Setup::new(provider.clone(), ProviderPolicy::new().ephemeral(), RetryPolicy::none()).await;
    let mut connected = setup.control.hub().watch_workers();

    let handle = setup.start("eph", vec![("one", shell("echo one")), ("two", shell("echo two"))]).await;
    let outcomes = completed(outcome(handle).await);
    assert_eq!(outcomes.len(), 2);
    setup.wait_counts(|c| c.workers() == 0).await;

    let provisioned = provider.provisioned();
    assert_eq!(provisioned.len(), 2, "one worker per job: {provisioned:?}");
    assert_ne!(provisioned[0], provisioned[1]);
    assert_eq!(provider.destroyed(), provisioned);
    within(connected.wait_for(|workers| workers.is_empty())).await.unwrap();
    assert!(provider.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_worker_serves_later_jobs_of_any_saga_while_it_is_idle() {
    let root = tempfile::tempdir().unwrap();
    let provider = Recorded::new(Setup::local(root.path()));
    // Never reached during the test: however long a busy machine takes between two jobs, the
    // idle spell in between must not decide whether the worker is reused.
    let policy = ProviderPolicy::new().reuse_for(Duration::from_secs(3600));
    let setup = Setup::new(provider.clone(), policy, RetryPolicy::none()).await;

    let handle = setup.start("reuse-1", vec![("one", shell("echo one")), ("two", shell("echo two"))]).await;
    completed(outcome(handle).await);
    assert_eq!(setup.control.scheduler().counts().idle, 1);
    let handle = setup.start("reuse-2", vec![("three", shell("echo three"))]).await;
    completed(outcome(handle).await);
    assert_eq!(provider.provisioned().len(), 1, "{:?}", provider.calls());
    assert!(provider.destroyed().is_empty(), "{:?}", provider.calls());
    assert_eq!(setup.control.scheduler().counts().idle, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_is_destroyed_once_its_idle_timeout_has_passed() {
    let idle = Duration::from_millis(300);
    let root = tempfile::tempdir().unwrap();
    let provider = Recorded::new(Setup::local(root.path()));
    let setup =
        Setup::new(provider.clone(), ProviderPolicy::new().reuse_for(idle), RetryPolicy::none()).await;
    let gate = setup.path("gate");
    assert!(std::process::Command::new("mkfifo").arg(&gate).status().unwrap().success());

    let hold = shell(&format!("echo holding; read go < '{}'", gate.display()));
    let handle = setup.start("idle", vec![("hold", hold)]).await;
    wait_for_stdout(setup.control.logs(), "idle/0#1", "holding").await;
    // The job ends, and the worker goes idle, only after this.
    let released = Instant::now();
    tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    completed(outcome(handle).await);

    setup.wait_counts(|c| c.workers() == 0).await;
    let waited = released.elapsed();
    assert!(waited >= idle, "destroyed {waited:?} after its job ended, before the idle timeout");
    assert_eq!(provider.provisioned().len(), 1, "{:?}", provider.calls());
    assert_eq!(provider.destroyed(), provider.provisioned());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_that_disconnects_is_dropped_from_the_pool() {
    let root = tempfile::tempdir().unwrap();
    let provider = Recorded::new(Setup::local(root.path()));
    let policy = ProviderPolicy::new().reuse_for(Duration::from_secs(600));
    let setup = Setup::new(provider.clone(), policy, RetryPolicy::none()).await;

    completed(outcome(setup.start("idle", vec![("one", shell("echo one"))]).await).await);
    assert_eq!(setup.control.scheduler().counts().idle, 1);
    let worker = provider.provisioned().remove(0);
    // Stopped behind the scheduler's back: the hub sees it leave.
    provider.inner.destroy(&worker).await.unwrap();

    setup.wait_counts(|c| c.workers() == 0).await;
    assert_eq!(provider.destroyed(), [worker]);
    // The next job gets a new worker rather than the dead one.
    completed(outcome(setup.start("idle-2", vec![("two", shell("echo two"))]).await).await);
    assert_eq!(provider.provisioned().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_registers_is_destroyed_at_the_deadline_and_fails_retryably_with_its_output() {
    let provider = Recorded::new(Broken { crashes: false });
    let deadline = Duration::from_millis(300);
    let policy = ProviderPolicy::new().registration_deadline(deadline);
    let retry = RetryPolicy::attempts(2).initial_backoff(Duration::from_millis(10));
    let setup = Setup::new(provider.clone(), policy, retry).await;

    // Both attempts' deadlines start after this.
    let started = Instant::now();
    let cause = failure(outcome(setup.start("silent", vec![("build", shell("echo never"))]).await).await);
    assert!(cause.contains("did not register within 300ms"), "{cause}");
    assert!(cause.contains(BROKEN_OUTPUT), "{cause}");
    // Two attempts, so the failure was retryable; each worker was destroyed.
    setup.wait_counts(|c| c.workers() == 0).await;
    let provisioned = provider.provisioned();
    assert_eq!(provisioned.len(), 2, "{:?}", provider.calls());
    assert_eq!(provider.destroyed(), provisioned);
    let waited = started.elapsed();
    assert!(waited >= deadline * 2, "failed after {waited:?}, before two deadlines had passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_before_registering_fails_at_once_with_its_output() {
    let provider = Recorded::new(Broken { crashes: true });
    // Never reached: the failure must come from the exit, which the cause tells apart.
    let policy = ProviderPolicy::new().registration_deadline(Duration::from_secs(3600));
    let setup = Setup::new(provider.clone(), policy, RetryPolicy::none()).await;

    let cause = failure(outcome(setup.start("crash", vec![("build", shell("echo never"))]).await).await);
    assert!(cause.contains("exited before registering (exit code 2)"), "{cause}");
    assert!(cause.contains(BROKEN_OUTPUT), "{cause}");
    setup.wait_counts(|c| c.workers() == 0).await;
    assert_eq!(provider.destroyed(), provider.provisioned());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_provider_matches_fails_for_good_without_provisioning() {
    let root = tempfile::tempdir().unwrap();
    let provider = Recorded::new(Setup::local(root.path()).label("pool", "ci"));
    let retry = RetryPolicy::attempts(3).initial_backoff(Duration::from_millis(10));
    let setup = Setup::new(provider.clone(), ProviderPolicy::new(), retry).await;

    let gpu = shell("true").label("gpu", "a100");
    let cause = failure(outcome(setup.start("gpu", vec![("train", gpu)]).await).await);
    assert!(cause.contains("no worker can run this job") && cause.contains("gpu=a100"), "{cause}");
    let hinted = shell("true").provider("docker");
    let cause = failure(outcome(setup.start("hint", vec![("build", hinted)]).await).await);
    assert!(cause.contains("from provider `docker`"), "{cause}");
    assert!(provider.calls().is_empty(), "{:?}", provider.calls());

    // Labels the provider offers, and its name as the hint, do match.
    let matching =
        shell("echo matched").label("pool", "ci").label("os", std::env::consts::OS).provider("local");
    completed(outcome(setup.start("match", vec![("build", matching)]).await).await);
    assert_eq!(provider.provisioned().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_orphans_of_dead_sagas_are_reaped_and_unclaimed_adopted_workers_expire() {
    let root = tempfile::tempdir().unwrap();
    // Two pools, so that each adopted worker gets the claim timeout its part of the test needs:
    // the claimed one's is never reached, however long its saga takes to come back; the
    // unclaimed one's passes soon.
    let kept = Recorded::new(LocalProvider::in_process(root.path().join("kept")).named("kept"));
    let expiring = Recorded::new(LocalProvider::in_process(root.path().join("expiring")).named("expiring"));
    let claim_timeout = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let control = ControlPlane::builder(dir.path().join("control"))
        .hub_config(fast_hub())
        .provider(kept.clone(), ProviderPolicy::new().registration_deadline(Duration::from_secs(3600)))
        .provider(expiring.clone(), ProviderPolicy::new().registration_deadline(claim_timeout))
        .start()
        .await
        .unwrap();
    let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new())).retry(RetryPolicy::none());
    let engine = pipeline::engine(dispatcher).await;
    let hub = control.hub();

    // What an earlier control plane left running: workers for three sagas, connected.
    let mut connected = hub.watch_workers();
    for (saga, provider) in [("dead", &kept), ("live-claimed", &kept), ("live-unclaimed", &expiring)] {
        let worker_id = format!("old-{saga}");
        let token = hub.pki().issue_token(&worker_id).unwrap();
        let agent = AgentEnv::new(
            control.registration_addr().to_string(),
            control.session_addr().to_string(),
            token.as_str(),
            hub.pki().ca_bundle_pem(),
        );
        let mut spec = WorkerSpec::new(&worker_id, agent);
        spec.saga_id = Some(saga.to_owned());
        provider.inner.provision(&spec).await.unwrap();
    }
    within(connected.wait_for(|workers| workers.len() == 3)).await.unwrap();

    // The adopted workers' claim timers start after this.
    let adopted_at = Instant::now();
    let report = control.scheduler().reap_orphans(|saga| saga.starts_with("live")).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.destroyed, ["old-dead"]);
    let mut adopted = report.adopted.clone();
    adopted.sort();
    assert_eq!(adopted, ["old-live-claimed", "old-live-unclaimed"]);
    within(connected.wait_for(|workers| !workers.contains_key("old-dead"))).await.unwrap();

    // The live saga's next job runs on its adopted worker; nothing new is provisioned.
    let claimed = pipeline::start(&engine, "live-claimed", vec![("resume", shell("echo resumed"))]).await;
    completed(outcome(claimed).await);
    assert!(kept.provisioned().is_empty(), "{:?}", kept.calls());
    assert!(expiring.provisioned().is_empty(), "{:?}", expiring.calls());
    // The other saga never comes back: its worker goes once the claim timeout passes.
    within(control.scheduler().watch_counts().wait_for(|c| c.workers() == 0)).await.unwrap();
    let waited = adopted_at.elapsed();
    assert!(waited >= claim_timeout, "destroyed {waited:?} after its adoption, before the claim timeout");
    let mut destroyed = kept.destroyed();
    destroyed.sort();
    assert_eq!(destroyed, ["old-dead", "old-live-claimed"]);
    assert_eq!(expiring.destroyed(), ["old-live-unclaimed"]);
    assert!(kept.list().await.unwrap().is_empty());
    assert!(expiring.list().await.unwrap().is_empty());
}

/// Wakes the test below when the scheduler keeps an adopted worker whose claim timeout passed
/// while it ran a job.
static KEPT: tokio::sync::Notify = tokio::sync::Notify::const_new();

struct OnKept;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for OnKept {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}") == "idle timeout of a worker that holds a job: kept";
                }
            }
        }
        let mut message = Message(false);
        event.record(&mut message);
        if message.0 {
            KEPT.notify_one();
        }
    }
}

/// An adopted worker whose claim timeout passes while it runs a job is kept until the job is
/// done: its saga's step may wait for that job from another engine (whose control plane shares
/// the job's result through the database), or come back for it later. Destroyed, the job would
/// be lost and run again. Once the job is done and still nobody claims the worker, it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_worker_running_a_job_outlives_its_claim_timeout_until_the_job_ends() {
    use hodei_agent::protocol::v1;
    use tracing_subscriber::layer::SubscriberExt as _;
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(OnKept)).unwrap();
    let root = tempfile::tempdir().unwrap();
    let expiring = Recorded::new(LocalProvider::in_process(root.path().join("workers")).named("expiring"));
    let dir = tempfile::tempdir().unwrap();
    let control = ControlPlane::builder(dir.path().join("control"))
        .hub_config(fast_hub())
        .provider(expiring.clone(), ProviderPolicy::new().registration_deadline(Duration::from_millis(200)))
        .start()
        .await
        .unwrap();
    let hub = control.hub().clone();

    // What an earlier control plane left: a connected worker of a live saga, running a job.
    let worker_id = "old-busy";
    let token = hub.pki().issue_token(worker_id).unwrap();
    let agent = AgentEnv::new(
        control.registration_addr().to_string(),
        control.session_addr().to_string(),
        token.as_str(),
        hub.pki().ca_bundle_pem(),
    );
    let mut spec = WorkerSpec::new(worker_id, agent);
    spec.saga_id = Some("live-busy".to_owned());
    expiring.inner.provision(&spec).await.unwrap();
    let mut workers = hub.watch_workers();
    within(workers.wait_for(|workers| workers.contains_key(worker_id))).await.unwrap();
    let gate = root.path().join("gate");
    let job = v1::JobSpec {
        job_id: "live-busy/0#1".to_owned(),
        command: vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            format!("while [ ! -e {} ]; do sleep 0.05; done; echo done", gate.display()),
        ],
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        ..v1::JobSpec::default()
    };
    let running = tokio::spawn({
        let hub = hub.clone();
        async move { hub.run_job(worker_id, job).await }
    });
    within(async {
        while workers.running_jobs().get(worker_id).is_none_or(|jobs| jobs.is_empty()) {
            workers.changed().await.expect("the hub is gone");
        }
    })
    .await;

    let report = control.scheduler().reap_orphans(|saga| saga == "live-busy").await;
    assert_eq!(report.adopted, [worker_id], "{report:?}");
    // Its claim timeout passed with the job running: kept, not destroyed.
    within(KEPT.notified()).await;
    assert!(expiring.destroyed().is_empty(), "{:?}", expiring.calls());

    std::fs::write(&gate, b"").unwrap();
    let result = within(running).await.unwrap().unwrap();
    assert_eq!(result.outcome, Some(v1::job_result::Outcome::ExitCode(0)), "{result:?}");
    // Done, and nobody claims it: it goes at a later timeout.
    within(control.scheduler().watch_counts().wait_for(|c| c.workers() == 0)).await.unwrap();
    assert_eq!(expiring.destroyed(), [worker_id]);
    assert!(expiring.provisioned().is_empty(), "{:?}", expiring.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_a_full_provider_does_not_hold_up_a_job_for_another() {
    let root = tempfile::tempdir().unwrap();
    let busy = Recorded::new(LocalProvider::in_process(root.path().join("busy")).named("busy"));
    let free = Recorded::new(LocalProvider::in_process(root.path().join("free")).named("free"));
    let dir = tempfile::tempdir().unwrap();
    let control = ControlPlane::builder(dir.path().join("control"))
        .hub_config(fast_hub())
        .provider(busy.clone(), ProviderPolicy::new().max_workers(1))
        .provider(free.clone(), ProviderPolicy::new().max_workers(1))
        .start()
        .await
        .unwrap();
    let engine = pipeline::engine(control.dispatcher(Arc::new(MemorySecrets::new()))).await;
    let gate = dir.path().join("gate");
    assert!(std::process::Command::new("mkfifo").arg(&gate).status().unwrap().success());

    let hold = shell(&format!("echo holding; read go < '{}'", gate.display())).provider("busy");
    let holding = pipeline::start(&engine, "hold", vec![("hold", hold)]).await;
    wait_for_stdout(control.logs(), "hold/0#1", "holding").await;
    let high =
        pipeline::start(&engine, "high", vec![("wait", shell("true").provider("busy").priority(9))]).await;
    within(control.scheduler().watch_counts().wait_for(|c| c.queued == 1)).await.unwrap();

    // Lower priority, but for a provider with room: it runs while the other still waits.
    let low = pipeline::start(&engine, "low", vec![("run", shell("echo ran").provider("free"))]).await;
    completed(outcome(low).await);
    assert_eq!(control.scheduler().counts().queued, 1);
    assert_eq!(free.provisioned().len(), 1);

    tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    completed(outcome(holding).await);
    completed(outcome(high).await);
    assert_eq!(busy.provisioned().len(), 2);
}

/// After a restart, a step whose job had already stored its result takes that result before
/// anything else: no secret is resolved (the one the job used has been removed since) and no
/// worker is provisioned just to read a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_result_is_taken_before_any_secret_is_resolved_or_worker_provisioned() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let job = || {
        Job::pooled_script(["/bin/sh"], "echo released")
            .env("PATH", "/usr/bin:/bin")
            .secret("TOKEN", "deploy-token")
    };
    let first = {
        let control = ControlPlane::builder(&data).hub_config(fast_hub()).start().await.unwrap();
        let secrets = MemorySecrets::new().insert("deploy-token", "tok-1");
        let engine = pipeline::engine(control.dispatcher(Arc::new(secrets))).await;
        let handle = pipeline::start(&engine, "release", vec![("deploy", job())]).await;
        let first = completed(outcome(handle).await);
        engine.shutdown(Duration::from_secs(5)).await.unwrap();
        control.shutdown().await.unwrap();
        first
    };
    // The next life's journal has lost the step's end (a fresh in-memory store: the crash came
    // after the hub stored the result, before the completion was durable), the secret is gone,
    // and the only provider records what it is asked to do.
    let provider = Recorded::new(LocalProvider::in_process(dir.path().join("workers")));
    let control = ControlPlane::builder(&data)
        .hub_config(fast_hub())
        .provider(provider.clone(), ProviderPolicy::new())
        .start()
        .await
        .unwrap();
    let engine = pipeline::engine(control.dispatcher(Arc::new(MemorySecrets::new()))).await;
    let handle = pipeline::start(&engine, "release", vec![("deploy", job())]).await;
    let second = completed(outcome(handle).await);
    assert_eq!(second, first, "the stored result, as the first life got it");
    assert_eq!(provider.calls(), [], "no worker provisioned for a stored result");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    control.shutdown().await.unwrap();
}

/// Workers that run, silently, and never register, shared by the provider instances of
/// successive control planes as a real provider's machines are.
#[derive(Debug)]
struct Fleet {
    workers: tokio::sync::watch::Sender<BTreeMap<String, WorkerInfo>>,
}

impl Fleet {
    fn new() -> Arc<Self> {
        Arc::new(Self { workers: tokio::sync::watch::Sender::new(BTreeMap::new()) })
    }
}

/// One control plane's provider over a `Fleet`. Once `killed` (with its control plane), it does
/// nothing it is asked: a process killed outright makes no more calls.
#[derive(Debug)]
struct Silent {
    fleet: Arc<Fleet>,
    killed: std::sync::atomic::AtomicBool,
}

impl Silent {
    fn new(fleet: &Arc<Fleet>) -> Self {
        Self { fleet: fleet.clone(), killed: false.into() }
    }

    fn kill(&self) {
        self.killed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn alive(&self) -> bool {
        !self.killed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Provider for Silent {
    fn name(&self) -> &str {
        "silent"
    }
    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        let info = WorkerInfo::new(&spec.worker_id, "none", spec.all_labels(), WorkerState::Running);
        if self.alive() {
            self.fleet.workers.send_modify(|workers| {
                workers.insert(spec.worker_id.clone(), info.clone());
            });
        }
        Ok(info)
    }
    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        let running = self.fleet.workers.borrow().contains_key(worker_id);
        Ok(if running { WorkerState::Running } else { WorkerState::Gone })
    }
    async fn output(&self, _: &str) -> Result<String, ProviderError> {
        Ok(BROKEN_OUTPUT.to_owned())
    }
    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        if self.alive() {
            self.fleet.workers.send_modify(|workers| {
                workers.remove(worker_id);
            });
        }
        Ok(())
    }
    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        Ok(self.fleet.workers.borrow().values().cloned().collect())
    }
}

/// A control plane killed while a live saga's worker had not registered yet: the next control
/// plane does not adopt that worker, which cannot be running any job (jobs are assigned only
/// over mutual TLS, and it never got a certificate) and never will register (its token died
/// with the killed control plane). It is destroyed during the reap, so the saga's next attempt
/// gets a new worker at once, in the only slot, rather than waiting for the claim timeout. (A
/// worker that did register is still adopted: see `tests/local.rs`, where workers registered
/// with one control plane are adopted by the next over the same data directory.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_live_sagas_worker_that_never_registered_is_destroyed_not_adopted() {
    let fleet = Fleet::new();
    let mut workers = fleet.workers.subscribe();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("control");
    let store = Arc::new(hodei_core::MemoryStore::new());
    // Never reached: neither the registration deadline nor the claim timeout may decide.
    let policy = || ProviderPolicy::new().max_workers(1).registration_deadline(Duration::from_secs(3600));
    let engine_over = |control: &ControlPlane| {
        let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new()));
        Engine::builder().store(store.clone()).register(pipeline::pipeline(dispatcher)).start()
    };

    // The first life: the saga's step gets a worker, which has not registered when the control
    // plane is killed. The killed control plane's provider does nothing more.
    let first = Arc::new(Silent::new(&fleet));
    let control =
        ControlPlane::builder(&data).hub_config(fast_hub()).provider(first.clone(), policy()).start();
    let control = control.await.unwrap();
    let engine = engine_over(&control).await.unwrap();
    pipeline::start(&engine, "stalled", vec![("build", shell("echo built"))]).await;
    let orphan = within(workers.wait_for(|workers| workers.len() == 1)).await.unwrap().keys().next().cloned();
    let orphan = orphan.unwrap();
    first.kill();
    control.detach().await.unwrap();
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);
    assert_eq!(fleet.workers.borrow().keys().collect::<Vec<_>>(), [&orphan], "left running");

    // The next life, over the same data directory, with the saga still live.
    let provider = Recorded::new(Silent::new(&fleet));
    let control = ControlPlane::builder(&data).hub_config(fast_hub()).provider(provider.clone(), policy());
    let control = control.start().await.unwrap();
    let report = control.reap_orphans(store.as_ref()).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.destroyed, std::slice::from_ref(&orphan), "{report:?}");
    assert!(report.adopted.is_empty(), "{report:?}");
    assert_eq!(provider.calls(), [Call::Destroy(orphan.clone())]);
    assert_eq!(control.scheduler().counts(), SchedulerCounts::default());
    assert!(fleet.workers.borrow().is_empty());

    // The saga resumes, and its step is given a new worker straight away.
    let engine = engine_over(&control).await.unwrap();
    let fresh = within(workers.wait_for(|workers| workers.keys().any(|id| *id != orphan)))
        .await
        .unwrap()
        .keys()
        .next()
        .cloned()
        .unwrap();
    assert_eq!(provider.provisioned(), [fresh]);
    let counts = control.scheduler().counts();
    assert_eq!(
        (counts.provisioning, counts.queued, counts.idle, counts.workers()),
        (1, 0, 0, 1),
        "{counts:?}"
    );
    engine.shutdown(Duration::ZERO).await.unwrap();
    control.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_finishes_its_job_takes_no_other_and_is_destroyed() {
    let root = tempfile::tempdir().unwrap();
    let provider = Recorded::new(Setup::local(root.path()));
    // Reused for an hour: only the drain can end this worker during the test.
    let policy = ProviderPolicy::new().reuse_for(Duration::from_secs(3600));
    let setup = Setup::new(provider.clone(), policy, RetryPolicy::none()).await;
    let scheduler = setup.control.scheduler();
    assert!(matches!(scheduler.drain("no-such-worker"), Err(hodei_server::SchedulerError::UnknownWorker(_))));
    let gate = setup.path("gate");
    assert!(std::process::Command::new("mkfifo").arg(&gate).status().unwrap().success());

    let hold = shell(&format!("echo holding; read go < '{}'; echo done", gate.display()));
    let handle = setup.start("drain", vec![("hold", hold)]).await;
    wait_for_stdout(setup.control.logs(), "drain/0#1", "holding").await;
    let worker = provider.provisioned().remove(0);
    scheduler.drain(&worker).unwrap();
    assert_eq!(scheduler.draining().into_iter().collect::<Vec<_>>(), std::slice::from_ref(&worker));
    // The job it runs goes on to its end, on that worker.
    tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    completed(outcome(handle).await);
    setup.wait_counts(|c| c.workers() == 0).await;
    assert_eq!(provider.destroyed(), [worker]);
    // The next job gets a new worker; removing that one destroys it at once.
    completed(outcome(setup.start("drain-2", vec![("next", shell("echo next"))]).await).await);
    let provisioned = provider.provisioned();
    assert_eq!(provisioned.len(), 2, "{:?}", provider.calls());
    assert_eq!(setup.control.scheduler().counts().idle, 1);
    scheduler.remove(&provisioned[1]).unwrap();
    setup.wait_counts(|c| c.workers() == 0).await;
    assert_eq!(provider.destroyed(), provisioned);
}
