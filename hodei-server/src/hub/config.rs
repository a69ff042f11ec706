//! The session parameters the hub announces.

use std::time::Duration;

/// The session parameters the hub sets and announces in `Welcome`, and the limits it holds a
/// worker's session to.
///
/// What one session can make the hub hold, whatever its worker sends: the HTTP/2 windows
/// (`2 × max_held_bytes` received and not yet read); one message being decoded and one being
/// handled, each at most `log_batch_max_bytes` plus 64 KiB (4 MiB at least: larger ones end
/// the session undecoded); output taken and not yet durable (below
/// `2 × (2 × max_held_bytes + log_batch_max_bytes)` with the negotiated `max_held_bytes`:
/// past half of it the session stops reading until a sync returns; [`Hub::held_log_bytes`]);
/// and per job handed to it, its newest metrics sample and a few counters. A worker's output,
/// results and samples reach only the jobs handed to it.
///
/// [`Hub::held_log_bytes`]: super::Hub::held_log_bytes
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
    /// The most metrics samples the hub takes for one job within [`HubConfig::metrics_window`];
    /// the rest are dropped and counted ([`Hub::dropped_metric_samples`]). Default 20 per 10 s:
    /// twice what an agent sampling every second sends.
    ///
    /// [`Hub::dropped_metric_samples`]: super::Hub::dropped_metric_samples
    pub metrics_max_samples: u32,
    /// The window [`HubConfig::metrics_max_samples`] counts in, from a job's first sample in it.
    pub metrics_window: Duration,
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
            metrics_max_samples: 20,
            metrics_window: Duration::from_secs(10),
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

    /// The largest message a session decodes: a batch is at most what Welcome announces, plus
    /// its framing; gRPC's 4 MiB default stays the floor so that other messages keep their room.
    pub(super) fn max_session_message(&self) -> usize {
        usize::try_from(self.log_batch_max_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(64 * 1024)
            .max(4 * 1024 * 1024)
    }

    /// Sets the most metrics samples taken per job within `window`.
    pub fn metrics_limit(mut self, max_samples: u32, window: Duration) -> Self {
        self.metrics_max_samples = max_samples;
        self.metrics_window = window;
        self
    }
}
