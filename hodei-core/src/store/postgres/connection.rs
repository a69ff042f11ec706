//! Opening connections, and the small pool of the store's readers. Everything here runs on
//! the store's background runtime, which owns every connection's I/O task.

use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::{AsyncMessage, Client, Config};

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
    idle: Mutex<Vec<Client>>,
}

impl Readers {
    pub(super) fn new(connector: Connector) -> Self {
        Self { connector, idle: Mutex::new(Vec::new()) }
    }

    pub(super) fn connector(&self) -> &Connector {
        &self.connector
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader connection, back in the pool when dropped (unless it failed).
    pub(super) async fn get(&self) -> Result<Pooled<'_>, tokio_postgres::Error> {
        let reused = std::iter::from_fn(|| self.idle().pop()).find(|c| !c.is_closed());
        let client = match reused {
            Some(client) => client,
            None => self.connector.connect().await?,
        };
        Ok(Pooled { readers: self, client: Some(client) })
    }
}

/// A reader connection taken from the pool.
#[derive(Debug)]
pub(super) struct Pooled<'a> {
    readers: &'a Readers,
    client: Option<Client>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        // Taken only in `drop`.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        if !client.is_closed() {
            let mut idle = self.readers.idle();
            if idle.len() < IDLE_READERS {
                idle.push(client);
            }
        }
    }
}
