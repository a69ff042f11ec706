//! The hub itself: what it holds, how it is built, and the views it gives of its workers and
//! their jobs' metrics. Running jobs and serving listeners are in `jobs.rs` and `listener.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use super::config::HubConfig;
use super::held::HeldLogBytes;
use super::metrics::Metrics;
use super::registry::{Registry, WorkersWatch, jobs_snapshot, snapshot};
use crate::logstore::LogStore;
use crate::pki::HubPki;
use hodei_agent::protocol::v1;

/// The control plane's gRPC side: its PKI, session parameters and connected workers.
#[derive(Debug, Clone)]
pub struct Hub {
    pub(super) pki: Arc<HubPki>,
    pub(super) config: HubConfig,
    pub(super) registry: Arc<Registry>,
    pub(super) logs: Option<Arc<LogStore>>,
    pub(super) metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub issuing and checking certificates with `pki`. It runs no jobs until it is given a
    /// log store ([`Hub::with_logs`]).
    pub fn new(pki: Arc<HubPki>, config: HubConfig) -> Self {
        let registry = Arc::new(Registry::new());
        Self { pki, config, registry, logs: None, metrics: Arc::default() }
    }

    /// Keeps jobs' output in `logs`. Set it before [`Hub::serve_sessions`]: sessions take the
    /// store they are served with.
    #[must_use]
    pub fn with_logs(mut self, logs: Arc<LogStore>) -> Self {
        self.logs = Some(logs);
        self
    }

    /// The log store, if the hub has one.
    pub fn logs(&self) -> Option<&Arc<LogStore>> {
        self.logs.as_ref()
    }

    /// The newest metrics sample of a running job.
    pub fn job_metrics(&self, job_id: &str) -> Option<v1::MetricsSample> {
        self.metrics.map().get(job_id).cloned()
    }

    /// Every metrics sample from now on, of every job, as the agents send them (about one per
    /// job per sampling interval).
    pub fn subscribe_metrics(&self) -> tokio::sync::broadcast::Receiver<v1::MetricsSample> {
        self.metrics.samples.subscribe()
    }

    /// How many of `worker_id`'s metrics samples the hub dropped since it started: over a
    /// job's rate ([`HubConfig::metrics_max_samples`]), or for a job not handed to the worker.
    ///
    /// [`HubConfig::metrics_max_samples`]: super::HubConfig::metrics_max_samples
    pub fn dropped_metric_samples(&self, worker_id: &str) -> u64 {
        self.metrics.dropped_count(worker_id)
    }

    /// The output `worker_id`'s open session has taken and not yet made durable, with its
    /// peak and the bound it stays below; `None` if the worker is not connected.
    pub fn held_log_bytes(&self, worker_id: &str) -> Option<HeldLogBytes> {
        self.registry.held(worker_id)
    }

    /// The PKI, e.g. to issue registration tokens.
    pub fn pki(&self) -> &Arc<HubPki> {
        &self.pki
    }

    /// The workers with an open session, and since when.
    pub fn connected_workers(&self) -> BTreeMap<String, SystemTime> {
        snapshot(&self.registry.workers.borrow())
    }

    /// When each connected worker's last message arrived: its heartbeats keep this recent.
    pub fn last_heard(&self) -> BTreeMap<String, SystemTime> {
        self.registry.last_heard()
    }

    /// The jobs running on each connected worker, until their results arrive (cancelled ones
    /// included): a worker with any is busy.
    pub fn running_jobs(&self) -> BTreeMap<String, BTreeSet<String>> {
        jobs_snapshot(&self.registry.workers.borrow())
    }

    /// Notified on every connect and disconnect, and whenever a worker's running jobs change.
    pub fn watch_workers(&self) -> WorkersWatch {
        WorkersWatch(self.registry.workers.subscribe())
    }
}
