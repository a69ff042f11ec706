//! Failover between engine processes on one PostgreSQL: three engines, each a child process
//! running `examples/support/cluster.rs`, four runs each; one is killed with SIGKILL while its
//! runs are in their steps. The others take its runs over after its lease and finish them.
//! Skipped (with a line saying so) without `HODEI_TEST_POSTGRES_URL`.
#![cfg(all(feature = "postgres", unix))]

#[path = "cluster/checks.rs"]
mod checks;
#[path = "../../examples/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../src/store/postgres/test_database.rs"]
mod test_database;

use std::path::Path;
use std::time::Duration;

use cluster::Cluster;
use hodei_core::PostgresOptions;
use test_database::TestDatabase;
use tokio::process::Command;

const RUNS: usize = 4;
const ENGINES: [&str; 3] = ["engine-a", "engine-b", "engine-c"];
/// Long enough that every engine's runs are still in their steps when one is killed or
/// frozen (four steps: over a second a run).
const STEP_TIME: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engines_runs_finish_on_the_others_after_its_lease() {
    const TEST: &str = "a_killed_engines_runs_finish_on_the_others_after_its_lease";
    if let Ok(name) = std::env::var("HODEI_CLUSTER_ENGINE") {
        return child(&name).await;
    }
    let Some(db) = TestDatabase::new("failover") else { return };
    let effects = tempfile::tempdir().unwrap();
    let mut cluster = start(TEST, &db, effects.path());
    let failover = cluster.kill_and_finish(0, RUNS, ENGINES.len() * RUNS).await;
    println!(
        "failover: {:?} from SIGKILL to a dead engine's run stepping on another (lease {:?})",
        failover.after,
        cluster::LEASE
    );
    println!("engine-a's runs went on on engines {:?}", failover.heirs);
    assert_eq!(failover.heirs.len(), RUNS, "{failover:?}");
    check_runs(&db, effects.path()).await;
    assert!(cluster.stop().await, "the live engines stopped cleanly");
}

/// The zombie, between processes: engine-b is stopped with SIGSTOP past its lease, another
/// engine takes its runs over, and once it is resumed its steps return and it goes on to write
/// their ends; those writes are refused, so every step's end is journaled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_engines_late_writes_are_refused_after_its_runs_were_taken_over() {
    const TEST: &str = "a_frozen_engines_late_writes_are_refused_after_its_runs_were_taken_over";
    if let Ok(name) = std::env::var("HODEI_CLUSTER_ENGINE") {
        return child(&name).await;
    }
    let Some(db) = TestDatabase::new("zombie processes") else { return };
    let effects = tempfile::tempdir().unwrap();
    let mut cluster = start(TEST, &db, effects.path());
    let zombie = cluster.freeze_until_taken_over(1, RUNS, ENGINES.len() * RUNS).await;
    println!(
        "engine-b's runs taken over: {:?}; its steps that returned late: {:?}",
        zombie.taken, zombie.returned_late
    );
    assert!(!zombie.returned_late.is_empty(), "the zombie went on after its resume: {zombie:?}");
    check_runs(&db, effects.path()).await;
    assert!(cluster.stop().await, "the engines stopped cleanly");
}

fn start(test: &str, db: &TestDatabase, effects: &Path) -> Cluster {
    Cluster::start(ENGINES.map(|name| {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", test, "--nocapture"])
            .env("HODEI_CLUSTER_ENGINE", name)
            .env("HODEI_CLUSTER_URL", &db.url)
            .env("HODEI_CLUSTER_SCHEMA", &db.schema)
            .env("HODEI_CLUSTER_EFFECTS", effects);
        command
    }))
}

/// The runs and effects after the faults: see `cluster/checks.rs`.
async fn check_runs(db: &TestDatabase, effects: &Path) {
    let runs: Vec<String> =
        ENGINES.iter().flat_map(|engine| (0..RUNS).map(move |k| format!("{engine}-{k}"))).collect();
    let again = checks::check_runs(db, effects, &runs).await;
    println!("steps in flight at an interruption, run again: {again:?}");
}

/// The child's side: one engine process.
async fn child(name: &str) {
    let var = |key: &str| std::env::var(key).unwrap();
    let effects = std::path::PathBuf::from(var("HODEI_CLUSTER_EFFECTS")).join(format!("{name}.log"));
    cluster::engine_process(
        &var("HODEI_CLUSTER_URL"),
        &var("HODEI_CLUSTER_SCHEMA"),
        name,
        RUNS,
        &effects,
        STEP_TIME,
    )
    .await
    .unwrap();
}
