//! What must hold of a cluster's runs after any faults: shared by `postgres_failover.rs` and
//! `postgres_chaos.rs` (by `#[path]`, beside `examples/support/cluster.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use hodei_core::{EventStore, PostgresStore, SagaId, SagaStatus};

use super::cluster;
use super::test_database::TestDatabase;

/// Every run in `runs` completed, with each step's end journaled once; a step's side effect
/// (the lines in the files under `effects`) happened once, or again when an interruption (a
/// kill, a takeover) came before its end was journaled; and along every journal the epochs
/// never go back: no run was driven by two engines at once. Returns the steps run again.
pub async fn check_runs(db: &TestDatabase, effects: &Path, runs: &[String]) -> Vec<String> {
    let store = PostgresStore::connect_with(&db.url, db.options()).await.unwrap();
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for entry in std::fs::read_dir(effects).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            let (run, step) = line.split_once(' ').unwrap();
            *counts.entry((run.to_owned(), step.to_owned())).or_default() += 1;
        }
    }
    let mut again = Vec::new();
    for run in runs {
        let id = SagaId::new(run.as_str()).unwrap();
        let record = store.record(&id).unwrap().unwrap_or_else(|| panic!("{id} is not in the store"));
        let history = store.history(&id).unwrap();
        assert_eq!(record.status, SagaStatus::Completed, "{id}: {history:#?}");
        let ends =
            history.iter().filter(|r| matches!(r.event, hodei_core::Event::StepCompleted { .. })).count();
        assert_eq!(ends, cluster::STEPS.len(), "{id}: each step's end journaled once");
        for step in cluster::STEPS {
            match counts.get(&(id.to_string(), step.to_owned())).copied().unwrap_or(0) {
                0 => panic!("{id} {step} never ran"),
                1 => {}
                n => again.push(format!("{id} {step} x{n}")),
            }
        }
    }
    let admin = db.admin().await;
    let rows =
        admin.query("SELECT saga_id, seq, epoch FROM hodei_events ORDER BY saga_id, seq", &[]).await.unwrap();
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for row in rows {
        let (run, epoch): (String, i64) = (row.get(0), row.get(2));
        let before = last.insert(run.clone(), epoch).unwrap_or(epoch);
        assert!(before <= epoch, "{run}: epoch {epoch} after {before}");
    }
    again
}
