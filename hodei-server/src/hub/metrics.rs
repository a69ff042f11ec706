//! The jobs' metrics as the agents report them.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use hodei_agent::protocol::v1;

/// The newest metrics sample of each running job, and every sample as it arrives.
#[derive(Debug)]
pub(super) struct Metrics {
    latest: Mutex<HashMap<String, v1::MetricsSample>>,
    pub(super) samples: tokio::sync::broadcast::Sender<v1::MetricsSample>,
}

impl Default for Metrics {
    fn default() -> Self {
        // A subscriber that lags this far behind misses samples (and is told so): metrics are
        // a live view, never a reason to hold up a session.
        Self { latest: Mutex::default(), samples: tokio::sync::broadcast::Sender::new(256) }
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
}
