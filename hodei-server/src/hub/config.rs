//! The session parameters the hub announces.

use std::time::Duration;

/// The session parameters the hub sets and announces in `Welcome`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// How often the agent sends a heartbeat. Default 10 s.
    pub heartbeat_interval: Duration,
    /// How long the hub waits for any message before it closes the session. Default 30 s: three
    /// intervals, so that one late heartbeat does not cut a worker off.
    pub heartbeat_timeout: Duration,
    /// Largest log batch the agent sends. Default 1 MiB (Woodpecker's size): a flood of output
    /// then costs the hub one message, one write and one decode per MiB, not per line or per
    /// pipe read, and a batch stays well under gRPC's 4 MiB message limit; the fsyncs are
    /// grouped across batches anyway (see [`LogStore::sync`]), and larger batches measured no
    /// faster. Quiet jobs are bounded by the delay instead.
    ///
    /// [`LogStore::sync`]: crate::logstore::LogStore::sync
    pub log_batch_max_bytes: u64,
    /// Longest the agent holds output before sending it. Default 200 ms, so logs read as live.
    pub log_batch_max_delay: Duration,
    /// The most unacknowledged output per job the hub lets an agent hold, offered in `Welcome`
    /// (the session uses the smaller of this and the agent's own bound). The hub's HTTP/2
    /// windows and its bound on written, unsynced bytes per session are twice this, so that
    /// flow control never holds back an agent that keeps to it. Default 8 MiB: see the agent's
    /// `MAX_HELD_BYTES` for how it was measured.
    pub max_held_bytes: u64,
    /// How long [`Hub::run_job`] waits for a worker that is not connected (yet, or again after
    /// a restart of either side) before failing with [`HubError::UnknownWorker`]. Default: the
    /// heartbeat timeout.
    ///
    /// [`Hub::run_job`]: super::Hub::run_job
    /// [`HubError::UnknownWorker`]: super::HubError::UnknownWorker
    pub worker_wait: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            log_batch_max_bytes: 1024 * 1024,
            log_batch_max_delay: Duration::from_millis(200),
            worker_wait: Duration::from_secs(30),
            max_held_bytes: 8 * 1024 * 1024,
        }
    }
}

impl HubConfig {
    /// Sets the heartbeat interval and timeout (and the wait for a worker, to the timeout).
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.heartbeat_interval = interval;
        self.heartbeat_timeout = timeout;
        self.worker_wait = timeout;
        self
    }

    /// Sets how long a job waits for its worker to connect.
    pub fn worker_wait(mut self, wait: Duration) -> Self {
        self.worker_wait = wait;
        self
    }

    /// Sets the bound on each job's unacknowledged output ([`HubConfig::max_held_bytes`]).
    pub fn max_held_bytes(mut self, bytes: u64) -> Self {
        self.max_held_bytes = bytes.max(1);
        self
    }

    /// Sets the log batch limits.
    pub fn log_batches(mut self, max_bytes: u64, max_delay: Duration) -> Self {
        self.log_batch_max_bytes = max_bytes;
        self.log_batch_max_delay = max_delay;
        self
    }
}
