//! The conformance suite and the store's own failures, on a real PostgreSQL (skipped without
//! `HODEI_TEST_POSTGRES_URL`). The tests between processes and the engine's are in
//! `tests/postgres.rs`.

use super::test_database::TestDatabase;
use super::*;
use crate::store::conformance;

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
