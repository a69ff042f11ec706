//! Opening connections, and the small pool of the store's readers. Everything here runs on
//! the store's background runtime, which owns every connection's I/O task.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, Row, Statement};

use super::tls::Rustls;
use super::{PostgresError, PostgresOptions};

/// Idle reader connections kept for the next read; more are opened when reads overlap, and
/// closed when they come back to a full pool.
const IDLE_READERS: usize = 4;

/// A connection attempt gives up after this, unless the connection string says otherwise, so
/// that an unreachable database fails a call instead of hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens connections to one database, in one schema.
#[derive(Debug)]
pub(super) struct Connector {
    config: Config,
    tls: Rustls,
    schema: Option<String>,
}

impl Connector {
    pub(super) fn new(url: &str, options: &PostgresOptions) -> Result<Self, crate::Error> {
        let invalid = |reason: String| crate::Error::Storage {
            operation: "connecting to PostgreSQL",
            source: crate::StorageError::new(PostgresError::InvalidUrl(reason)),
        };
        let mut config: Config = url.parse().map_err(|e: tokio_postgres::Error| invalid(e.to_string()))?;
        let schema = options.checked_schema().map_err(|e| crate::Error::Storage {
            operation: "connecting to PostgreSQL",
            source: crate::StorageError::new(e),
        })?;
        if let Some(schema) = schema {
            let options = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
            config.options(format!("{options}-c search_path={schema}"));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("hodei");
        }
        let tls = Rustls::new(&options.roots()).map_err(|e| crate::Error::Storage {
            operation: "configuring TLS to PostgreSQL",
            source: crate::StorageError::new(e),
        })?;
        Ok(Self { config, tls, schema: schema.map(str::to_owned) })
    }

    pub(super) fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// A new connection, its I/O task spawned on the current runtime.
    pub(super) async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

impl Connector {
    /// Listens on `channel` on a connection of its own, handing each notification's payload
    /// to `heard`, until the connection ends (then returns why).
    pub(super) async fn listen(
        &self,
        channel: &str,
        mut heard: impl FnMut(String),
    ) -> Result<(), tokio_postgres::Error> {
        let (client, mut connection) = self.config.connect(self.tls.clone()).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // The connection must be polled for the LISTEN to be sent, and for what it hears.
        let pump = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        });
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        while let Some(payload) = rx.recv().await {
            heard(payload);
        }
        pump.await.unwrap_or(Ok(()))
    }
}

/// Reader connections, reused.
#[derive(Debug)]
pub(super) struct Readers {
    connector: Connector,
    idle: Mutex<Vec<Reader>>,
    /// The lease's own connection: a renewal never waits for a new connection (its TLS and
    /// SCRAM handshake cost tens of milliseconds on a busy machine) because reads took every
    /// idle one. A lease that lapses for that hands a live engine's sagas to another.
    lease: Mutex<Option<Reader>>,
}

/// A reader connection and the statements prepared on it so far.
///
/// A statement run by its text is parsed and described by the server, a round trip of its own
/// (and a transaction in `pg_stat_database`), every time: an idle engine's beat would cost
/// twice what it must. Prepared once per connection, it is only bound and run afterwards. The
/// texts are the store's own constants, so the cache is as small as they are few.
#[derive(Debug)]
struct Reader {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Readers {
    pub(super) fn new(connector: Connector) -> Self {
        Self { connector, idle: Mutex::new(Vec::new()), lease: Mutex::new(None) }
    }

    pub(super) fn connector(&self) -> &Connector {
        &self.connector
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Reader>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader connection, back in the pool when dropped (unless it failed).
    pub(super) async fn get(&self) -> Result<Pooled<'_>, tokio_postgres::Error> {
        let reused = std::iter::from_fn(|| self.idle().pop()).find(|r| !r.client.is_closed());
        let reader = match reused {
            Some(reader) => reader,
            None => Reader { client: self.connector.connect().await?, prepared: HashMap::new() },
        };
        Ok(Pooled { readers: self, reader: Some(reader), broken: false, lease: false })
    }

    /// The lease's connection, kept for the lease alone; [`get`](Self::get) otherwise.
    pub(super) async fn get_for_lease(&self) -> Result<Pooled<'_>, tokio_postgres::Error> {
        let kept =
            self.lease.lock().unwrap_or_else(|p| p.into_inner()).take().filter(|r| !r.client.is_closed());
        let reader = match kept {
            Some(reader) => reader,
            None => Reader { client: self.connector.connect().await?, prepared: HashMap::new() },
        };
        Ok(Pooled { readers: self, reader: Some(reader), broken: false, lease: true })
    }
}

/// A reader connection taken from the pool.
#[derive(Debug)]
pub(super) struct Pooled<'a> {
    readers: &'a Readers,
    reader: Option<Reader>,
    broken: bool,
    /// Taken by [`Readers::get_for_lease`], and given back there.
    lease: bool,
}

impl Pooled<'_> {
    fn reader(&mut self) -> &mut Reader {
        // Taken only in `drop`.
        self.reader.as_mut().unwrap_or_else(|| unreachable!())
    }

    /// `sql`, prepared on this connection the first time it runs here.
    async fn prepared(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let reader = self.reader();
        if let Some(statement) = reader.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = reader.client.prepare(sql).await?;
        reader.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs one of the store's statements, prepared once per connection.
    pub(super) async fn query_prepared(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.prepared(sql).await.inspect_err(|_| self.failed())?;
        let rows = self.query(&statement, params).await;
        rows.inspect_err(|_| self.failed())
    }

    /// [`query_prepared`](Self::query_prepared) for a statement that returns no rows.
    pub(super) async fn execute_prepared(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.prepared(sql).await.inspect_err(|_| self.failed())?;
        let done = self.execute(&statement, params).await;
        done.inspect_err(|_| self.failed())
    }

    /// Keeps a connection that failed out of the pool: a backend terminated by the server
    /// answers with an error of its own before it closes, and may not read as closed yet when
    /// the next call takes it. A fresh connection costs less than a second failure.
    fn failed(&mut self) {
        self.broken = true;
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        // Taken only in `drop`.
        &self.reader.as_ref().unwrap_or_else(|| unreachable!()).client
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(reader) = self.reader.take() else { return };
        if !self.broken && !reader.client.is_closed() {
            if self.lease {
                *self.readers.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
                return;
            }
            let mut idle = self.readers.idle();
            if idle.len() < IDLE_READERS {
                idle.push(reader);
            }
        }
    }
}
