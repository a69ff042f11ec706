//! The engine's observations as metrics: `Metrics` is the engine's [`Observer`].

use std::time::Duration;

use hodei_core::SagaStatus;
use hodei_core::observe::{CompensationEnd, Observer, StepEnd};

use super::Metrics;
use super::labels::{Definition, DefinitionOutcome};

fn definition(definition: &str) -> Definition {
    Definition { definition: definition.to_owned() }
}

fn outcome(definition: &str, outcome: &'static str) -> DefinitionOutcome {
    DefinitionOutcome { definition: definition.to_owned(), outcome }
}

impl Observer for Metrics {
    fn saga_started(&self, name: &str) {
        self.families.sagas_started.get_or_create(&definition(name)).inc();
    }

    fn saga_finished(&self, name: &str, status: &SagaStatus, duration: Duration) {
        let labels = outcome(name, status.kind());
        self.families.sagas_finished.get_or_create(&labels).inc();
        self.families.saga_duration.get_or_create(&labels).observe(duration.as_secs_f64());
    }

    fn attempt_started(&self, name: &str, attempt: u32) {
        let labels = definition(name);
        self.families.step_attempts.get_or_create(&labels).inc();
        if attempt > 1 {
            self.families.step_retries.get_or_create(&labels).inc();
        }
    }

    fn step_finished(&self, name: &str, end: StepEnd, duration: Duration) {
        self.families.step_duration.get_or_create(&outcome(name, end.kind())).observe(duration.as_secs_f64());
    }

    fn compensation_finished(&self, name: &str, end: CompensationEnd) {
        self.families.compensations.get_or_create(&outcome(name, end.kind())).inc();
    }

    fn timer_started(&self, name: &str) {
        self.families.timers_started.get_or_create(&definition(name)).inc();
    }

    fn signal_received(&self, name: &str) {
        self.families.signals_received.get_or_create(&definition(name)).inc();
    }

    fn journal_flushed(&self, duration: Duration, writers: usize) {
        self.families.journal_flush.observe(duration.as_secs_f64());
        self.families.journal_flush_writers.observe(writers as f64);
    }
}
