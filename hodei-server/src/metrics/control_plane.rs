//! What the control plane's parts record as it happens: the scheduler's waits, provisioning
//! and lost workers, the log store's bytes and fsyncs.

use std::time::Duration;

use super::Metrics;
use super::labels::{Provider, ProviderOutcome, Stream};
use crate::logstore::LogStream;

impl Metrics {
    /// A job's request got a worker of `provider` ready to run it, `waited` after it asked.
    pub(crate) fn job_dequeued(&self, provider: &str, waited: Duration) {
        let labels = Provider { provider: provider.to_owned() };
        self.families.job_queue_wait.get_or_create(&labels).observe(waited.as_secs_f64());
    }

    /// A worker of `provider` registered (`registered`) or failed to, `took` after it was asked
    /// for.
    pub(crate) fn worker_provisioned(&self, provider: &str, registered: bool, took: Duration) {
        let outcome = if registered { "registered" } else { "failed" };
        let labels = ProviderOutcome { provider: provider.to_owned(), outcome };
        self.families.provisioning.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// A worker of `provider` was lost while it held a job.
    pub(crate) fn worker_lost(&self, provider: &str) {
        self.families.workers_lost.get_or_create(&Provider { provider: provider.to_owned() }).inc();
    }

    /// A batch of `bytes` of a job's `stream` arrived for the log store.
    pub(crate) fn log_received(&self, stream: LogStream, bytes: usize) {
        let labels = Stream { stream: stream.as_str() };
        self.families.log_received.get_or_create(&labels).inc_by(bytes as u64);
    }

    /// One fsync of a log file took `took`.
    pub(crate) fn log_fsynced(&self, took: Duration) {
        self.families.log_fsync.observe(took.as_secs_f64());
    }
}
