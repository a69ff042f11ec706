//! The embedded control plane in one builder: the hub's PKI and log store in a data directory,
//! the hub's two listeners on loopback, and a [`Scheduler`] over the providers given (an
//! in-process [`LocalProvider`] when none is).
//!
//! Under `data_dir` it keeps `pki/` (the CA, which must outlive restarts so that agents' stored
//! certificates stay valid), `logs/` (every job's output), `workers/` (the default local
//! provider's workers) and `listeners` (the listeners' addresses). The engine's own journal may
//! share the directory.
//!
//! The ports are the system's pick on first start, then the same ones on every restart while
//! they are free: agents that outlived the control plane keep dialling the addresses they were
//! given, and reconnect to the restarted one by themselves.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::hub::{Hub, HubConfig, HubError, Listening};
use crate::jobs::{JobDispatcher, SecretSource};
use crate::logstore::{LogStore, LogStoreError};
use crate::metrics::Metrics;
use crate::pki::{HubPki, PkiConfig, PkiError};
use hodei_core::EventStore;
use tokio::net::TcpListener;

use crate::scheduler::{ProviderPolicy, ReapReport, Scheduler, SchedulerError};
use hodei_providers::local::LocalProvider;
use hodei_providers::provider::Provider;

/// What starting or stopping the control plane can fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlPlaneError {
    /// The CA could not be opened or created, or the listeners' certificate issued.
    #[error("the hub's PKI in {path}: {source}")]
    Pki {
        /// The data directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: PkiError,
    },
    /// The log store could not be opened (another control plane may hold it).
    #[error("the log store in {path}: {source}")]
    Logs {
        /// The data directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: LogStoreError,
    },
    /// A listener could not be bound.
    #[error("binding the {listener} listener on {address}: {source}")]
    Bind {
        /// Which listener.
        listener: &'static str,
        /// The address asked for.
        address: SocketAddr,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The listeners' addresses could not be recorded in the data directory.
    #[error("recording the listeners' addresses in {path}: {source}")]
    Listeners {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The event store could not list the sagas in flight.
    #[error("listing the sagas in flight: {0}")]
    Store(#[source] hodei_core::Error),
    /// The listeners could not be announced in the database the control planes share.
    #[error("announcing the listeners to the control planes sharing the database: {0}")]
    Announce(#[source] hodei_core::Error),
    /// A listener could not be started or stopped.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The scheduler could not be built.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
}

/// The file in the data directory with the listeners' addresses of the last start.
const LISTENERS_FILE: &str = "listeners";

/// The addresses recorded by the last start, if it listened where this one is asked to (the
/// same IP, on ports of the system's choice).
fn previous_listeners(path: &Path, listen: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
    if listen.port() != 0 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let address = |name: &str| {
        let line = text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))?;
        line.trim().parse::<SocketAddr>().ok().filter(|address| address.ip() == listen.ip())
    };
    Some((address("registration")?, address("session")?))
}

/// Builds a [`ControlPlane`].
pub struct ControlPlaneBuilder {
    data_dir: PathBuf,
    hub_config: HubConfig,
    pki_config: PkiConfig,
    listen: SocketAddr,
    providers: Vec<(Arc<dyn Provider>, ProviderPolicy)>,
    metrics: Option<Metrics>,
    #[cfg(feature = "postgres")]
    shared: Option<Arc<hodei_core::PostgresStore>>,
}

impl fmt::Debug for ControlPlaneBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneBuilder")
            .field("data_dir", &self.data_dir)
            .field("hub_config", &self.hub_config)
            .field("listen", &self.listen)
            .field("providers", &self.providers)
            .finish_non_exhaustive()
    }
}

impl ControlPlaneBuilder {
    /// Sets the session parameters (heartbeats, log batches).
    pub fn hub_config(mut self, config: HubConfig) -> Self {
        self.hub_config = config;
        self
    }

    /// Sets the PKI's lifetimes.
    pub fn pki_config(mut self, config: PkiConfig) -> Self {
        self.pki_config = config;
        self
    }

    /// The IP both listeners bind, on ports the system picks. Default `127.0.0.1`: local
    /// workers need nothing else, and nothing outside the machine can reach it.
    pub fn listen_on(mut self, ip: std::net::IpAddr) -> Self {
        self.listen = SocketAddr::new(ip, 0);
        self
    }

    /// Takes workers from `provider` under `policy`. Without any, an in-process local provider
    /// under `<data_dir>/workers`, with the default policy.
    pub fn provider(mut self, provider: Arc<dyn Provider>, policy: ProviderPolicy) -> Self {
        self.providers.push((provider, policy));
        self
    }

    /// Joins the control planes on the database of `store`, keeping there what they share
    /// instead of in the data directory:
    /// - the PKI ([`HubPki::open_shared`]): one CA, so that an agent registered with one is
    ///   accepted by all, and tokens, revocations and rotations that hold across them;
    /// - where each listens, so that their workers can reach the others when theirs is gone;
    /// - job logs and results ([`LogStore::open_shared`]), so that a job's output and result
    ///   reach its saga whichever of them the agent sends them to and wherever the saga runs.
    #[cfg(feature = "postgres")]
    pub fn shared(mut self, store: Arc<hodei_core::PostgresStore>) -> Self {
        self.shared = Some(store);
        self
    }

    /// Records the scheduler's and the log store's metrics in `metrics` (see [`Metrics`]).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Opens everything and starts the listeners. Must run inside a tokio runtime.
    pub async fn start(self) -> Result<ControlPlane, ControlPlaneError> {
        let data_dir = self.data_dir;
        let pki_error = |source| ControlPlaneError::Pki { path: data_dir.clone(), source };
        #[cfg(feature = "postgres")]
        let pki = match self.shared.clone() {
            Some(store) => HubPki::open_shared(store, self.pki_config),
            None => HubPki::open(&data_dir, self.pki_config),
        };
        #[cfg(not(feature = "postgres"))]
        let pki = HubPki::open(&data_dir, self.pki_config);
        let pki = Arc::new(pki.map_err(pki_error)?);
        #[cfg(feature = "postgres")]
        let logs = match self.shared.clone() {
            Some(store) => {
                LogStore::open_shared(&data_dir, crate::logstore::LogStoreConfig::default(), store).await
            }
            None => LogStore::open(&data_dir).await,
        };
        #[cfg(not(feature = "postgres"))]
        let logs = LogStore::open(&data_dir).await;
        let logs =
            Arc::new(logs.map_err(|source| ControlPlaneError::Logs { path: data_dir.clone(), source })?);
        if let Some(metrics) = &self.metrics {
            logs.record_metrics(metrics.clone());
        }
        let hub = Hub::new(pki.clone(), self.hub_config).with_logs(logs.clone());
        let identity = pki.issue_server_identity(&[&self.listen.ip().to_string()]).map_err(pki_error)?;
        let listeners_file = data_dir.join(LISTENERS_FILE);
        let previous = previous_listeners(&listeners_file, self.listen);
        let bind = |listener: &'static str, previous: Option<SocketAddr>| async move {
            // The previous port if it is still free; taken by another program, a new one.
            if let Some(address) = previous
                && let Ok(bound) = TcpListener::bind(address).await
            {
                return Ok(bound);
            }
            TcpListener::bind(self.listen).await.map_err(|source| ControlPlaneError::Bind {
                listener,
                address: self.listen,
                source,
            })
        };
        let registration =
            hub.serve_registration(bind("registration", previous.map(|p| p.0)).await?, &identity)?;
        let sessions = hub.serve_sessions(bind("session", previous.map(|p| p.1)).await?, &identity)?;
        let record =
            format!("registration {}\nsession {}\n", registration.local_addr(), sessions.local_addr());
        std::fs::write(&listeners_file, record)
            .map_err(|source| ControlPlaneError::Listeners { path: listeners_file.clone(), source })?;
        let mut scheduler = Scheduler::builder(hub.clone(), registration.local_addr(), sessions.local_addr());
        // With a shared database, the others learn where this one listens, and its workers
        // where they do.
        #[cfg(feature = "postgres")]
        let announced = match self.shared {
            Some(store) => {
                let shared = Arc::new(crate::peers::SharedListeners::new(store));
                let own = crate::peers::Listeners {
                    registration: registration.local_addr(),
                    session: sessions.local_addr(),
                };
                shared.announce(own).map_err(ControlPlaneError::Announce)?;
                scheduler = scheduler.peers(shared.clone());
                Some(shared)
            }
            None => None,
        };
        for (provider, policy) in self.providers {
            scheduler = scheduler.provider(provider, policy);
        }
        if let Some(metrics) = self.metrics {
            scheduler = scheduler.metrics(metrics);
        }
        if !scheduler.has_providers() {
            let local = LocalProvider::in_process(data_dir.join("workers"));
            scheduler = scheduler.provider(Arc::new(local), ProviderPolicy::default());
        }
        let scheduler = scheduler.build()?;
        Ok(ControlPlane {
            data_dir,
            hub,
            logs,
            scheduler,
            registration,
            sessions,
            #[cfg(feature = "postgres")]
            announced,
        })
    }
}

/// A running embedded control plane. See the [module documentation](self).
#[derive(Debug)]
pub struct ControlPlane {
    data_dir: PathBuf,
    hub: Hub,
    logs: Arc<LogStore>,
    scheduler: Scheduler,
    registration: Listening,
    sessions: Listening,
    /// The listeners announced to the control planes sharing the database, withdrawn at
    /// shutdown.
    #[cfg(feature = "postgres")]
    announced: Option<Arc<crate::peers::SharedListeners>>,
}

impl ControlPlane {
    /// A control plane keeping its state in `data_dir`.
    pub fn builder(data_dir: impl Into<PathBuf>) -> ControlPlaneBuilder {
        ControlPlaneBuilder {
            data_dir: data_dir.into(),
            hub_config: HubConfig::default(),
            pki_config: PkiConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            providers: Vec::new(),
            metrics: None,
            #[cfg(feature = "postgres")]
            shared: None,
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The hub agents connect to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The scheduler pooled jobs get their workers from.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Every job's stored output.
    pub fn logs(&self) -> &Arc<LogStore> {
        &self.logs
    }

    /// The registration listener's address.
    pub fn registration_addr(&self) -> SocketAddr {
        self.registration.local_addr()
    }

    /// The session listener's address.
    pub fn session_addr(&self) -> SocketAddr {
        self.sessions.local_addr()
    }

    /// Runs jobs on this hub, pooled ones on the scheduler's workers, with secrets from
    /// `secrets`.
    pub fn dispatcher(&self, secrets: Arc<dyn SecretSource>) -> JobDispatcher {
        JobDispatcher::new(self.hub.clone(), secrets).with_pool(Arc::new(self.scheduler.clone()))
    }

    /// Reaps the workers an earlier run left, keeping (adopting) those of the sagas `store` has
    /// in flight that can reconnect: those that registered with the hub's CA, whose certificate
    /// is still valid (see [`Scheduler::reap_orphans`]). Call it before starting the engine over
    /// `store`: the engine resumes those sagas at once, and a resumed step finds its adopted
    /// worker only if it is there already. Nothing is destroyed when the store cannot say which
    /// sagas are live.
    pub async fn reap_orphans(&self, store: &dyn EventStore) -> Result<ReapReport, ControlPlaneError> {
        let live: HashSet<String> = store
            .in_flight()
            .map_err(ControlPlaneError::Store)?
            .into_iter()
            .map(|record| record.id.to_string())
            .collect();
        Ok(self.scheduler.reap_orphans(|saga| live.contains(saga)).await)
    }

    /// Stops the listeners but leaves the workers running, for a restart over the same data
    /// directory: agents reconnect to the restarted control plane (same CA, same ports), which
    /// adopts those of live sagas with [`ControlPlane::reap_orphans`]. Call it before stopping the
    /// engine, so that the steps it stops do not destroy their workers.
    pub async fn detach(self) -> Result<(), ControlPlaneError> {
        self.scheduler.detach();
        self.registration.shutdown().await?;
        self.sessions.shutdown().await?;
        Ok(())
    }

    /// Destroys every worker, then stops the listeners.
    pub async fn shutdown(self) -> Result<(), ControlPlaneError> {
        #[cfg(feature = "postgres")]
        if let Some(announced) = &self.announced
            && let Err(e) = announced.withdraw()
        {
            // Listed until its engine's lease lapses, then no more: its workers lose a moment.
            tracing::warn!(error = %e, "the control plane's listeners stay announced");
        }
        self.scheduler.shutdown().await;
        self.registration.shutdown().await?;
        self.sessions.shutdown().await?;
        Ok(())
    }
}
