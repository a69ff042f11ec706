//! The compensation phase: undoing a failed or cancelled saga's started steps.

use tracing::Instrument;

use super::attempt::{AttemptLog, Attempted, record_outcome};
use super::ending::{finish, park, unwritable};
use super::interrupt::Interrupt;
use super::live::LiveSaga;
use super::shared::SagaShared;
use super::spec::RawCompensation;
use crate::event::{Event, RecordedEvent, SagaStatus};
use crate::lock::lock;
use crate::retry::StepError;

/// Runs the compensation stack in reverse order, then records the saga's end.
pub(super) async fn compensate(live: &LiveSaga, shared: &SagaShared, cause: String) -> Option<RecordedEvent> {
    let journal = &live.journal;
    let mut stack = std::mem::take(&mut *lock(&shared.stack));
    // Step numbers follow the order steps first started, in the first run as in replay, while
    // the stack's order depends on how concurrent branches happened to interleave.
    stack.sort_by_key(|pending| pending.step);
    if stack.is_empty() {
        return finish(live, Event::SagaFailed { cause: cause.clone() }, SagaStatus::Failed).await;
    }
    let first_failure = shared.replay.body_failed.is_none() && shared.cancel_reason().is_none();
    let entering = first_failure.then(|| Event::BodyFailed { cause: cause.clone() });
    if (entering.is_some() || journal.record().status != SagaStatus::Compensating)
        && let Err(e) = journal.transition(entering, SagaStatus::Compensating).await
    {
        return park(live, unwritable(&e)).await;
    }
    tracing::info!(cause = %cause, steps = stack.len(), "compensating");
    for (position, pending) in stack.iter().enumerate().rev() {
        let history = shared.replay.compensations.get(&pending.step).cloned().unwrap_or_default();
        if history.completed {
            continue;
        }
        let step = pending.step;
        let key = &pending.key;
        let what = format!("compensation of step `{}`", pending.name);
        let result = match history.failed {
            Some(error) => Attempted::Done(Err(StepError::terminal(error))),
            None => {
                // A pause holds between compensations as between operations: the one running
                // finishes, the next waits. Only shutdown ends the wait; a cancel lifts the
                // pause, and a cancel is what compensating already is.
                if live.control.is_paused() {
                    tracing::info!(step, "paused; the next compensation waits to be resumed");
                    tokio::select! {
                        () = live.control.resumed() => {}
                        _ = live.control.stopped(false) => return None,
                    }
                }
                let log = AttemptLog {
                    journal,
                    timers: &shared.host.timers,
                    control: &live.control,
                    cancels: None,
                    interruptions_count: true,
                    policy: pending.spec.retry,
                    timeout: pending.spec.timeout,
                    key,
                    what: &what,
                    started: |attempt| Event::CompensationStarted { step, attempt },
                    failed: |attempt, error, retry_at| Event::CompensationAttemptFailed {
                        step,
                        attempt,
                        error,
                        retry_at,
                    },
                };
                let span = tracing::info_span!(
                    "compensation",
                    hodei.saga.id = %shared.id,
                    hodei.step.name = %pending.name,
                    hodei.step.index = step,
                    hodei.outcome = tracing::field::Empty,
                    otel.status_code = tracing::field::Empty,
                    otel.status_description = tracing::field::Empty,
                );
                let attempted = log
                    .run(history.attempts, |attempt| {
                        (pending.spec.run)(RawCompensation {
                            saga_id: shared.id.clone(),
                            step,
                            name: pending.name.clone(),
                            attempt,
                            idempotency_key: key.clone(),
                            input: pending.input.clone(),
                            output: pending.output.clone(),
                            resources: shared.host.resources.clone(),
                        })
                    })
                    .instrument(span.clone())
                    .await;
                record_outcome(&span, &attempted);
                attempted
            }
        };
        let written = match result {
            Attempted::Stopped(Interrupt::Storage(e), _) => {
                return park(live, unwritable(&e)).await;
            }
            Attempted::Stopped(..) => return None,
            Attempted::Done(Ok(())) => journal.append_durable(Event::CompensationCompleted { step }).await,
            Attempted::Done(Err(e)) => {
                let error = e.message().to_string();
                if let Err(e) =
                    journal.append_durable(Event::CompensationFailed { step, error: error.clone() }).await
                {
                    return park(live, unwritable(&e)).await;
                }
                let undone = stack[..=position].iter().rev().map(|p| p.step).collect();
                let end = Event::SagaCompensationFailed { step, error, undone };
                return finish(live, end, SagaStatus::CompensationFailed).await;
            }
        };
        if let Err(e) = written {
            return park(live, unwritable(&e)).await;
        }
    }
    finish(live, Event::SagaCompensated { cause }, SagaStatus::Compensated).await
}
