//! The conformance suite and the store's own failures, on a real PostgreSQL (skipped without
//! `HODEI_TEST_POSTGRES_URL`). The tests between processes and the engine's are in
//! `tests/postgres.rs`.

use std::time::Duration;

use super::test_database::TestDatabase;
use super::*;
use crate::event::{Event, SagaStatus, Timestamp};
use crate::store::conformance;

async fn open(db: &TestDatabase) -> PostgresStore {
    PostgresStore::connect_with(&db.url, db.options()).await.unwrap()
}

#[tokio::test]
async fn postgres_store_conforms_on_a_current_thread_runtime() {
    let Some(db) = TestDatabase::new("conforms current") else { return };
    let store = PostgresStore::connect_with(&db.url, db.options()).await.unwrap();
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms_on_a_multi_thread_runtime() {
    let Some(db) = TestDatabase::new("conforms multi") else { return };
    let store = PostgresStore::connect_with(&db.url, db.options()).await.unwrap();
    conformance::run_all(&store).await;
}

/// What the conformance suite reads through the overlay, read back from the database alone.
#[tokio::test]
async fn committed_writes_read_back_from_a_second_store() {
    let Some(db) = TestDatabase::new("read back") else { return };
    let store = PostgresStore::connect_with(&db.url, db.options()).await.unwrap();
    conformance::run_all(&store).await;
    store.durable().await.unwrap();
    let other = PostgresStore::connect_with(&db.url, db.options()).await.unwrap();
    let sort = |mut records: Vec<SagaRecord>| {
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records
    };
    assert_eq!(sort(other.records().unwrap()), sort(store.records().unwrap()));
    assert_eq!(sort(other.in_flight().unwrap()), sort(store.in_flight().unwrap()));
    for record in store.records().unwrap() {
        assert_eq!(other.history(&record.id).unwrap(), store.history(&record.id).unwrap(), "{}", record.id);
    }
    assert_eq!(other.records_after(None, usize::MAX, &|_| true).unwrap(), sort(store.records().unwrap()));
}

#[tokio::test]
async fn a_schema_name_that_is_not_a_plain_identifier_is_refused() {
    let error = PostgresStore::connect_with(
        "postgres://nobody@127.0.0.1:1/none",
        PostgresOptions::default().schema("x; DROP TABLE y"),
    )
    .await
    .unwrap_err();
    let Error::Storage { source, .. } = &error else { panic!("{error:?}") };
    let source = std::error::Error::source(source).and_then(|s| s.downcast_ref::<PostgresError>());
    assert!(matches!(source, Some(PostgresError::InvalidSchema(_))), "{error:?}");
}

#[tokio::test]
async fn a_malformed_url_is_refused() {
    let error = PostgresStore::connect("postgres://127.0.0.1:notaport/db").await.unwrap_err();
    let Error::Storage { source, .. } = &error else { panic!("{error:?}") };
    let source = std::error::Error::source(source).and_then(|s| s.downcast_ref::<PostgresError>());
    assert!(matches!(source, Some(PostgresError::InvalidUrl(_))), "{error:?}");
}

/// The test server offers no TLS: a connection that requires it fails, typed, rather than
/// falling back to plain text.
#[tokio::test]
async fn sslmode_require_refuses_a_server_without_tls() {
    let Some(db) = TestDatabase::new("tls required") else { return };
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", db.url);
    let error = PostgresStore::connect_with(&url, db.options()).await.unwrap_err();
    assert!(matches!(error, Error::Storage { operation: "connecting to PostgreSQL", .. }), "{error:?}");
}

fn started(id: &SagaId) -> (SagaRecord, RecordedEvent) {
    let record = SagaRecord::new(id.clone(), "d".into(), 1, Timestamp(1));
    let event = Event::SagaStarted { definition: "d".into(), version: 1, input: vec![1] };
    (record, RecordedEvent { seq: 0, at: Timestamp(1), event })
}

fn step(seq: u64, output: u8) -> RecordedEvent {
    RecordedEvent {
        seq,
        at: Timestamp(10 + seq),
        event: Event::StepCompleted { step: seq as u32, output: vec![output] },
    }
}

/// The [`PostgresError`] behind a storage error, if that is what it is.
fn postgres_error(error: &Error) -> Option<&PostgresError> {
    let Error::Storage { source, .. } = error else { return None };
    std::error::Error::source(source)?.downcast_ref::<PostgresError>()
}

#[tokio::test]
async fn two_stores_appending_one_saga_one_wins_and_the_other_changes_nothing() {
    let Some(db) = TestDatabase::new("two writers") else { return };
    let (first, second) = (open(&db).await, open(&db).await);
    let id = SagaId::new("contended").unwrap();
    let (record, start) = started(&id);
    assert_eq!(first.create(&record, &start).unwrap(), None);
    first.durable().await.unwrap();
    assert_eq!(second.create(&record, &start).unwrap(), Some(record.clone()), "the second sees it created");

    // The first store noted the journal's end when it created it; the second appends there
    // and commits, so the first one's note is stale: its append passes its own check, and the
    // database refuses it.
    second.append(&id, &[step(1, 2)], None).unwrap();
    second.durable().await.unwrap();
    first.append(&id, &[step(1, 1)], None).unwrap();
    let lost = first.durable().await.unwrap_err();
    let (winner, loser) = (&second, &first);
    assert!(
        matches!(postgres_error(&lost), Some(PostgresError::SequenceConflict { id: conflict, expected: 1 }) if *conflict == id),
        "{lost:?}"
    );
    let expected = vec![start.clone(), step(1, 2)];
    assert_eq!(
        open(&db).await.history(&id).unwrap(),
        expected,
        "the database holds the winner's write alone"
    );
    assert_eq!(winner.history(&id).unwrap(), expected);
    assert_eq!(loser.history(&id).unwrap(), expected, "the loser forgot its refused write");

    // The loser's next append reads where the journal is: the same sequence is refused at once,
    // the next one goes through.
    let err = loser.append(&id, &[step(1, 3)], None).unwrap_err();
    assert!(matches!(err, Error::SequenceConflict { expected: 2, .. }), "{err:?}");
    loser.append(&id, &[step(2, 3)], None).unwrap();
    loser.durable().await.unwrap();
    assert_eq!(winner.history(&id).unwrap().len(), 3);
}

#[tokio::test]
async fn a_journal_reopened_reads_back_identical() {
    let Some(db) = TestDatabase::new("reopened") else { return };
    let store = open(&db).await;
    let mut written = Vec::new();
    for n in 0..20u8 {
        let id = SagaId::new(format!("saga-{n}")).unwrap();
        let (mut record, start) = started(&id);
        store.create(&record, &start).unwrap();
        for seq in 1..=u64::from(n % 5) {
            store.append(&id, &[step(seq, n)], None).unwrap();
        }
        if n % 3 == 0 {
            record.status = SagaStatus::Completed;
            let end = RecordedEvent {
                seq: 1 + u64::from(n % 5),
                at: Timestamp(99),
                event: Event::SagaCompleted { output: vec![n] },
            };
            store.append(&id, &[end], Some(&record)).unwrap();
        }
        written.push(id);
    }
    // The last writes are not waited for: a clean close commits them.
    let before: Vec<_> =
        written.iter().map(|id| (store.history(id).unwrap(), store.record(id).unwrap())).collect();
    let mut in_flight_before: Vec<_> = store.in_flight().unwrap().into_iter().map(|r| r.id).collect();
    drop(store);

    let store = open(&db).await;
    let after: Vec<_> =
        written.iter().map(|id| (store.history(id).unwrap(), store.record(id).unwrap())).collect();
    assert_eq!(after, before);
    let mut in_flight_after: Vec<_> = store.in_flight().unwrap().into_iter().map(|r| r.id).collect();
    in_flight_before.sort();
    in_flight_after.sort();
    assert_eq!(in_flight_after, in_flight_before);
    assert_eq!(in_flight_after.len(), 13, "20 sagas, 7 of them completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_starting_at_once_apply_the_migrations_once() {
    let Some(db) = TestDatabase::new("migrations") else { return };
    let mut starting = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (url, options) = (db.url.clone(), db.options());
        starting.spawn(async move { PostgresStore::connect_with(&url, options).await });
    }
    let stores: Vec<PostgresStore> = starting.join_all().await.into_iter().map(Result::unwrap).collect();
    let admin = db.admin().await;
    let applied: Vec<(i32, i64)> = admin
        .query("SELECT version, count(*) FROM hodei_migrations GROUP BY version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(applied, [(1, 1)]);
    // And every store works on the one schema.
    for (n, store) in stores.iter().enumerate() {
        let (record, start) = started(&SagaId::new(format!("s{n}")).unwrap());
        assert_eq!(store.create(&record, &start).unwrap(), None);
        store.durable().await.unwrap();
    }
    assert_eq!(stores[0].records().unwrap().len(), stores.len());
}

#[tokio::test]
async fn a_schema_from_a_newer_build_is_refused() {
    let Some(db) = TestDatabase::new("newer schema") else { return };
    drop(open(&db).await);
    db.admin()
        .await
        .execute("INSERT INTO hodei_migrations (version, name) VALUES (999, 'future')", &[])
        .await
        .unwrap();
    let err = PostgresStore::connect_with(&db.url, db.options()).await.unwrap_err();
    assert!(
        matches!(postgres_error(&err), Some(PostgresError::NewerSchema { found: 999, known: 1 })),
        "{err:?}"
    );
}

/// The writer's connection killed while its batch waits on a row lock: every waiter fails with
/// a typed error, nothing of the batch (nor of what was queued behind it) is visible, and the
/// next batch goes through on a new connection.
#[tokio::test]
async fn a_connection_killed_mid_batch_fails_the_batch_whole_and_the_store_recovers() {
    let Some(db) = TestDatabase::new("killed") else { return };
    let store = open(&db).await;
    let ids: Vec<SagaId> = ["blocked", "queued-1", "queued-2"].map(|n| SagaId::new(n).unwrap()).into();
    for id in &ids {
        let (record, start) = started(id);
        store.create(&record, &start).unwrap();
    }
    store.durable().await.unwrap();

    // A transaction of the test's holds the first saga's row, so the batch that appends to it
    // stops there, mid-transaction.
    let holder = db.admin().await;
    let holder_pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    holder.batch_execute("BEGIN; SELECT 1 FROM hodei_sagas WHERE id = 'blocked' FOR UPDATE").await.unwrap();
    for id in &ids {
        store.append(id, &[step(1, 1)], None).unwrap();
    }
    let durable = store.durable();

    let watcher = db.admin().await;
    let writer_pid: i32 = loop {
        let rows = watcher
            .query("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", &[&holder_pid])
            .await
            .unwrap();
        if let Some(row) = rows.first() {
            break row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let killed: bool =
        watcher.query_one("SELECT pg_terminate_backend($1)", &[&writer_pid]).await.unwrap().get(0);
    assert!(killed);
    holder.batch_execute("ROLLBACK").await.unwrap();

    let err = durable.await.unwrap_err();
    assert!(matches!(err, Error::Storage { .. }), "{err:?}");
    let fresh = open(&db).await;
    for id in &ids {
        assert_eq!(store.history(id).unwrap(), [started(id).1], "{id}: this store");
        assert_eq!(fresh.history(id).unwrap(), [started(id).1], "{id}: the database");
    }

    for id in &ids {
        store.append(id, &[step(1, 2)], None).unwrap();
    }
    store.durable().await.unwrap();
    for id in &ids {
        assert_eq!(fresh.history(id).unwrap(), [started(id).1, step(1, 2)], "{id}");
    }
}
