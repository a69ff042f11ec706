//! The metric families whose values events change (counters, histograms), registered once in
//! one registry. Gauges of what is held now are not here but counted at each scrape
//! (`gauges.rs`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::labels::{Definition, DefinitionOutcome, Provider, ProviderOutcome, Request, Stream};

/// Buckets of things that take from milliseconds to an hour: steps, runs, queue waits,
/// provisioning.
const LONG_SECONDS: [f64; 16] =
    [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

fn long_histogram() -> Histogram {
    Histogram::new(LONG_SECONDS)
}

/// 100 µs to about 3 s: one fsync.
fn fsync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// 1 to 2048 writers answered by one group commit.
fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

type LongFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub(super) struct Families {
    pub registry: Registry,
    pub sagas_started: Family<Definition, Counter>,
    pub sagas_finished: Family<DefinitionOutcome, Counter>,
    pub saga_duration: LongFamily<DefinitionOutcome>,
    pub step_attempts: Family<Definition, Counter>,
    pub step_retries: Family<Definition, Counter>,
    pub step_duration: LongFamily<DefinitionOutcome>,
    pub compensations: Family<DefinitionOutcome, Counter>,
    pub timers_started: Family<Definition, Counter>,
    pub signals_received: Family<Definition, Counter>,
    pub journal_flush: Histogram,
    pub journal_flush_writers: Histogram,
    pub job_queue_wait: LongFamily<Provider>,
    pub provisioning: LongFamily<ProviderOutcome>,
    pub workers_lost: Family<Provider, Counter>,
    pub log_received: Family<Stream, Counter>,
    pub log_fsync: Histogram,
    pub api_requests: Family<Request, Counter>,
}

impl Families {
    pub fn new() -> Self {
        let mut families = Self {
            registry: Registry::default(),
            sagas_started: Family::default(),
            sagas_finished: Family::default(),
            saga_duration: Family::new_with_constructor(long_histogram),
            step_attempts: Family::default(),
            step_retries: Family::default(),
            step_duration: Family::new_with_constructor(long_histogram),
            compensations: Family::default(),
            timers_started: Family::default(),
            signals_received: Family::default(),
            journal_flush: fsync_histogram(),
            journal_flush_writers: batch_histogram(),
            job_queue_wait: Family::new_with_constructor(long_histogram),
            provisioning: Family::new_with_constructor(long_histogram),
            workers_lost: Family::default(),
            log_received: Family::default(),
            log_fsync: fsync_histogram(),
            api_requests: Family::default(),
        };
        families.register();
        families
    }

    /// Names without their suffixes: the encoder adds `_total` to counters and the unit.
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register("hodei_sagas_started", "Runs started, forks included", self.sagas_started.clone());
        r.register(
            "hodei_sagas_finished",
            "Runs that reached a final event, by outcome (completed, compensated, compensation-failed, failed)",
            self.sagas_finished.clone(),
        );
        r.register_with_unit(
            "hodei_saga_duration",
            "Time from a run's start to its final event, as journaled",
            Unit::Seconds,
            self.saga_duration.clone(),
        );
        r.register(
            "hodei_step_attempts",
            "Step attempts begun, first attempts included",
            self.step_attempts.clone(),
        );
        r.register("hodei_step_retries", "Step attempts begun after a failed one", self.step_retries.clone());
        r.register_with_unit(
            "hodei_step_duration",
            "Time from a step's start to its end (completed, failed, cancelled), retries and backoffs included",
            Unit::Seconds,
            self.step_duration.clone(),
        );
        r.register(
            "hodei_compensations",
            "Compensations that ended, by outcome (completed, failed)",
            self.compensations.clone(),
        );
        r.register("hodei_timers_started", "Durable timers set", self.timers_started.clone());
        r.register("hodei_signals_received", "Signals journaled for a run", self.signals_received.clone());
        r.register_with_unit(
            "hodei_journal_flush_duration",
            "Time of one group commit of the journal (sled flush and acknowledged position)",
            Unit::Seconds,
            self.journal_flush.clone(),
        );
        r.register(
            "hodei_journal_flush_writers",
            "Writers one group commit of the journal made durable",
            self.journal_flush_writers.clone(),
        );
        r.register_with_unit(
            "hodei_job_queue_wait",
            "Time from a job's request for a worker to a worker ready to run it, by provider",
            Unit::Seconds,
            self.job_queue_wait.clone(),
        );
        r.register_with_unit(
            "hodei_worker_provisioning",
            "Time from asking a provider for a worker to its registration with the hub, by provider and outcome (registered, failed)",
            Unit::Seconds,
            self.provisioning.clone(),
        );
        r.register(
            "hodei_workers_lost",
            "Workers lost while they held a job, by provider",
            self.workers_lost.clone(),
        );
        r.register_with_unit(
            "hodei_log_received",
            "Bytes of job output received from workers, by stream, resent bytes included",
            Unit::Bytes,
            self.log_received.clone(),
        );
        r.register_with_unit(
            "hodei_log_fsync_duration",
            "Time of one fsync of a job's log file",
            Unit::Seconds,
            self.log_fsync.clone(),
        );
        r.register(
            "hodei_api_requests",
            "Operator API requests answered, by method, route template and status",
            self.api_requests.clone(),
        );
    }
}
