//! A saga's journal as text a person can read: one line per event, with the time since the
//! start and step names resolved.

use std::collections::HashMap;
use std::fmt;

use crate::event::{Event, RecordedEvent};

/// Displays a journal as a timeline:
///
/// ```text
///   +   0 ms  #0  saga started (release v1)
///   +   1 ms  #1  build started
///   +   2 ms  #2  build attempt 1 failed: registry returned 503 (retry due)
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Timeline<'a>(pub &'a [RecordedEvent]);

impl fmt::Display for Timeline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let start = self.0.first().map_or(0, |r| r.at.0);
        let mut names = HashMap::new();
        for recorded in self.0 {
            if let Some((step, name)) = recorded.event.step_start() {
                names.insert(step, name);
            }
            let name = |step: &u32| names.get(step).map_or_else(|| format!("step {step}"), |n| n.to_string());
            let line = match &recorded.event {
                Event::SagaStarted { definition, version, .. } => {
                    format!("saga started ({definition} v{version})")
                }
                Event::StepStarted { step, .. } => format!("{} started", name(step)),
                Event::StepStartedAt { step, key, .. } => format!("{} started (at {key})", name(step)),
                Event::TimerStarted { key, due } => {
                    format!("timer {key} set for +{} ms", due.0.saturating_sub(start))
                }
                Event::TimerFired { key } => format!("timer {key} fired"),
                Event::SignalReceived { name, .. } => format!("signal `{name}` received"),
                Event::SignalReceivedBy { name, by, .. } => format!("signal `{name}` sent by {by}"),
                Event::SignalWaitStarted { name, timeout_at: None, .. } => {
                    format!("waiting for signal `{name}`")
                }
                Event::SignalWaitStarted { name, timeout_at: Some(at), .. } => {
                    format!("waiting for signal `{name}` until +{} ms", at.0.saturating_sub(start))
                }
                Event::SignalWaitExpects { key, .. } => format!("wait {key} expects a typed payload"),
                Event::Patched { key, patch } => format!("took patch `{patch}` (before {key})"),
                Event::SignalConsumed { signal, .. } => format!("took the signal of #{signal}"),
                Event::SignalWaitTimedOut { key } => format!("wait {key} timed out"),
                Event::BranchesStarted { name, count, mode, .. } => {
                    format!("{count} branches of `{name}` started ({mode:?})")
                }
                Event::BranchFinished { key, branch, error: None } => {
                    format!("branch {key}.{branch} finished")
                }
                Event::BranchFinished { key, branch, error: Some((error, _)) } => {
                    format!("branch {key}.{branch} failed: {error}")
                }
                Event::ForkedFrom { source, step } => format!("forked from `{source}` at step {step}"),
                Event::Forked { fork, step } => format!("forked into `{fork}` from step {step}"),
                Event::StepRetried { step, attempt } => format!("{} attempt {attempt} started", name(step)),
                Event::StepAttemptFailed { step, attempt, error, .. } => {
                    format!("{} attempt {attempt} failed: {error} (retry due)", name(step))
                }
                Event::StepCompleted { step, .. } => format!("{} completed", name(step)),
                Event::StepFailed { step, error, .. } => format!("{} failed for good: {error}", name(step)),
                Event::StepCancelled { step, reason } => format!("{} stopped: {reason}", name(step)),
                Event::BodyFailed { cause } => format!("saga failed: {cause}; compensating"),
                Event::CancelRequested { reason } => format!("cancel requested: {reason}; compensating"),
                Event::CancelRequestedBy { reason, by } => {
                    format!("cancel requested by {by}: {reason}; compensating")
                }
                Event::Paused { by } => format!("paused by {by}"),
                Event::Resumed { by } => format!("resumed by {by}"),
                Event::RetryNowRequested { by } => format!("retry now requested by {by}"),
                Event::CompensationRetryRequested { by } => {
                    format!("compensation retry requested by {by}; compensating")
                }
                Event::CompensationStarted { step, attempt } => match attempt {
                    1 => format!("compensating {}", name(step)),
                    _ => format!("compensating {} (attempt {attempt})", name(step)),
                },
                Event::CompensationAttemptFailed { step, error, .. } => {
                    format!("compensating {} failed: {error} (retry due)", name(step))
                }
                Event::CompensationCompleted { step } => format!("{} compensated", name(step)),
                Event::CompensationFailed { step, error } => {
                    format!("compensation of {} failed for good: {error}", name(step))
                }
                Event::TraceStarted { traceparent, .. } => match recorded.event.trace_context() {
                    Some(context) => format!("traced as {}", context.trace_id_hex()),
                    None => format!("trace context ignored: `{traceparent}` is malformed"),
                },
                Event::SagaCompleted { .. } => "saga completed".into(),
                Event::SagaFailed { cause } => format!("saga failed: {cause}"),
                Event::SagaCompensated { .. } => "saga compensated".into(),
                Event::SagaCompensationFailed { step, undone, .. } => {
                    let undone: Vec<_> = undone.iter().map(name).collect();
                    format!(
                        "saga stopped: compensation of {} failed; left undone: {}",
                        name(step),
                        undone.join(", ")
                    )
                }
            };
            writeln!(f, "  +{:>5} ms  #{:<3} {line}", recorded.at.0.saturating_sub(start), recorded.seq)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Timestamp;

    #[test]
    fn names_steps_and_times_from_the_start() {
        let at = |seq, ms: u64, event| RecordedEvent { seq, at: Timestamp(1_000 + ms), event };
        let journal = [
            at(0, 0, Event::SagaStarted { definition: "ci".into(), version: 2, input: vec![] }),
            at(1, 3, Event::StepStarted { step: 0, name: "build".into(), input: vec![], compensable: true }),
            at(2, 40, Event::StepFailed { step: 0, error: "exit 1".into(), retryable: false }),
            at(3, 41, Event::SagaCompensationFailed { step: 0, error: "e".into(), undone: vec![0] }),
        ];
        let text = Timeline(&journal).to_string();
        assert_eq!(
            text,
            "  +    0 ms  #0   saga started (ci v2)\n\
             \x20 +    3 ms  #1   build started\n\
             \x20 +   40 ms  #2   build failed for good: exit 1\n\
             \x20 +   41 ms  #3   saga stopped: compensation of build failed; left undone: build\n"
        );
    }

    #[test]
    fn a_journaled_trace_context_shows_its_trace_id() {
        let traced = |traceparent: &str| {
            let at = |seq, event| RecordedEvent { seq, at: Timestamp(5), event };
            let journal = [
                at(0, Event::SagaStarted { definition: "ci".into(), version: 1, input: vec![] }),
                at(1, Event::TraceStarted { traceparent: traceparent.into(), tracestate: String::new() }),
            ];
            Timeline(&journal).to_string()
        };
        let good = traced("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(good.ends_with("#1   traced as 4bf92f3577b34da6a3ce929d0e0e4736\n"), "{good}");
        let bad = traced("00-nonsense");
        assert!(bad.ends_with("#1   trace context ignored: `00-nonsense` is malformed\n"), "{bad}");
    }
}
