//! The conformance suite and the store's own failures, on a real PostgreSQL (skipped without
//! `HODEI_TEST_POSTGRES_URL`). The tests between processes and the engine's are in
//! `tests/postgres.rs`.

use std::time::Duration;

use super::test_database::TestDatabase;
use super::*;
use crate::event::{Event, SagaStatus, Timestamp};
use crate::store::{Leases, conformance};

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

/// Two engines' stores, each with its lease taken.
async fn engines(db: &TestDatabase) -> (PostgresStore, PostgresStore) {
    let (first, second) = (open(db).await, open(db).await);
    first.renew(0).unwrap();
    second.renew(0).unwrap();
    (first, second)
}

/// Creates the saga `id` in `store`, durably; returns its first event.
async fn created(store: &PostgresStore, id: &str) -> (SagaId, RecordedEvent) {
    let id = SagaId::new(id).unwrap();
    let (record, start) = started(&id);
    assert_eq!(store.create(&record, &start).unwrap(), None);
    store.durable().await.unwrap();
    (id, start)
}

/// `(seq, epoch)` of each event of the saga's journal, from the database.
async fn epochs(db: &TestDatabase, id: &SagaId) -> Vec<(i64, i64)> {
    let sql = "SELECT seq, epoch FROM hodei_events WHERE saga_id = $1 ORDER BY seq";
    db.admin().await.query(sql, &[&id.as_str()]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test]
async fn a_saga_owned_by_a_live_engine_is_refused_to_another() {
    let Some(db) = TestDatabase::new("owned elsewhere") else { return };
    let (first, second) = engines(&db).await;
    let id = SagaId::new("contended").unwrap();
    let (record, start) = started(&id);
    assert_eq!(first.create(&record, &start).unwrap(), None);
    first.durable().await.unwrap();
    assert_eq!(second.create(&record, &start).unwrap(), Some(record.clone()), "the second sees it created");

    let err = second.append(&id, &[step(1, 2)], None).unwrap_err();
    assert!(matches!(&err, Error::Fenced(fenced) if *fenced == id), "{err:?}");
    let renewal = second.renew(10).unwrap();
    assert!(renewal.claimed.is_empty() && renewal.lost.is_empty(), "{renewal:?}");
    assert_eq!(open(&db).await.history(&id).unwrap(), [start], "nothing of the refused write");
}

/// The zombie: an engine that stopped beating past its lease, whose saga another engine took
/// over, comes back and writes. Its write is refused, the database keeps the new owner's, and
/// along the journal the epochs never go back.
#[tokio::test]
async fn a_saga_taken_over_refuses_its_old_owners_late_write() {
    let Some(db) = TestDatabase::new("zombie") else { return };
    let (zombie, heir) = engines(&db).await;
    let (id, start) = created(&zombie, "taken").await;
    assert!(heir.renew(10).unwrap().claimed.is_empty(), "not while its owner's lease holds");

    db.lapse(zombie.engine_id()).await;
    let renewal = heir.renew(10).unwrap();
    assert_eq!(renewal.claimed.iter().map(|r| &r.id).collect::<Vec<_>>(), [&id]);
    heir.append(&id, &[step(1, 2)], None).unwrap();
    heir.durable().await.unwrap();

    // The zombie still believes it owns the saga, and where its journal ends: its own check
    // passes, and the database's epoch refuses it.
    zombie.append(&id, &[step(1, 1)], None).unwrap();
    let err = zombie.durable().await.unwrap_err();
    assert!(matches!(&err, Error::Fenced(fenced) if *fenced == id), "{err:?}");
    let expected = vec![start, step(1, 2)];
    assert_eq!(open(&db).await.history(&id).unwrap(), expected, "the heir's write alone");
    assert_eq!(zombie.history(&id).unwrap(), expected, "the zombie forgot its refused write");
    assert_eq!(epochs(&db, &id).await, [(0, 1), (1, 2)]);

    // Its next beat finds its lease lapsed and tells what it lost; its writes stay refused
    // while the heir lives.
    let renewal = zombie.renew(10).unwrap();
    assert_eq!(renewal.lost, std::slice::from_ref(&id));
    assert!(renewal.claimed.is_empty(), "{renewal:?}");
    let err = zombie.append(&id, &[step(2, 1)], None).unwrap_err();
    assert!(matches!(&err, Error::Fenced(_)), "{err:?}");
}

/// A batch with a write of a saga this engine lost and one of a saga it still owns: the second
/// commits, and only the first's writer is told it was fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_fails_alone_in_its_batch() {
    let Some(db) = TestDatabase::new("fenced alone") else { return };
    let (zombie, heir) = engines(&db).await;
    let (lost, kept) = (SagaId::new("a-lost").unwrap(), SagaId::new("b-kept").unwrap());
    for id in [&lost, &kept] {
        let (record, start) = started(id);
        zombie.create(&record, &start).unwrap();
    }
    zombie.durable().await.unwrap();
    db.lapse(zombie.engine_id()).await;
    // One claim: the first in id order.
    assert_eq!(heir.renew(1).unwrap().claimed.iter().map(|r| &r.id).collect::<Vec<_>>(), [&lost]);

    let write = |id: &SagaId| {
        zombie.append(id, &[step(1, 1)], None).unwrap();
        zombie.durable()
    };
    let (on_lost, on_kept) = (write(&lost), write(&kept));
    let (on_lost, on_kept) = tokio::join!(on_lost, on_kept);
    assert!(matches!(&on_lost, Err(Error::Fenced(id)) if *id == lost), "{on_lost:?}");
    on_kept.unwrap();
    assert_eq!(open(&db).await.history(&kept).unwrap().len(), 2);
    assert_eq!(open(&db).await.history(&lost).unwrap().len(), 1);
}

#[tokio::test]
async fn a_store_closed_hands_its_sagas_over_at_once() {
    let Some(db) = TestDatabase::new("handover") else { return };
    let (leaving, staying) = engines(&db).await;
    let (id, _) = created(&leaving, "handed").await;
    assert!(staying.renew(10).unwrap().claimed.is_empty());
    drop(leaving);
    let renewal = staying.renew(10).unwrap();
    assert_eq!(renewal.claimed.iter().map(|r| &r.id).collect::<Vec<_>>(), [&id], "no wait for the lease");
    staying.append(&id, &[step(1, 1)], None).unwrap();
    staying.durable().await.unwrap();
    assert_eq!(epochs(&db, &id).await, [(0, 1), (1, 2)]);
}

/// The database checks the sequence too: a journal moved on behind the store's back (here by
/// hand) refuses the store's append whole, and the store reads where it is before the next.
#[tokio::test]
async fn a_journal_moved_on_in_the_database_refuses_the_stale_append() {
    let Some(db) = TestDatabase::new("stale seq") else { return };
    let store = open(&db).await;
    let (id, start) = created(&store, "moved").await;
    let admin = db.admin().await;
    admin.execute("UPDATE hodei_sagas SET next_seq = 2 WHERE id = $1", &[&id.as_str()]).await.unwrap();

    store.append(&id, &[step(1, 1)], None).unwrap();
    let lost = store.durable().await.unwrap_err();
    assert!(
        matches!(postgres_error(&lost), Some(PostgresError::SequenceConflict { id: conflict, expected: 1 }) if *conflict == id),
        "{lost:?}"
    );
    assert_eq!(store.history(&id).unwrap(), [start], "the refused write is forgotten");
    let err = store.append(&id, &[step(1, 3)], None).unwrap_err();
    assert!(matches!(err, Error::SequenceConflict { expected: 2, .. }), "{err:?}");
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
    let each_once: Vec<(i32, i64)> = (1..=super::migrations::LATEST).map(|v| (v, 1)).collect();
    assert_eq!(applied, each_once);
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
        matches!(
            postgres_error(&err),
            Some(PostgresError::NewerSchema { found: 999, known: super::migrations::LATEST })
        ),
        "{err:?}"
    );
}

/// The backend that waits for a lock `holder` holds, once one does.
async fn blocked_by(admin: &tokio_postgres::Client, holder: i32) -> i32 {
    loop {
        let rows = admin
            .query("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", &[&holder])
            .await
            .unwrap();
        if let Some(row) = rows.first() {
            return row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
    let writer_pid = blocked_by(&watcher, holder_pid).await;
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

/// A claim that commits while its answer is lost (the connection dies on the way back): the
/// database says this engine owns the saga, the engine never heard of it, and no other engine
/// will take it while this one's lease holds. The next renewal finds it and hands it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_was_lost_is_found_at_the_next_renewal() {
    let Some(db) = TestDatabase::new("lost claim answer") else { return };
    let (gone, heir) = engines(&db).await;
    let heir = std::sync::Arc::new(heir);
    let (id, start) = created(&gone, "unheard").await;
    db.lapse(gone.engine_id()).await;
    drop(gone);

    // The heir's renewal blocks on its own lease row, held by the test; meanwhile the claim it
    // would make commits (the test makes it), and the renewal's connection is killed.
    let admin = db.admin().await;
    admin
        .execute(
            "UPDATE hodei_sagas SET owner = $1, epoch = epoch + 1 WHERE id = $2",
            &[&heir.engine_id(), &id.as_str()],
        )
        .await
        .unwrap();
    let holder = db.admin().await;
    let holder_pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM hodei_engines WHERE id = '{}' FOR UPDATE",
            heir.engine_id()
        ))
        .await
        .unwrap();
    let renewing = tokio::task::spawn_blocking({
        let heir = heir.clone();
        move || heir.renew(10)
    });
    let renewer = blocked_by(&admin, holder_pid).await;
    let killed: bool = admin.query_one("SELECT pg_terminate_backend($1)", &[&renewer]).await.unwrap().get(0);
    assert!(killed);
    holder.batch_execute("ROLLBACK").await.unwrap();
    let err = renewing.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Storage { .. }), "{err:?}");

    let renewal = heir.renew(10).unwrap();
    assert_eq!(renewal.claimed.iter().map(|r| &r.id).collect::<Vec<_>>(), [&id], "{renewal:?}");
    // Owned now at the epoch the database holds: its writes go through.
    heir.append(&id, &[step(1, 2)], None).unwrap();
    heir.durable().await.unwrap();
    assert_eq!(open(&db).await.history(&id).unwrap(), [start, step(1, 2)]);
    assert_eq!(epochs(&db, &id).await, [(0, 1), (1, 2)]);
    // Found once: the renewal after it has nothing more.
    assert!(heir.renew(10).unwrap().claimed.is_empty());
}

/// A process restarted under the id of one that only seemed dead (frozen, cut off) takes the
/// id over. The earlier one is superseded: its late write is refused, it cannot take a saga
/// back or create one, its renewals tell it that it lost everything, and its shutdown leaves
/// the new process's lease alone. Without this, the two took the sagas back and forth under
/// one name, or drove one saga at the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_restarted_under_the_same_id_supersedes_the_earlier_one() {
    let Some(db) = TestDatabase::new("superseded") else { return };
    let options = || db.options().engine_id("engine-b");
    let earlier = PostgresStore::connect_with(&db.url, options()).await.unwrap();
    earlier.renew(10).unwrap();
    let (id, start) = created(&earlier, "kept-by-name").await;

    let later = PostgresStore::connect_with(&db.url, options()).await.unwrap();
    let renewal = later.renew(10).unwrap();
    assert_eq!(renewal.claimed.iter().map(|r| &r.id).collect::<Vec<_>>(), [&id], "its own, at once");
    later.append(&id, &[step(1, 2)], None).unwrap();
    later.durable().await.unwrap();

    // The earlier one still believes it owns the saga: the epoch refuses its write.
    earlier.append(&id, &[step(1, 1)], None).unwrap();
    let err = earlier.durable().await.unwrap_err();
    assert!(matches!(&err, Error::Fenced(fenced) if *fenced == id), "{err:?}");
    // Having lost it, it may not take it back under the shared name.
    let err = earlier.append(&id, &[step(2, 1)], None).unwrap_err();
    assert!(matches!(&err, Error::Fenced(_)), "{err:?}");
    // Nor create a saga the later one would never hear of: refused by the database before
    // the earlier one's beat has told it anything.
    let fresh = SagaId::new("created-by-the-earlier").unwrap();
    let (record, first) = started(&fresh);
    assert_eq!(earlier.create(&record, &first).unwrap(), None, "queued");
    let err = earlier.durable().await.unwrap_err();
    assert!(matches!(&err, Error::Fenced(fenced) if *fenced == fresh), "{err:?}");
    let renewal = earlier.renew(10).unwrap();
    assert!(renewal.claimed.is_empty(), "{renewal:?}");
    let err = earlier.create(&record, &first).unwrap_err();
    assert!(matches!(&err, Error::Fenced(_)), "{err:?}");

    // The later one's lease holds, renewed by it alone; the earlier one's end does not end it.
    drop(earlier);
    assert!(later.renew(10).unwrap().lost.is_empty());
    let live: bool = db
        .admin()
        .await
        .query_one("SELECT lease_until > now() FROM hodei_engines WHERE id = 'engine-b'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(live, "the earlier process's shutdown released the later one's lease");
    let history = open(&db).await.history(&id).unwrap();
    assert_eq!(history, [start, step(1, 2)], "the later one's write alone");
    assert_eq!(epochs(&db, &id).await, [(0, 1), (1, 2)]);
    assert_eq!(open(&db).await.record(&fresh).unwrap(), None, "nothing created by the earlier one");
}
