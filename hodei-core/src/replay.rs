//! What a journal says, indexed for replay: per step, per compensation, and the saga's fate.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::event::{Event, JoinMode, RecordedEvent, Timestamp};

/// The attempts of a step or a compensation, as journaled.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Attempts {
    /// Attempts started.
    pub started: u32,
    /// When the next attempt is due, if the last one failed and a retry was scheduled.
    pub retry_at: Option<Timestamp>,
    /// Attempts that failed and were retried: the others before the last were cut off by a
    /// restart, which a step whose interruptions do not count must not hold against it.
    pub failed: u32,
}

impl Attempts {
    fn start(&mut self, attempt: u32) {
        self.started = self.started.max(attempt);
        self.retry_at = None;
    }

    fn fail(&mut self, retry_at: Timestamp) {
        self.retry_at = Some(retry_at);
        self.failed += 1;
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
    /// Stopped by a cancel of its saga or its branch.
    pub cancelled: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct CompensationHistory {
    pub attempts: Attempts,
    pub completed: bool,
    pub failed: Option<String>,
}

/// How a recorded signal wait ended, if it did.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum WaitEnd {
    /// It took the signal journaled at this sequence number.
    Consumed(u64),
    TimedOut,
}

/// A group of branches as journaled: its shape and its branches in the order they finished.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct GroupHistory {
    pub name: String,
    pub count: u32,
    pub mode: JoinMode,
    pub finished: Vec<(u32, Option<(String, bool)>)>,
}

/// What the journal records at one operation key.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RecordedOp {
    /// A step, by its number.
    Step(u32),
    Timer {
        due: Timestamp,
        fired: bool,
    },
    Wait {
        name: String,
        timeout_at: Option<Timestamp>,
        end: Option<WaitEnd>,
    },
    Group(GroupHistory),
}

impl RecordedOp {
    /// What the operation is, for nondeterminism reports.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordedOp::Step(_) => "a step",
            RecordedOp::Timer { .. } => "a timer",
            RecordedOp::Wait { .. } => "a signal wait",
            RecordedOp::Group(_) => "a group of branches",
        }
    }
}

/// The journal of one saga, indexed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Replay {
    /// Steps by number.
    pub steps: HashMap<u32, StepHistory>,
    /// Every operation by key, with its position in journal order (for reports).
    pub ops: HashMap<String, (usize, RecordedOp)>,
    /// Operation keys in journal order.
    pub keys: Vec<String>,
    /// Signals received, by sequence number: (name, payload).
    pub signals: BTreeMap<u64, (String, Vec<u8>)>,
    pub compensations: HashMap<u32, CompensationHistory>,
    pub cancel: Option<String>,
    pub body_failed: Option<String>,
    pub finished: Option<RecordedEvent>,
    /// The first step number no recorded step has.
    pub next_step: u32,
    /// The patches the run took the new path of: (key, patch).
    pub patches: HashSet<(String, String)>,
}

impl Replay {
    /// Indexes a journal. An event that names a step or operation the journal never started
    /// means the journal is inconsistent; the reason is returned so the saga can be parked.
    pub fn new(history: &[RecordedEvent]) -> Result<Self, String> {
        let mut replay = Replay::default();
        for recorded in history {
            let seq = recorded.seq;
            let unknown = |step: u32| format!("event {seq} names step {step}, which never started");
            let unknown_op = |key: &str| format!("event {seq} names operation {key}, which never started");
            match &recorded.event {
                Event::SagaStarted { .. } | Event::ForkedFrom { .. } | Event::Forked { .. } => {}
                Event::StepStarted { step, name, input, .. } => {
                    replay.start_step(seq, *step, step.to_string(), name, input)?
                }
                Event::StepStartedAt { step, key, name, input, .. } => {
                    replay.start_step(seq, *step, key.clone(), name, input)?
                }
                Event::StepRetried { step, attempt } => {
                    replay.steps.get_mut(step).ok_or_else(|| unknown(*step))?.attempts.start(*attempt)
                }
                Event::StepAttemptFailed { step, retry_at, .. } => {
                    replay.steps.get_mut(step).ok_or_else(|| unknown(*step))?.attempts.fail(*retry_at)
                }
                Event::StepCompleted { step, output } => {
                    replay.steps.get_mut(step).ok_or_else(|| unknown(*step))?.completed = Some(output.clone())
                }
                Event::StepFailed { step, error, retryable } => {
                    replay.steps.get_mut(step).ok_or_else(|| unknown(*step))?.failed =
                        Some((error.clone(), *retryable))
                }
                Event::StepCancelled { step, reason } => {
                    replay.steps.get_mut(step).ok_or_else(|| unknown(*step))?.cancelled = Some(reason.clone())
                }
                Event::TimerStarted { key, due } => {
                    replay.start_op(seq, key, RecordedOp::Timer { due: *due, fired: false })?
                }
                Event::TimerFired { key } => match replay.op_mut(key) {
                    Some(RecordedOp::Timer { fired, .. }) => *fired = true,
                    _ => return Err(unknown_op(key)),
                },
                Event::SignalReceived { name, payload } | Event::SignalReceivedBy { name, payload, .. } => {
                    replay.signals.insert(seq, (name.clone(), payload.clone()));
                }
                Event::SignalWaitStarted { key, name, timeout_at } => replay.start_op(
                    seq,
                    key,
                    RecordedOp::Wait { name: name.clone(), timeout_at: *timeout_at, end: None },
                )?,
                Event::SignalConsumed { key, signal } => {
                    if !replay.signals.contains_key(signal) {
                        return Err(format!("event {seq} consumes signal {signal}, which never arrived"));
                    }
                    match replay.op_mut(key) {
                        Some(RecordedOp::Wait { end, .. }) => *end = Some(WaitEnd::Consumed(*signal)),
                        _ => return Err(unknown_op(key)),
                    }
                }
                Event::SignalWaitTimedOut { key } => match replay.op_mut(key) {
                    Some(RecordedOp::Wait { end, .. }) => *end = Some(WaitEnd::TimedOut),
                    _ => return Err(unknown_op(key)),
                },
                Event::BranchesStarted { key, name, count, mode } => replay.start_op(
                    seq,
                    key,
                    RecordedOp::Group(GroupHistory {
                        name: name.clone(),
                        count: *count,
                        mode: *mode,
                        finished: Vec::new(),
                    }),
                )?,
                Event::BranchFinished { key, branch, error } => match replay.op_mut(key) {
                    Some(RecordedOp::Group(group)) if *branch < group.count => {
                        group.finished.push((*branch, error.clone()))
                    }
                    _ => return Err(unknown_op(key)),
                },
                Event::BodyFailed { cause } => replay.body_failed = Some(cause.clone()),
                Event::CancelRequested { reason } | Event::CancelRequestedBy { reason, .. } => {
                    replay.cancel.get_or_insert_with(|| reason.clone());
                }
                // Whether the saga is paused is the engine's to restore (see `journaled_pause`):
                // it changes when operations run, never what they return.
                Event::Paused { .. } | Event::Resumed { .. } => {}
                // What a wait expects is for operators; the wait's own event follows it.
                Event::SignalWaitExpects { .. } => {}
                // Where the spans go, not what the body does: read by the engine when it spawns
                // the driver.
                Event::TraceStarted { .. } => {}
                Event::Patched { key, patch } => {
                    replay.patches.insert((key.clone(), patch.clone()));
                }
                Event::RetryNowRequested { .. } => {
                    let steps = replay.steps.values_mut().map(|s| &mut s.attempts);
                    let compensations = replay.compensations.values_mut().map(|c| &mut c.attempts);
                    for attempts in steps.chain(compensations) {
                        attempts.retry_at = attempts.retry_at.map(|due| due.min(recorded.at));
                    }
                }
                Event::CompensationRetryRequested { .. } => {
                    // The failed compensation gets a new round of attempts; the saga is no
                    // longer finished.
                    for compensation in replay.compensations.values_mut() {
                        if compensation.failed.take().is_some() {
                            compensation.attempts = Attempts::default();
                        }
                    }
                    replay.finished = None;
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

    fn start_step(
        &mut self,
        seq: u64,
        step: u32,
        key: String,
        name: &str,
        input: &[u8],
    ) -> Result<(), String> {
        if self.steps.contains_key(&step) {
            return Err(format!("event {seq} starts step {step} a second time"));
        }
        self.start_op(seq, &key, RecordedOp::Step(step))?;
        self.steps.insert(
            step,
            StepHistory {
                name: name.to_owned(),
                input: input.to_vec(),
                attempts: Attempts { started: 1, retry_at: None, failed: 0 },
                completed: None,
                failed: None,
                cancelled: None,
            },
        );
        self.next_step = self.next_step.max(step + 1);
        Ok(())
    }

    fn start_op(&mut self, seq: u64, key: &str, op: RecordedOp) -> Result<(), String> {
        if self.ops.contains_key(key) {
            return Err(format!("event {seq} starts operation {key} a second time"));
        }
        self.ops.insert(key.to_owned(), (self.keys.len(), op));
        self.keys.push(key.to_owned());
        Ok(())
    }

    fn op_mut(&mut self, key: &str) -> Option<&mut RecordedOp> {
        self.ops.get_mut(key).map(|(_, op)| op)
    }

    /// Whether the journal says the body ended (returned, failed or was cancelled), so that
    /// code past its last recorded operation was never reached.
    pub fn body_ended(&self) -> bool {
        self.finished.is_some() || self.body_failed.is_some() || self.cancel.is_some()
    }

    /// The recorded operation at `key`, with its position in journal order.
    pub fn op(&self, key: &str) -> Option<&(usize, RecordedOp)> {
        self.ops.get(key)
    }

    /// The signals some recorded wait took: no live wait may take them again.
    pub fn consumed_signals(&self) -> impl Iterator<Item = u64> + '_ {
        self.ops.values().filter_map(|(_, op)| match op {
            RecordedOp::Wait { end: Some(WaitEnd::Consumed(seq)), .. } => Some(*seq),
            _ => None,
        })
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
        assert_eq!(replay.steps[&0].completed, Some(vec![9]));
        assert_eq!(
            replay.steps[&1].attempts,
            Attempts { started: 1, retry_at: Some(Timestamp(99)), failed: 1 }
        );
        assert!(!replay.steps[&1].attempts.interrupted());

        let mut more = history.to_vec();
        more.push(at(5, Event::StepRetried { step: 1, attempt: 2 }));
        let replay = Replay::new(&more).unwrap();
        assert_eq!(replay.steps[&1].attempts.started, 2);
        assert!(replay.steps[&1].attempts.interrupted(), "attempt 2 started and never reported");
    }

    #[test]
    fn a_journaled_trace_context_changes_nothing_replay_decides() {
        let plain = [
            at(0, Event::SagaStarted { definition: "d".into(), version: 1, input: vec![] }),
            at(1, Event::StepStarted { step: 0, name: "a".into(), input: vec![1], compensable: true }),
            at(2, Event::StepCompleted { step: 0, output: vec![9] }),
            at(3, Event::TimerStarted { key: "1".into(), due: Timestamp(50) }),
        ];
        let mut traced = plain.to_vec();
        let context = Event::TraceStarted {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        };
        traced.insert(1, at(1, context));
        for (seq, recorded) in traced.iter_mut().enumerate() {
            recorded.seq = seq as u64;
        }
        let (plain, traced) = (Replay::new(&plain).unwrap(), Replay::new(&traced).unwrap());
        assert_eq!(traced.keys, plain.keys);
        assert_eq!(traced.next_step, plain.next_step);
        assert_eq!(traced.steps[&0].completed, plain.steps[&0].completed);
        assert!(matches!(traced.op("1"), Some((_, RecordedOp::Timer { fired: false, .. }))));
    }

    #[test]
    fn operator_requests_are_replayed_as_the_first_run_saw_them() {
        let history = [
            at(0, Event::SagaStarted { definition: "d".into(), version: 1, input: vec![] }),
            at(1, Event::SignalReceivedBy { name: "go".into(), payload: vec![1], by: "ops".into() }),
            at(2, Event::StepStarted { step: 0, name: "a".into(), input: vec![], compensable: true }),
            at(
                3,
                Event::StepAttemptFailed {
                    step: 0,
                    attempt: 1,
                    error: "e".into(),
                    retry_at: Timestamp(3_600),
                },
            ),
            at(4, Event::Paused { by: "ops".into() }),
            at(5, Event::RetryNowRequested { by: "ops".into() }),
            at(6, Event::CancelRequestedBy { reason: "stop".into(), by: "ops".into() }),
        ];
        let replay = Replay::new(&history).unwrap();
        assert_eq!(replay.signals[&1], ("go".into(), vec![1]));
        // Due at the request, not at the backoff the failure named.
        assert_eq!(replay.steps[&0].attempts.retry_at, Some(Timestamp(5)));
        assert_eq!(replay.cancel.as_deref(), Some("stop"));

        let mut more = history.to_vec();
        more.extend([
            at(7, Event::CompensationStarted { step: 0, attempt: 1 }),
            at(8, Event::CompensationFailed { step: 0, error: "e".into() }),
            at(9, Event::SagaCompensationFailed { step: 0, error: "e".into(), undone: vec![0] }),
            at(10, Event::CompensationRetryRequested { by: "ops".into() }),
        ]);
        let replay = Replay::new(&more).unwrap();
        assert_eq!(replay.compensations[&0], CompensationHistory::default(), "a new round of attempts");
        assert_eq!(replay.finished, None);
    }

    #[test]
    fn inconsistent_journals_are_reported() {
        let history = [at(0, Event::StepCompleted { step: 3, output: vec![] })];
        assert!(Replay::new(&history).unwrap_err().contains("step 3"));
        let start = Event::StepStarted { step: 1, name: "x".into(), input: vec![], compensable: false };
        let history = [at(0, start.clone()), at(1, start)];
        assert!(Replay::new(&history).unwrap_err().contains("second time"));
        let history = [at(0, Event::TimerFired { key: "4".into() })];
        assert!(Replay::new(&history).unwrap_err().contains("operation 4"));
        let history = [
            at(0, Event::SignalWaitStarted { key: "0".into(), name: "go".into(), timeout_at: None }),
            at(1, Event::SignalConsumed { key: "0".into(), signal: 7 }),
        ];
        assert!(Replay::new(&history).unwrap_err().contains("never arrived"));
    }

    #[test]
    fn branches_are_indexed_by_key_in_finishing_order() {
        let history = [
            at(
                0,
                Event::BranchesStarted { key: "0".into(), name: "g".into(), count: 2, mode: JoinMode::All },
            ),
            at(
                1,
                Event::StepStartedAt {
                    step: 0,
                    key: "0.1.0".into(),
                    name: "b".into(),
                    input: vec![],
                    compensable: true,
                },
            ),
            at(
                2,
                Event::StepStartedAt {
                    step: 1,
                    key: "0.0.0".into(),
                    name: "a".into(),
                    input: vec![],
                    compensable: true,
                },
            ),
            at(3, Event::StepCompleted { step: 1, output: vec![] }),
            at(4, Event::BranchFinished { key: "0".into(), branch: 0, error: None }),
            at(5, Event::StepFailed { step: 0, error: "e".into(), retryable: false }),
            at(6, Event::BranchFinished { key: "0".into(), branch: 1, error: Some(("e".into(), false)) }),
        ];
        let replay = Replay::new(&history).unwrap();
        assert_eq!(replay.op("0.0.0").map(|o| &o.1), Some(&RecordedOp::Step(1)));
        let Some((_, RecordedOp::Group(group))) = replay.op("0") else { panic!("no group") };
        assert_eq!(group.finished, vec![(0, None), (1, Some(("e".into(), false)))]);
        assert_eq!(replay.next_step, 2);
    }
}
