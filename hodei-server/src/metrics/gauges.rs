//! Gauges of what is held now, counted at each scrape from the parts that hold it: the engine
//! (runs in flight, waits), the scheduler (workers by provider and state, queued jobs) and the
//! hub (running jobs). Counting when asked keeps them right after a restart, and costs nothing
//! between scrapes.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::labels::{DefinitionStatus, ProviderState};
use crate::hub::Hub;
use crate::scheduler::Scheduler;
use hodei_core::Engine;

/// What a scrape counts from: the engine always, the control plane's parts when served.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    /// The engine whose runs are counted.
    pub engine: &'a Engine,
    /// The scheduler whose workers and queue are counted.
    pub scheduler: Option<&'a Scheduler>,
    /// The hub whose running jobs are counted.
    pub hub: Option<&'a Hub>,
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: usize) {
    let gauge: Gauge = Gauge::default();
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, gauge);
}

/// A registry of this moment's gauges.
pub(super) fn count(sources: Sources<'_>) -> Registry {
    let mut registry = Registry::default();
    let census = sources.engine.census();
    let runs = Family::<DefinitionStatus, Gauge>::default();
    for ((definition, status), n) in census.runs {
        runs.get_or_create(&DefinitionStatus { definition, status }).set(n as i64);
    }
    registry.register(
        "hodei_runs_in_flight",
        "Runs not finished, by definition and status (running, compensating, paused, parked, waiting-for-version)",
        runs,
    );
    gauge(&mut registry, "hodei_timers_pending", "Durable timers being waited on", census.timers_waiting);
    gauge(&mut registry, "hodei_signal_waits_pending", "Signal waits not yet satisfied", census.signal_waits);
    gauge(
        &mut registry,
        "hodei_retry_backoffs_pending",
        "Step and compensation attempts waiting out a retry backoff",
        census.backoffs_waiting,
    );
    if let Some(scheduler) = sources.scheduler {
        let workers = Family::<ProviderState, Gauge>::default();
        for ((provider, state), n) in scheduler.census() {
            workers.get_or_create(&ProviderState { provider, state }).set(n as i64);
        }
        registry.register(
            "hodei_workers",
            "Workers the scheduler holds, by provider and state (provisioning, leased, idle, destroying)",
            workers,
        );
        gauge(&mut registry, "hodei_jobs_queued", "Jobs waiting for a worker", scheduler.counts().queued);
    }
    if let Some(hub) = sources.hub {
        let running = hub.running_jobs().values().map(|jobs| jobs.len()).sum();
        gauge(&mut registry, "hodei_jobs_running", "Jobs running on connected workers", running);
    }
    registry
}
