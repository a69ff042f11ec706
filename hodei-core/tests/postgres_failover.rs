//! Failover between engine processes on one PostgreSQL: three engines, each a child process
//! running `examples/support/cluster.rs`, four runs each; one is killed with SIGKILL while its
//! runs are in their steps. The others take its runs over after its lease and finish them.
//! Skipped (with a line saying so) without `HODEI_TEST_POSTGRES_URL`.
#![cfg(all(feature = "postgres", unix))]

#[path = "../../examples/support/cluster.rs"]
mod cluster;
#[path = "../src/store/postgres/test_database.rs"]
mod test_database;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::Cluster;
use hodei_core::{EventStore, PostgresOptions, PostgresStore, SagaId, SagaStatus};
use test_database::TestDatabase;
use tokio::process::Command;

const RUNS: usize = 4;
const ENGINES: [&str; 3] = ["engine-a", "engine-b", "engine-c"];
const STEP_TIME: Duration = Duration::from_millis(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engines_runs_finish_on_the_others_after_its_lease() {
    if let Ok(name) = std::env::var("HODEI_CLUSTER_ENGINE") {
        return child(&name).await;
    }
    let Some(db) = TestDatabase::new("failover") else { return };
    let effects = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(ENGINES.map(|name| {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "a_killed_engines_runs_finish_on_the_others_after_its_lease", "--nocapture"])
            .env("HODEI_CLUSTER_ENGINE", name)
            .env("HODEI_CLUSTER_URL", &db.url)
            .env("HODEI_CLUSTER_SCHEMA", &db.schema)
            .env("HODEI_CLUSTER_EFFECTS", effects.path());
        command
    }));
    let failover = cluster.kill_and_finish(0, RUNS, ENGINES.len() * RUNS).await;
    println!(
        "failover: {:?} from SIGKILL to a dead engine's run stepping on another (lease {:?})",
        failover.after,
        cluster::LEASE
    );
    println!("engine-a's runs went on on engines {:?}", failover.heirs);
    assert_eq!(failover.heirs.len(), RUNS, "{failover:?}");

    // Every run completed; a step ran once, except the step a killed run was in, which ran
    // again on its heir (steps are at least once: its end was not journaled).
    let store = PostgresStore::connect_with(&db.url, db.options()).await.unwrap();
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for entry in std::fs::read_dir(effects.path()).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            let (run, step) = line.split_once(' ').unwrap();
            *counts.entry((run.to_owned(), step.to_owned())).or_default() += 1;
        }
    }
    let mut rerun = Vec::new();
    for engine in ENGINES {
        for k in 0..RUNS {
            let run = format!("{engine}-{k}");
            let record = store.record(&SagaId::new(run.clone()).unwrap()).unwrap().unwrap();
            assert_eq!(record.status, SagaStatus::Completed, "{run}");
            for step in cluster::STEPS {
                match counts.get(&(run.clone(), step.to_owned())).copied().unwrap_or(0) {
                    1 => {}
                    2 if engine == "engine-a" => rerun.push(format!("{run} {step}")),
                    n => panic!("{run} {step} ran {n} times"),
                }
            }
        }
    }
    println!("steps in flight at the kill, run again by the heir: {rerun:?}");
    assert!(rerun.len() <= RUNS, "at most the one step each killed run was in: {rerun:?}");

    // No run was ever driven by two engines at once: along each journal, epochs never go back.
    let admin = db.admin().await;
    let rows =
        admin.query("SELECT saga_id, seq, epoch FROM hodei_events ORDER BY saga_id, seq", &[]).await.unwrap();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for row in rows {
        let (run, epoch): (String, i64) = (row.get(0), row.get(2));
        let before = last.insert(run.clone(), epoch).unwrap_or(epoch);
        assert!(before <= epoch, "{run}: epoch {epoch} after {before}");
    }
    assert!(cluster.stop().await, "the live engines stopped cleanly");
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
