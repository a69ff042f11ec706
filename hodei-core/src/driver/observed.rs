//! One saga's journal as its observer sees it: the observations its written events make, with
//! the little the derivation must remember (when each running step started).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::event::{Event, RecordedEvent, SagaRecord, Timestamp};
use crate::observe::{CompensationEnd, Observer, StepEnd};

pub(crate) struct Observed {
    observer: Arc<dyn Observer>,
    /// The steps started and not yet ended, with their start: seeded from the journal the
    /// saga resumes from, so that a step that spans a restart still gets its whole duration.
    running: HashMap<u32, Timestamp>,
}

fn between(from: Timestamp, to: Timestamp) -> Duration {
    Duration::from_millis(to.0.saturating_sub(from.0))
}

impl Observed {
    /// An observer of a saga whose journal so far is `history` (already observed, or written
    /// by an earlier process).
    pub fn new(observer: Arc<dyn Observer>, history: &[RecordedEvent]) -> Self {
        let mut running = HashMap::new();
        for recorded in history {
            match &recorded.event {
                event if event.step_start().is_some() => {
                    if let Some((step, _)) = event.step_start() {
                        running.insert(step, recorded.at);
                    }
                }
                Event::StepCompleted { step, .. }
                | Event::StepFailed { step, .. }
                | Event::StepCancelled { step, .. } => {
                    running.remove(step);
                }
                _ => {}
            }
        }
        Self { observer, running }
    }

    /// Tells the observer what `written`, just appended to the journal of `record`'s saga,
    /// says.
    pub fn saw(&mut self, record: &SagaRecord, written: &[RecordedEvent]) {
        let definition = record.definition.as_str();
        let observer = self.observer.as_ref();
        for recorded in written {
            let step_end = |end| (end, recorded.at);
            let ended = match &recorded.event {
                Event::StepStarted { step, .. } | Event::StepStartedAt { step, .. } => {
                    self.running.insert(*step, recorded.at);
                    observer.attempt_started(definition, 1);
                    None
                }
                Event::StepRetried { attempt, .. } => {
                    observer.attempt_started(definition, *attempt);
                    None
                }
                Event::StepCompleted { step, .. } => Some((*step, step_end(StepEnd::Completed))),
                Event::StepFailed { step, .. } => Some((*step, step_end(StepEnd::Failed))),
                Event::StepCancelled { step, .. } => Some((*step, step_end(StepEnd::Cancelled))),
                Event::CompensationCompleted { .. } => {
                    observer.compensation_finished(definition, CompensationEnd::Completed);
                    None
                }
                Event::CompensationFailed { .. } => {
                    observer.compensation_finished(definition, CompensationEnd::Failed);
                    None
                }
                Event::TimerStarted { .. } => {
                    observer.timer_started(definition);
                    None
                }
                Event::SignalReceived { .. } | Event::SignalReceivedBy { .. } => {
                    observer.signal_received(definition);
                    None
                }
                event if event.is_final() => {
                    let outcome = super::ending::final_status(event);
                    observer.saga_finished(definition, &outcome, between(record.created_at, recorded.at));
                    None
                }
                _ => None,
            };
            if let Some((step, (end, at))) = ended
                && let Some(started) = self.running.remove(&step)
            {
                observer.step_finished(definition, end, between(started, at));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::event::{SagaId, SagaStatus};

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Observer for Log {
        fn saga_finished(&self, definition: &str, outcome: &SagaStatus, duration: Duration) {
            self.0.lock().unwrap().push(format!("{definition} {} {duration:?}", outcome.kind()));
        }
        fn attempt_started(&self, _: &str, attempt: u32) {
            self.0.lock().unwrap().push(format!("attempt {attempt}"));
        }
        fn step_finished(&self, _: &str, end: StepEnd, duration: Duration) {
            self.0.lock().unwrap().push(format!("step {} {duration:?}", end.kind()));
        }
        fn compensation_finished(&self, _: &str, end: CompensationEnd) {
            self.0.lock().unwrap().push(format!("compensation {}", end.kind()));
        }
    }

    fn at(seq: u64, ms: u64, event: Event) -> RecordedEvent {
        RecordedEvent { seq, at: Timestamp(ms), event }
    }

    /// A step that started before a restart (in the history the observer is seeded with) gets
    /// its whole duration from the journal's timestamps; the saga's runs from its record's
    /// creation; replayed events are not observed again.
    #[test]
    fn durations_come_from_the_journal_across_a_restart() {
        let log = Arc::new(Log::default());
        let id = SagaId::new("s").unwrap();
        let record = SagaRecord::new(id, "release".into(), 1, Timestamp(1_000));
        let before_restart = [
            at(0, 1_000, Event::SagaStarted { definition: "release".into(), version: 1, input: vec![] }),
            at(
                1,
                1_500,
                Event::StepStarted { step: 0, name: "build".into(), input: vec![], compensable: true },
            ),
        ];
        let mut observed = Observed::new(log.clone(), &before_restart);
        observed.saw(
            &record,
            &[
                at(
                    2,
                    2_000,
                    Event::StepAttemptFailed {
                        step: 0,
                        attempt: 1,
                        error: "e".into(),
                        retry_at: Timestamp(2_100),
                    },
                ),
                at(3, 2_100, Event::StepRetried { step: 0, attempt: 2 }),
                at(4, 4_000, Event::StepCompleted { step: 0, output: vec![] }),
                at(
                    5,
                    4_000,
                    Event::StepStarted { step: 1, name: "ship".into(), input: vec![], compensable: false },
                ),
                at(6, 4_250, Event::StepFailed { step: 1, error: "e".into(), retryable: false }),
                at(7, 4_300, Event::BodyFailed { cause: "e".into() }),
                at(8, 4_400, Event::CompensationStarted { step: 0, attempt: 1 }),
                at(9, 4_500, Event::CompensationCompleted { step: 0 }),
                at(10, 5_000, Event::SagaCompensated { cause: "e".into() }),
            ],
        );
        assert_eq!(
            *log.0.lock().unwrap(),
            [
                "attempt 2",
                "step completed 2.5s",
                "attempt 1",
                "step failed 250ms",
                "compensation completed",
                "release compensated 4s",
            ]
        );
    }
}
