//! The schema, versioned: each migration runs once, in order, recorded in `hodei_migrations`.
//!
//! Every store applies what is missing when it connects, in one transaction under a
//! transaction-scoped advisory lock: processes starting at once queue on the lock, and each
//! finds what the one before it applied. A failed migration rolls back whole.

use tokio_postgres::Client;

use super::PostgresError;

/// `(version, name, SQL)`, in order. A released migration never changes; a change is a new one.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "journal", include_str!("migrations/0001_journal.sql")),
    (2, "leases", include_str!("migrations/0002_leases.sql")),
    (3, "requests", include_str!("migrations/0003_requests.sql")),
    (4, "pki", include_str!("migrations/0004_pki.sql")),
    (5, "listeners", include_str!("migrations/0005_listeners.sql")),
    (6, "api tokens", include_str!("migrations/0006_api_tokens.sql")),
    (7, "job logs", include_str!("migrations/0007_job_logs.sql")),
    (8, "incarnations", include_str!("migrations/0008_incarnations.sql")),
    (9, "job holders by worker", include_str!("migrations/0009_job_holders_by_worker.sql")),
    (10, "job cancels", include_str!("migrations/0010_job_cancels.sql")),
];

/// The newest version this build knows.
pub(super) const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The advisory lock of Hodei's migrations (any fixed number; "hodei" in ASCII). It is
/// database-wide, so stores on different schemas of one database also take turns; that costs
/// only their start.
const LOCK: i64 = 0x0068_6f64_6569;

/// Why migrating failed.
#[derive(Debug)]
pub(super) enum MigrationError {
    Database(tokio_postgres::Error),
    Refused(PostgresError),
}

impl From<tokio_postgres::Error> for MigrationError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Database(e)
    }
}

/// Brings the schema up to date; returns the versions it applied.
pub(super) async fn migrate(client: &mut Client, schema: Option<&str>) -> Result<Vec<i32>, MigrationError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK]).await?;
    if let Some(schema) = schema {
        // Checked as a plain identifier by `PostgresOptions`.
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).await?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS hodei_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: Vec<i32> =
        tx.query("SELECT version FROM hodei_migrations", &[]).await?.iter().map(|row| row.get(0)).collect();
    let known = LATEST;
    if let Some(&found) = applied.iter().max().filter(|&&found| found > known) {
        return Err(MigrationError::Refused(PostgresError::NewerSchema { found, known }));
    }
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO hodei_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
        done.push(*version);
    }
    tx.commit().await?;
    Ok(done)
}
