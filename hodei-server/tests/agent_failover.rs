//! An agent given the listeners of several control planes that share a PostgreSQL (and so one
//! PKI) registers with whichever answers, and when the control plane it is with is gone, opens
//! its next session with another one and runs that one's jobs. A real agent (in process) over
//! real mTLS; the control planes are two `ControlPlane`s on one database, as two engine
//! processes would run.

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
use support::{shell, within};
use test_database::TestDatabase;

const WORKER: &str = "w-failover";

async fn plane(db: &TestDatabase, dir: &std::path::Path) -> ControlPlane {
    let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
    ControlPlane::builder(dir).shared_pki(store).start().await.unwrap()
}

/// What control plane `plane` stored of `job`'s `stream`.
async fn stored(plane: &ControlPlane, job: &str, stream: LogStream) -> Vec<u8> {
    let logs = plane.hub().logs().expect("a control plane keeps logs");
    logs.read(job, stream, 0, 1 << 20).await.unwrap().bytes
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
    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, first.hub().pki().ca_bundle_pem()).unwrap();
    let env = [
        ("HODEI_REGISTRATION_ADDR", format!("{},{}", first.registration_addr(), second.registration_addr())),
        ("HODEI_SESSION_ADDR", format!("{},{}", first.session_addr(), second.session_addr())),
        ("HODEI_WORKER_ID", WORKER.to_owned()),
        ("HODEI_CA_BUNDLE", ca.display().to_string()),
        ("HODEI_WORK_DIR", work.path().join("agent").display().to_string()),
        ("HODEI_TOKEN", second.hub().pki().issue_token(WORKER).unwrap().as_str().to_owned()),
    ];
    let lookup = |name: &str| env.iter().find(|(key, _)| *key == name).map(|(_, value)| value.clone());
    let Command::Run(mut settings) = Settings::parse([], lookup).unwrap() else { panic!("not run") };
    settings.backoff = BackoffPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(200) };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(hodei_agent::agent::run(settings, async move {
        let _ = stopped.await;
    }));

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
        let plane = ControlPlane::builder(dir.path()).shared_pki(store.clone()).start().await.unwrap();
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
