//! An agent given the listeners of several control planes that share a PostgreSQL (and so one
//! PKI) registers with whichever answers, and when the control plane it is with is gone, opens
//! its next session with another one and runs that one's jobs. A real agent (in process) over
//! real mTLS; the control planes are two `ControlPlane`s on one database, as two engine
//! processes would run.

#[path = "support/on_message.rs"]
mod on_message;
mod support;
#[path = "../../hodei-core/src/store/postgres/test_database.rs"]
mod test_database;

use std::sync::Arc;
use std::time::Duration;

use hodei_agent::agent::{BackoffPolicy, Command, Settings};
use hodei_agent::protocol::v1::job_result::Outcome;
// `PostgresOptions`: `test_database` names it from this crate's root.
use hodei_core::{PostgresOptions, PostgresStore};
use hodei_server::ControlPlane;
use hodei_server::logstore::LogStream;
use on_message::OnMessage;
use support::{shell, within};
use test_database::TestDatabase;

const WORKER: &str = "w-failover";

async fn plane(db: &TestDatabase, dir: &std::path::Path) -> ControlPlane {
    let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
    ControlPlane::builder(dir).shared(store).start().await.unwrap()
}

/// What control plane `plane` stored of `job`'s `stream`.
async fn stored(plane: &ControlPlane, job: &str, stream: LogStream) -> Vec<u8> {
    let logs = plane.hub().logs().expect("a control plane keeps logs");
    logs.read(job, stream, 0, 1 << 20).await.unwrap().bytes
}

/// The agent, in process, given `planes`' listeners in that order and registering with
/// `token`; it stops when the sender is used or dropped.
fn start_agent(
    work: &std::path::Path,
    planes: &[&ControlPlane],
    token: String,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), hodei_agent::agent::AgentError>>) {
    let ca = work.join("ca.pem");
    std::fs::write(&ca, planes[0].hub().pki().ca_bundle_pem()).unwrap();
    let list = |address: fn(&ControlPlane) -> std::net::SocketAddr| {
        planes.iter().map(|plane| address(plane).to_string()).collect::<Vec<_>>().join(",")
    };
    let env = [
        ("HODEI_REGISTRATION_ADDR", list(ControlPlane::registration_addr)),
        ("HODEI_SESSION_ADDR", list(ControlPlane::session_addr)),
        ("HODEI_WORKER_ID", WORKER.to_owned()),
        ("HODEI_CA_BUNDLE", ca.display().to_string()),
        ("HODEI_WORK_DIR", work.join("agent").display().to_string()),
        ("HODEI_TOKEN", token),
    ];
    let lookup = |name: &str| env.iter().find(|(key, _)| *key == name).map(|(_, value)| value.clone());
    let Command::Run(mut settings) = Settings::parse([], lookup).unwrap() else { panic!("not run") };
    settings.backoff = BackoffPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(200) };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(hodei_agent::agent::run(settings, async move {
        let _ = stopped.await;
    }));
    (stop, agent)
}

async fn connected(plane: &ControlPlane) {
    let mut watch = plane.hub().watch_workers();
    within(watch.wait_for(|workers| workers.contains_key(WORKER))).await.expect("the hub is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_carries_on_with_another_control_plane_when_its_own_is_gone() {
    let Some(db) = TestDatabase::new("agent failover") else { return };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let first = plane(&db, dirs[0].path()).await;
    let second = plane(&db, dirs[1].path()).await;

    // The token comes from the second; the agent registers with the first, listed first.
    let work = tempfile::tempdir().unwrap();
    let token = second.hub().pki().issue_token(WORKER).unwrap().as_str().to_owned();
    let (stop, agent) = start_agent(work.path(), &[&first, &second], token);

    connected(&first).await;
    let result = within(first.hub().run_job(WORKER, shell("saga-1/one", "echo one"))).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");
    assert_eq!(stored(&first, "saga-1/one", LogStream::Stdout).await, b"one\n");

    // Its control plane goes away: the agent's next session is with the other one, whose
    // jobs it runs and whose log store keeps their output.
    first.shutdown().await.unwrap();
    connected(&second).await;
    let result = within(second.hub().run_job(WORKER, shell("saga-2/two", "echo two"))).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");
    assert_eq!(stored(&second, "saga-2/two", LogStream::Stdout).await, b"two\n");

    let _ = stop.send(());
    within(agent).await.unwrap().unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_planes_on_one_database_list_each_others_listeners_while_they_run() {
    use hodei_server::peers::{Listeners, PeerListeners, SharedListeners};
    let Some(db) = TestDatabase::new("listeners") else { return };
    let mut planes = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
        // An engine on the store, as in every engine process: its lease is what says the
        // control plane beside it is alive.
        let engine = hodei_core::Engine::builder().store(store.clone()).start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let plane = ControlPlane::builder(dir.path()).shared(store.clone()).start().await.unwrap();
        planes.push((dir, store, engine, plane));
    }
    let listeners = |n: usize| Listeners {
        registration: planes[n].3.registration_addr(),
        session: planes[n].3.session_addr(),
    };
    let peers_of = |n: usize| {
        let store = planes[n].1.clone();
        move || SharedListeners::new(store).peers()
    };
    let (first_peers, second_peers) = (peers_of(0), peers_of(1));
    assert_eq!(tokio::task::spawn_blocking(first_peers.clone()).await.unwrap(), [listeners(1)]);
    assert_eq!(tokio::task::spawn_blocking(second_peers).await.unwrap(), [listeners(0)]);

    // A control plane that stops is no longer handed out.
    let (_dir, _store, engine, plane) = planes.pop().unwrap();
    plane.shutdown().await.unwrap();
    assert_eq!(tokio::task::spawn_blocking(first_peers).await.unwrap(), []);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    let (_dir, _store, engine, plane) = planes.pop().unwrap();
    plane.shutdown().await.unwrap();
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A job that counts its runs in `runs`, says it started, and ends once the test creates
/// `gate`: `(runs, gate, script)` under `work`.
fn gated(work: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let (runs, gate) = (work.join("runs"), work.join("gate"));
    let script = format!(
        "echo run >> {runs}; echo before; while [ ! -e {gate} ]; do sleep 0.05; done; echo after",
        runs = runs.display(),
        gate = gate.display()
    );
    (runs, gate, script)
}

/// An engine beside `plane`, on its store, as in each engine process: its saga `pipeline` runs
/// one job, `gated`, on the agent.
async fn engine_beside(store: Arc<PostgresStore>, plane: &ControlPlane, script: &str) -> hodei_core::Engine {
    use hodei_core::{RetryPolicy, SagaContext, SagaDefinition};
    use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, MemorySecrets, RemoteJobs};
    let dispatcher =
        JobDispatcher::new(plane.hub().clone(), Arc::new(MemorySecrets::new())).retry(RetryPolicy::none());
    let job = Job::command(WORKER, ["/bin/sh", "-c", script]).env("PATH", "/usr/bin:/bin");
    let definition = SagaDefinition::new("pipeline", 1, move |ctx: SagaContext, (): ()| {
        let (dispatcher, job) = (dispatcher.clone(), job.clone());
        async move { ctx.run_job_on(&dispatcher, "gated", job).await.map(|o: JobOutcome| o.job_id) }
    });
    hodei_core::Engine::builder().store(store).register(definition).start().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_its_engine_stops_runs_once_and_its_saga_finishes_on_another() {
    use hodei_core::{Outcome as SagaOutcome, SagaId, SagaRun};
    use tracing_subscriber::layer::SubscriberExt as _;
    let Some(db) = TestDatabase::new("held job") else { return };
    let waiting = Arc::new(tokio::sync::Notify::new());
    let seen = waiting.clone();
    let layer =
        OnMessage { message: "waiting for the run a worker already holds", then: move || seen.notify_one() };
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (runs, gate, script) = gated(work.path());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let stores = [(); 2].map(|()| db.url.clone());
    let mut planes = Vec::new();
    for (url, dir) in stores.iter().zip(&dirs) {
        let store = Arc::new(PostgresStore::connect_with(url, db.options()).await.unwrap());
        let plane = ControlPlane::builder(dir.path()).shared(store.clone()).start().await.unwrap();
        planes.push((store, plane));
    }
    let (second_store, second_plane) = planes.pop().unwrap();
    let (first_store, first_plane) = planes.pop().unwrap();
    let first_engine = engine_beside(first_store, &first_plane, &script).await;

    let token = first_plane.hub().pki().issue_token(WORKER).unwrap().as_str().to_owned();
    let (stop, agent) = start_agent(work.path(), &[&first_plane, &second_plane], token);
    connected(&first_plane).await;

    let id = SagaId::new("saga-held").unwrap();
    first_engine.start(SagaRun::new("pipeline", "saga-held", &()).unwrap()).await.unwrap();
    let job = "saga-held/0#1";
    // The job runs: the other control plane reads its output from the shared store.
    let mut follower = second_plane.logs().follow(job, LogStream::Stdout, 0).await.unwrap();
    let first_chunk = within(follower.next()).await.expect("the log is open").unwrap();
    assert_eq!(first_chunk.bytes, b"before\n");

    // Its engine and control plane stop while it runs; the agent's next session is with the
    // other control plane, and an engine beside that one takes the saga over.
    first_engine.shutdown(Duration::from_secs(5)).await.unwrap();
    first_plane.shutdown().await.unwrap();
    connected(&second_plane).await;
    let second_engine = engine_beside(second_store, &second_plane, &script).await;
    let outcome = tokio::spawn({
        let handle = second_engine.handle(&id).unwrap();
        async move { handle.outcome::<String>().await }
    });
    // The step, run again there, waits for the job the worker holds rather than starting it.
    within(waiting.notified()).await;
    std::fs::write(&gate, b"").unwrap();

    let outcome = within(outcome).await.unwrap().unwrap();
    assert!(matches!(&outcome, SagaOutcome::Completed(job_id) if job_id == job), "{outcome:?}");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "the job ran once");
    assert_eq!(stored(&second_plane, job, LogStream::Stdout).await, b"before\nafter\n");

    let _ = stop.send(());
    within(agent).await.unwrap().unwrap();
    second_engine.shutdown(Duration::from_secs(5)).await.unwrap();
    second_plane.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_is_waited_for_until_its_result_or_until_its_worker_stays_away() {
    use hodei_agent::protocol::v1;
    use hodei_server::hub::{Hub, HubConfig, HubError};
    use hodei_server::logstore::{LogStore, LogStoreConfig};
    use hodei_server::pki::{HubPki, PkiConfig};
    use prost::Message as _;
    let Some(db) = TestDatabase::new("held wait") else { return };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut sides = Vec::new();
    for dir in &dirs {
        let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
        let engine = hodei_core::Engine::builder().store(store.clone()).start().await.unwrap();
        let logs = Arc::new(
            LogStore::open_shared(dir.path(), LogStoreConfig::default(), store.clone()).await.unwrap(),
        );
        let pki = Arc::new(HubPki::open(dir.path(), PkiConfig::default()).unwrap());
        let hub = Hub::new(pki, HubConfig::default().worker_wait(Duration::from_millis(300)))
            .with_logs(logs.clone());
        sides.push((store, engine, logs, hub));
    }
    let (first_logs, hub) = (&sides[0].2, &sides[1].3);

    // Held by a worker on the first control plane's session, then finished there.
    first_logs.attach("s/0#1", "w", 1).await.unwrap();
    let holder = hub.holder("s/0#2", &["s/0#1".to_owned()]).await.unwrap().expect("held");
    assert_eq!((holder.job.as_str(), holder.worker.as_str()), ("s/0#1", "w"));
    let waiting = tokio::spawn({
        let (hub, holder) = (hub.clone(), holder.clone());
        async move { hub.wait_held(&holder).await }
    });
    let result = v1::JobResult {
        job_id: "s/0#1".into(),
        outcome: Some(v1::job_result::Outcome::ExitCode(0)),
        ..v1::JobResult::default()
    };
    first_logs.finish("s/0#1", &result.encode_to_vec()).await.unwrap();
    assert_eq!(within(waiting).await.unwrap().unwrap(), result);

    // Held on a control plane that then dies: once its worker has stayed away for the worker
    // wait, the step is told its worker is lost, and its next attempt may run the job anew.
    first_logs.attach("s/1#1", "w", 1).await.unwrap();
    let holder = hub.holder("s/1#1", &[]).await.unwrap().expect("held");
    db.lapse(sides[0].0.engine_id()).await;
    match within(hub.wait_held(&holder)).await {
        Err(HubError::WorkerLost { worker_id, job_id }) => {
            assert_eq!((worker_id.as_str(), job_id.as_str()), ("w", "s/1#1"))
        }
        other => panic!("expected the worker to be lost, got {other:?}"),
    }
    assert_eq!(hub.holder("s/1#1", &[]).await.unwrap(), None);
    for (_store, engine, _logs, _hub) in sides {
        engine.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

/// A cancel asked on a control plane that has no session with the job's worker reaches the
/// job through the one that has: the step of a saga taken over by another engine can cancel
/// the job it waits for. The job ends cancelled, its result stored for both to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_asked_on_another_control_plane_reaches_the_job() {
    let Some(db) = TestDatabase::new("cancel across") else { return };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let with_session = plane(&db, dirs[0].path()).await;
    let without = plane(&db, dirs[1].path()).await;
    let work = tempfile::tempdir().unwrap();
    let token = with_session.hub().pki().issue_token(WORKER).unwrap().as_str().to_owned();
    let (stop, agent) = start_agent(work.path(), &[&with_session], token);
    connected(&with_session).await;

    let job = "saga-c/0#1";
    let running = tokio::spawn({
        let hub = with_session.hub().clone();
        async move { hub.run_job(WORKER, shell(job, "echo started; sleep 60")).await }
    });
    let mut watch = with_session.hub().watch_workers();
    within(async {
        while !watch.running_jobs().get(WORKER).is_some_and(|jobs| jobs.contains(job)) {
            watch.changed().await.expect("the hub is gone");
        }
    })
    .await;
    assert!(!without.hub().connected_workers().contains_key(WORKER), "no session there");

    without.hub().cancel_job(WORKER, job, "cancelled by an operator elsewhere").await.unwrap();
    let result = within(running).await.unwrap().unwrap();
    assert_eq!(
        result.outcome,
        Some(Outcome::Cancelled("cancelled by an operator elsewhere".to_owned())),
        "{result:?}"
    );
    assert_eq!(without.hub().stored_result(job).await.unwrap(), Some(result));

    // With no session anywhere and no job to cancel, the cancel is refused, typed.
    let err = without.hub().cancel_job("w-nowhere", "saga-d/0#1", "nobody").await.unwrap_err();
    assert!(matches!(err, hodei_server::hub::HubError::UnknownWorker { .. }), "{err:?}");

    let _ = stop.send(());
    within(agent).await.unwrap().unwrap();
    with_session.shutdown().await.unwrap();
    without.shutdown().await.unwrap();
}

/// An engine whose lease lapses while its saga's job runs (it only seemed dead) loses the saga
/// to another engine, and lets the job go on for it: the job is neither cancelled nor its
/// worker given up. The new owner's step waits for it, and it runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_its_saga_is_taken_over_goes_on_for_the_new_owner() {
    use hodei_core::{Outcome as SagaOutcome, SagaId, SagaRun};
    let Some(db) = TestDatabase::new("taken job") else { return };
    let work = tempfile::tempdir().unwrap();
    let (runs, gate, script) = gated(work.path());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut sides = Vec::new();
    for dir in &dirs {
        // Beats five times a second: the takeover and the letting go come at once.
        let options = db.options().lease(Duration::from_secs(1));
        let store = Arc::new(PostgresStore::connect_with(&db.url, options).await.unwrap());
        let plane = ControlPlane::builder(dir.path()).shared(store.clone()).start().await.unwrap();
        let engine = engine_beside(store.clone(), &plane, &script).await;
        sides.push((store, plane, engine));
    }
    let token = sides[0].1.hub().pki().issue_token(WORKER).unwrap().as_str().to_owned();
    let (stop, agent) = start_agent(work.path(), &[&sides[0].1, &sides[1].1], token);
    connected(&sides[0].1).await;

    let id = SagaId::new("saga-taken").unwrap();
    sides[0].2.start(SagaRun::new("pipeline", "saga-taken", &()).unwrap()).await.unwrap();
    let job = "saga-taken/0#1";
    let mut follower = sides[1].1.logs().follow(job, LogStream::Stdout, 0).await.unwrap();
    assert_eq!(within(follower.next()).await.expect("the log is open").unwrap().bytes, b"before\n");

    // The first engine seems dead: the second takes the saga, and the first, at its next beat,
    // lets go of it while the job runs on.
    // Its lease is ended again until the second engine has claimed the saga: the first may
    // beat (and renew) in between.
    within(async {
        while sides[1].2.census().runs.is_empty() {
            db.lapse(sides[0].0.engine_id()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while !sides[0].2.census().runs.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    std::fs::write(&gate, b"").unwrap();

    let outcome = within(sides[1].2.handle(&id).unwrap().outcome::<String>()).await.unwrap();
    assert!(matches!(&outcome, SagaOutcome::Completed(job_id) if job_id == job), "{outcome:?}");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "the job ran once");
    assert_eq!(stored(&sides[1].1, job, LogStream::Stdout).await, b"before\nafter\n");

    let _ = stop.send(());
    within(agent).await.unwrap().unwrap();
    for (_, plane, engine) in sides {
        engine.shutdown(Duration::from_secs(5)).await.unwrap();
        plane.shutdown().await.unwrap();
    }
}
