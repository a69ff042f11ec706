//! The output a session has taken from its agent and not yet seen durable: what the session
//! bounds by pausing its reads, published so that callers can watch the bound hold.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A session's output taken and not yet durable ([`Hub::held_log_bytes`]).
///
/// [`Hub::held_log_bytes`]: super::Hub::held_log_bytes
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldLogBytes {
    /// Written to the store and not yet synced, or in the sync in flight.
    pub now: u64,
    /// The most `now` has been since the session opened.
    pub peak: u64,
    /// What `now` stays below, whatever the agent sends: see [`HubConfig`].
    ///
    /// [`HubConfig`]: super::HubConfig
    pub bound: u64,
}

/// The figure a session's log sync keeps, shared with the registry.
#[derive(Debug)]
pub(super) struct HeldGauge {
    now: AtomicU64,
    peak: AtomicU64,
    bound: u64,
}

impl HeldGauge {
    pub(super) fn new(bound: u64) -> Arc<Self> {
        Arc::new(Self { now: AtomicU64::new(0), peak: AtomicU64::new(0), bound })
    }

    pub(super) fn set(&self, now: u64) {
        self.now.store(now, Ordering::Relaxed);
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(super) fn read(&self) -> HeldLogBytes {
        HeldLogBytes {
            now: self.now.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            bound: self.bound,
        }
    }
}
