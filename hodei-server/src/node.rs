//! One process's whole Hodei: the sled journal, the embedded control plane and the engine over
//! one data directory, started and stopped in the order each needs of the others.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{Engine, EngineBuilder, SagaDefinition, ShutdownReport, SledOptions, SledStore};

use crate::control_plane::{ControlPlane, ControlPlaneBuilder, ControlPlaneError};
use crate::jobs::{JobDispatcher, MemorySecrets, SecretSource};
use crate::metrics::Metrics;
use crate::scheduler::ReapReport;

/// What starting or stopping a [`Node`] can fail at, by the part that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The journal could not be opened: locked by another process, damaged, unreadable.
    #[error("the journal in {path}: {source}")]
    Journal {
        /// The data directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: hodei_core::Error,
    },
    /// The control plane failed to start, reap or stop.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// The engine failed to start or to shut down.
    #[error("the engine: {0}")]
    Engine(#[source] hodei_core::Error),
}

/// Configures a [`Node`]: [`Node::builder`].
#[must_use = "a builder does nothing until it is started"]
pub struct NodeBuilder {
    data_dir: PathBuf,
    engine: EngineBuilder,
    control_plane: ControlPlaneBuilder,
    secrets: Arc<dyn SecretSource>,
    sled: SledOptions,
    metrics: Option<Metrics>,
}

impl fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("data_dir", &self.data_dir)
            .field("engine", &self.engine)
            .field("control_plane", &self.control_plane)
            .field("sled", &self.sled)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// Registers a saga definition with the engine.
    pub fn register(mut self, definition: SagaDefinition) -> Self {
        self.engine = self.engine.register(definition);
        self
    }

    /// Shares `value` with every saga body and step, which reach it with
    /// `ctx.resource::<T>()`. The node shares two itself: the `JobDispatcher` that
    /// `ctx.run_job` uses, and the control plane's `LogStore`, to read jobs' output.
    pub fn resource<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.engine = self.engine.resource(value);
        self
    }

    /// Where jobs' secrets come from (none by default: a job that names one fails).
    pub fn secrets(mut self, secrets: impl SecretSource + 'static) -> Self {
        self.secrets = Arc::new(secrets);
        self
    }

    /// Changes the engine's builder: its configuration, limits, a store other than sled
    /// (then [`sled_options`](Self::sled_options) is unused).
    pub fn engine(mut self, configure: impl FnOnce(EngineBuilder) -> EngineBuilder) -> Self {
        self.engine = configure(self.engine);
        self
    }

    /// Changes the control plane's builder: providers, listen address, hub and PKI settings.
    pub fn control_plane(
        mut self,
        configure: impl FnOnce(ControlPlaneBuilder) -> ControlPlaneBuilder,
    ) -> Self {
        self.control_plane = configure(self.control_plane);
        self
    }

    /// Records the engine's, the journal's and the control plane's metrics in `metrics`, which
    /// [`ApiServer::for_node`](crate::api::ApiServer::for_node) then serves at `/metrics`.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.engine = self.engine.observer(Arc::new(metrics.clone()));
        self.control_plane = self.control_plane.metrics(metrics.clone());
        self.metrics = Some(metrics);
        self
    }

    /// How the sled journal is opened (for instance, accepting a known data loss).
    pub fn sled_options(mut self, options: SledOptions) -> Self {
        self.sled = options;
        self
    }

    /// Opens the journal, starts the control plane, reaps the workers an earlier run left
    /// (keeping those of sagas still in flight), then starts the engine, which resumes those
    /// sagas: each finds its adopted worker already there. A failure stops what was started.
    pub async fn start(self) -> Result<Node, NodeError> {
        let NodeBuilder { data_dir, engine, control_plane, secrets, sled, metrics } = self;
        let journal = SledStore::open_with(&data_dir, sled)
            .map_err(|source| NodeError::Journal { path: data_dir.clone(), source })?;
        let journal = Arc::new(journal);
        let control = control_plane.start().await?;
        let reaped = match control.reap_orphans(journal.as_ref()).await {
            Ok(reaped) => reaped,
            Err(e) => return Err(stop_after(control, e.into()).await),
        };
        let dispatcher = control.dispatcher(secrets);
        let engine = engine.store(journal).resource(dispatcher.clone()).resource_arc(control.logs().clone());
        let engine = match engine.start().await {
            Ok(engine) => engine,
            Err(e) => return Err(stop_after(control, NodeError::Engine(e)).await),
        };
        Ok(Node { engine, control, dispatcher, reaped, metrics })
    }
}

/// Stops a control plane that started before a later part failed, and returns that failure.
async fn stop_after(control: ControlPlane, error: NodeError) -> NodeError {
    if let Err(e) = control.shutdown().await {
        tracing::warn!(error = %e, "stopping the control plane after a failed start");
    }
    error
}

/// The engine, its sled journal and the embedded control plane, over one data directory: what
/// a binary that runs pipelines starts once.
///
/// ```no_run
/// # async fn example(release: hodei_core::SagaDefinition) -> Result<(), Box<dyn std::error::Error>> {
/// use hodei_server::Node;
/// use hodei_server::jobs::MemorySecrets;
///
/// let node = Node::builder("hodei-data")
///     .register(release)
///     .secrets(MemorySecrets::new().insert("registry-token", "..."))
///     .start()
///     .await?;
/// // ... start sagas on node.engine() ...
/// node.shutdown(std::time::Duration::from_secs(10)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Node {
    engine: Engine,
    control: ControlPlane,
    dispatcher: JobDispatcher,
    reaped: ReapReport,
    metrics: Option<Metrics>,
}

impl Node {
    /// A node over `data_dir`: the journal, the CA, the jobs' logs and the local workers all
    /// live under it.
    pub fn builder(data_dir: impl Into<PathBuf>) -> NodeBuilder {
        let data_dir = data_dir.into();
        NodeBuilder {
            engine: Engine::builder(),
            control_plane: ControlPlane::builder(data_dir.clone()),
            data_dir,
            secrets: Arc::new(MemorySecrets::new()),
            sled: SledOptions::default(),
            metrics: None,
        }
    }

    /// The engine: start sagas, read their history, signal and cancel them.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The control plane: its hub, scheduler and job logs.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control
    }

    /// The dispatcher the engine's sagas run their jobs through.
    pub fn dispatcher(&self) -> &JobDispatcher {
        &self.dispatcher
    }

    /// What the start found of an earlier run's workers: those adopted for sagas still in flight,
    /// and those destroyed.
    pub fn reaped(&self) -> &ReapReport {
        &self.reaped
    }

    /// The metrics given to [`NodeBuilder::metrics`].
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.control.data_dir()
    }

    /// Stops the engine (running steps get until `deadline` to finish; the others are left for
    /// the next start), then destroys the workers and stops the control plane.
    pub async fn shutdown(self, deadline: Duration) -> Result<ShutdownReport, NodeError> {
        let report = self.engine.shutdown(deadline).await.map_err(NodeError::Engine);
        self.control.shutdown().await?;
        report
    }

    /// Stops for a restart that keeps the workers: the control plane lets go of them first, so
    /// that steps the engine then stops do not destroy them, and the next start adopts those of
    /// sagas still in flight. For workers that outlive this process (child processes, Docker,
    /// Kubernetes, Firecracker).
    pub async fn detach(self, deadline: Duration) -> Result<ShutdownReport, NodeError> {
        self.control.detach().await?;
        self.engine.shutdown(deadline).await.map_err(NodeError::Engine)
    }
}
