//! What a journal says, indexed for replay: per step, per compensation, and the saga's fate.

use std::collections::HashMap;

use crate::event::{Event, RecordedEvent, Timestamp};

/// The attempts of a step or a compensation, as journaled.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Attempts {
    /// Attempts started.
    pub started: u32,
    /// When the next attempt is due, if the last one failed and a retry was scheduled.
    pub retry_at: Option<Timestamp>,
}

impl Attempts {
    fn start(&mut self, attempt: u32) {
        self.started = self.started.max(attempt);
        self.retry_at = None;
    }

    fn fail(&mut self, retry_at: Timestamp) {
        self.retry_at = Some(retry_at);
    }

    /// Whether the last attempt started and never reported back: the process stopped in it.
    pub fn interrupted(&self) -> bool {
        self.started > 0 && self.retry_at.is_none()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StepHistory {
    pub name: String,
    pub input: Vec<u8>,
    pub attempts: Attempts,
    pub completed: Option<Vec<u8>>,
    pub failed: Option<(String, bool)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct CompensationHistory {
    pub attempts: Attempts,
    pub completed: bool,
    pub failed: Option<String>,
}

/// The journal of one saga, indexed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Replay {
    pub steps: Vec<StepHistory>,
    pub compensations: HashMap<u32, CompensationHistory>,
    pub cancel: Option<String>,
    pub body_failed: Option<String>,
    pub finished: Option<RecordedEvent>,
}

impl Replay {
    /// Indexes a journal. An event that names a step the journal never started means the
    /// journal is inconsistent; the reason is returned so the saga can be parked.
    pub fn new(history: &[RecordedEvent]) -> Result<Self, String> {
        let mut replay = Replay::default();
        for recorded in history {
            let unknown =
                |step: u32| format!("event {} names step {step}, which never started", recorded.seq);
            match &recorded.event {
                Event::SagaStarted { .. } => {}
                Event::StepStarted { step, name, input, .. } => {
                    if *step as usize != replay.steps.len() {
                        return Err(format!("event {} starts step {step} out of order", recorded.seq));
                    }
                    replay.steps.push(StepHistory {
                        name: name.clone(),
                        input: input.clone(),
                        attempts: Attempts { started: 1, retry_at: None },
                        completed: None,
                        failed: None,
                    });
                }
                Event::StepRetried { step, attempt } => replay
                    .steps
                    .get_mut(*step as usize)
                    .ok_or_else(|| unknown(*step))?
                    .attempts
                    .start(*attempt),
                Event::StepAttemptFailed { step, retry_at, .. } => replay
                    .steps
                    .get_mut(*step as usize)
                    .ok_or_else(|| unknown(*step))?
                    .attempts
                    .fail(*retry_at),
                Event::StepCompleted { step, output } => {
                    replay.steps.get_mut(*step as usize).ok_or_else(|| unknown(*step))?.completed =
                        Some(output.clone())
                }
                Event::StepFailed { step, error, retryable } => {
                    replay.steps.get_mut(*step as usize).ok_or_else(|| unknown(*step))?.failed =
                        Some((error.clone(), *retryable))
                }
                Event::BodyFailed { cause } => replay.body_failed = Some(cause.clone()),
                Event::CancelRequested { reason } => {
                    replay.cancel.get_or_insert_with(|| reason.clone());
                }
                Event::CompensationStarted { step, attempt } => {
                    replay.compensations.entry(*step).or_default().attempts.start(*attempt)
                }
                Event::CompensationAttemptFailed { step, retry_at, .. } => {
                    replay.compensations.entry(*step).or_default().attempts.fail(*retry_at)
                }
                Event::CompensationCompleted { step } => {
                    replay.compensations.entry(*step).or_default().completed = true
                }
                Event::CompensationFailed { step, error } => {
                    replay.compensations.entry(*step).or_default().failed = Some(error.clone())
                }
                Event::SagaCompleted { .. }
                | Event::SagaFailed { .. }
                | Event::SagaCompensated { .. }
                | Event::SagaCompensationFailed { .. } => replay.finished = Some(recorded.clone()),
            }
        }
        Ok(replay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seq: u64, event: Event) -> RecordedEvent {
        RecordedEvent { seq, at: Timestamp(seq), event }
    }

    #[test]
    fn attempts_and_backoff_are_read_back() {
        let history = [
            at(0, Event::SagaStarted { definition: "d".into(), version: 1, input: vec![] }),
            at(1, Event::StepStarted { step: 0, name: "a".into(), input: vec![1], compensable: true }),
            at(2, Event::StepCompleted { step: 0, output: vec![9] }),
            at(3, Event::StepStarted { step: 1, name: "b".into(), input: vec![], compensable: false }),
            at(
                4,
                Event::StepAttemptFailed { step: 1, attempt: 1, error: "e".into(), retry_at: Timestamp(99) },
            ),
        ];
        let replay = Replay::new(&history).unwrap();
        assert_eq!(replay.steps[0].completed, Some(vec![9]));
        assert_eq!(replay.steps[1].attempts, Attempts { started: 1, retry_at: Some(Timestamp(99)) });
        assert!(!replay.steps[1].attempts.interrupted());

        let mut more = history.to_vec();
        more.push(at(5, Event::StepRetried { step: 1, attempt: 2 }));
        let replay = Replay::new(&more).unwrap();
        assert_eq!(replay.steps[1].attempts.started, 2);
        assert!(replay.steps[1].attempts.interrupted(), "attempt 2 started and never reported");
    }

    #[test]
    fn inconsistent_journals_are_reported() {
        let history = [at(0, Event::StepCompleted { step: 3, output: vec![] })];
        assert!(Replay::new(&history).unwrap_err().contains("step 3"));
        let history =
            [at(0, Event::StepStarted { step: 1, name: "x".into(), input: vec![], compensable: false })];
        assert!(Replay::new(&history).unwrap_err().contains("out of order"));
    }
}
