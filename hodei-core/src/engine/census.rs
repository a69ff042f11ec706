//! What the engine holds now, counted when asked: runs in flight and what they wait on. A
//! gauge read from here is right after a restart too, since recovery makes every run in flight
//! live again, unlike one kept up to date from events, which would start at zero.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::state::Engine;
use crate::lock::lock;

/// The engine's runs in flight and their waits, now: [`Engine::census`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Census {
    /// Runs that have not finished, by definition name and status
    /// ([`SagaStatus::kind`](crate::SagaStatus::kind): running, compensating, paused, parked,
    /// waiting-for-version).
    pub runs: BTreeMap<(String, &'static str), usize>,
    /// Durable timers being waited on.
    pub timers_waiting: usize,
    /// Signal waits not yet satisfied.
    pub signal_waits: usize,
    /// Step and compensation attempts waiting out a retry backoff.
    pub backoffs_waiting: usize,
}

impl Engine {
    /// Counts the runs in flight and their waits. Costs one short lock per run in flight and
    /// reads nothing from the store: fit for every scrape of a metrics endpoint.
    pub fn census(&self) -> Census {
        let live: Vec<_> = lock(&self.inner.live).values().map(Arc::clone).collect();
        let mut census = Census::default();
        for saga in live {
            let record = saga.journal.record();
            if record.status.is_final() {
                continue;
            }
            *census.runs.entry((record.definition, record.status.kind())).or_default() += 1;
            census.timers_waiting += saga.control.timers_waiting();
            census.signal_waits += saga.control.signal_waits();
            census.backoffs_waiting += saga.control.backoffs_waiting();
        }
        census
    }
}
