//! A connection of a PostgreSQL bench's own, outside the stores it measures: it makes and drops
//! the schemas and databases each round uses. Included with `#[path]` by the benches that need it.

/// A plain `tokio-postgres` client on the bench's runtime.
pub struct Admin(pub tokio_postgres::Client);

impl Admin {
    pub async fn connect(url: &str) -> Self {
        let (client, connection) =
            tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connecting");
        tokio::spawn(connection);
        Self(client)
    }

    pub async fn drop_schemas(&self, schemas: &[&str]) {
        for schema in schemas {
            self.0.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.expect("dropping");
        }
    }
}
