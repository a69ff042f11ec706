//! A schema of its own for each test on the PostgreSQL at `HODEI_TEST_POSTGRES_URL`, dropped
//! when the test ends (also when it fails), so that tests run in parallel and leave nothing.
//! Shared by the store's unit tests and `tests/postgres*.rs` (by `#[path]`).

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

// The store module in unit tests, the test crate's root (which imports it) in `tests/`.
use super::PostgresOptions;

/// One test's schema.
#[derive(Debug)]
pub struct TestDatabase {
    pub url: String,
    pub schema: String,
}

impl TestDatabase {
    /// A fresh schema name on the test database, or `None` (with a line saying the test was
    /// skipped) when `HODEI_TEST_POSTGRES_URL` is not set. With `HODEI_REQUIRE_POSTGRES=1`, a
    /// missing URL fails the test instead.
    pub fn new(test: &str) -> Option<Self> {
        let Ok(url) = std::env::var("HODEI_TEST_POSTGRES_URL") else {
            if std::env::var("HODEI_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!("HODEI_REQUIRE_POSTGRES=1 but HODEI_TEST_POSTGRES_URL is not set (see .ci/postgres)");
            }
            println!("skipped: HODEI_TEST_POSTGRES_URL is not set");
            return None;
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let short: String = test.chars().filter(|c| c.is_ascii_alphanumeric()).take(30).collect();
        let schema = format!(
            "hodei_t_{}_{}_{}",
            short.to_ascii_lowercase(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Some(Self { url, schema })
    }

    pub fn options(&self) -> PostgresOptions {
        PostgresOptions::default().schema(self.schema.clone())
    }

    /// A connection of the test's own, in the schema (which it creates if missing).
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) =
            self.url.parse::<tokio_postgres::Config>().unwrap().connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {0}; SET search_path = {0}", self.schema))
            .await
            .unwrap();
        client
    }
}

impl TestDatabase {
    /// Ends the lease of engine `engine_id` now, as if it had stopped beating past it.
    pub async fn lapse(&self, engine_id: &str) {
        let sql = "UPDATE hodei_engines SET lease_until = now() - interval '1 second' WHERE id = $1";
        assert_eq!(
            self.admin().await.execute(sql, &[&engine_id]).await.unwrap(),
            1,
            "no lease of {engine_id}"
        );
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // A runtime of its own: the test's may be gone, or be the one dropping this.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let (client, connection) = url
                    .parse::<tokio_postgres::Config>()
                    .unwrap()
                    .connect(tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.unwrap();
            });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("could not drop the test schema {}", self.schema);
        }
    }
}
