//! The jobs' metrics as the agents report them.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use hodei_agent::protocol::v1;

/// The newest metrics sample of each running job, every sample as it arrives, and how many
/// were dropped.
#[derive(Debug)]
pub(super) struct Metrics {
    latest: Mutex<HashMap<String, v1::MetricsSample>>,
    pub(super) samples: tokio::sync::broadcast::Sender<v1::MetricsSample>,
    /// By worker: over a job's rate, or for a job not handed to the worker. Workers are
    /// those the PKI certified, so this grows with them, not with what they send.
    dropped: Mutex<HashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        // A subscriber that lags this far behind misses samples (and is told so): metrics are
        // a live view, never a reason to hold up a session.
        Self {
            latest: Mutex::default(),
            samples: tokio::sync::broadcast::Sender::new(256),
            dropped: Mutex::default(),
        }
    }
}

impl Metrics {
    pub(super) fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, v1::MetricsSample>> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn record(&self, sample: v1::MetricsSample) {
        self.map().insert(sample.job_id.clone(), sample.clone());
        // No subscriber is not an error.
        let _ = self.samples.send(sample);
    }

    pub(super) fn dropped(&self, worker_id: &str) {
        let mut dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
        match dropped.get_mut(worker_id) {
            Some(count) => *count = count.saturating_add(1),
            None => {
                dropped.insert(worker_id.to_owned(), 1);
            }
        }
    }

    pub(super) fn dropped_count(&self, worker_id: &str) -> u64 {
        self.dropped.lock().unwrap_or_else(PoisonError::into_inner).get(worker_id).copied().unwrap_or(0)
    }
}
