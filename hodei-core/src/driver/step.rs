//! A step: replayed from the journal, or run live with durable retries.

use std::future::Future;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tracing::Instrument;

use super::attempt::{AttemptLog, Attempted, Cancels, record_outcome};
use super::interrupt::Interrupt;
use super::scope::Scope;
use super::shared::{Pending, SagaShared};
use super::spec::StepSpec;
use crate::event::{Event, SagaId};
use crate::lock::lock;
use crate::replay::RecordedOp;
use crate::retry::StepError;
use crate::step_context::StepContext;

/// `saga id/operation key`: the key external systems see for a step.
fn idempotency_key(id: &SagaId, key: &str) -> String {
    format!("{id}/{key}")
}

impl SagaShared {
    /// Runs one step, or returns its journaled result. Returns the step number with the
    /// encoded output. `same_input` says whether a journaled input holds the value the code
    /// passes now (see `codec::same_value`).
    pub async fn run_step<A, Fut, S>(
        &self,
        scope: &Scope,
        spec: &StepSpec,
        same_input: S,
        mut attempt: A,
    ) -> Result<(u32, Vec<u8>), StepError>
    where
        A: FnMut(StepContext, &[u8]) -> Fut,
        Fut: Future<Output = Result<Vec<u8>, StepError>>,
        S: FnOnce(&[u8]) -> Result<bool, String>,
    {
        let key = scope.next_key();
        if spec.input.len() > self.host.max_payload {
            return Err(StepError::terminal(format!(
                "step `{}`: the input is {} bytes, over the limit of {} bytes",
                spec.name,
                spec.input.len(),
                self.host.max_payload
            )));
        }
        let recorded = match self.recorded(&key) {
            None => None,
            Some(RecordedOp::Step(step)) => self.replay.steps.get(step).map(|history| (*step, history)),
            Some(other) => return self.mismatch(&key, format!("runs step `{}`", spec.name), other).await,
        };
        if let Some((step, recorded)) = recorded {
            if recorded.name != spec.name {
                let reason = format!(
                    "step {step}: the code now calls `{}`, but the journal recorded `{}` there",
                    spec.name, recorded.name
                );
                return self.park(reason).await;
            }
            // Compared as values of the code's type, not as bytes: the journal may hold them in
            // an older codec, or from before the type gained an optional field.
            let differs = match same_input(&recorded.input) {
                Ok(true) => None,
                Ok(false) => Some("the code now passes another input than the journal recorded".to_string()),
                Err(e) => {
                    Some(format!("the journaled input does not decode as the type the code now passes: {e}"))
                }
            };
            if let Some(differs) = differs {
                return self.park(format!("step {step} `{}`: {differs}", spec.name)).await;
            }
        }
        let what = format!("step `{}`", spec.name);
        let step = match recorded {
            Some((step, _)) => step,
            None => {
                self.go_live(scope, &what).await;
                self.next_step.fetch_add(1, Ordering::SeqCst)
            }
        };
        // A started step's compensation is pushed even when its completion was never recorded,
        // so that a side effect that may have happened is undone too.
        let slot = spec.compensation.as_ref().map(|c| {
            let mut stack = lock(&self.stack);
            stack.push(Pending {
                step,
                key: idempotency_key(&self.id, &key),
                name: spec.name.clone(),
                input: spec.input.clone(),
                output: None,
                spec: c.clone(),
            });
            stack.len() - 1
        });
        let set_output = |output: &Vec<u8>| {
            if let Some(slot) = slot {
                lock(&self.stack)[slot].output = Some(output.clone());
            }
        };
        if let Some((_, recorded)) = recorded {
            if let Some(output) = &recorded.completed {
                set_output(output);
                return Ok((step, output.clone()));
            }
            if let Some((message, retryable)) = &recorded.failed {
                let e = if *retryable { StepError::retryable(message) } else { StepError::terminal(message) };
                return Err(e);
            }
            // Stopped by a cancel: only a cancelled saga or a branch its group decided without
            // (frozen on replay) journals that, and neither goes on past it.
            if recorded.cancelled.is_some() {
                self.go_live(scope, &what).await;
                let reason = format!("{what}: the journal says it was cancelled, but the code now goes on");
                return self.park(reason).await;
            }
            // Started, never finished: the process stopped in it. It goes on live.
            self.go_live(scope, &what).await;
        }

        let idempotency = idempotency_key(&self.id, &key);
        let compensable = spec.compensation.is_some();
        let plain = scope.is_root() && key == step.to_string();
        let stop = watch::Sender::new(None);
        let log = AttemptLog {
            journal: &self.journal,
            timers: &self.host.timers,
            control: &self.control,
            cancels: Some(Cancels {
                scope,
                stop: &stop,
                wind_down: spec.options.wind_down,
                saga: &self.attempts,
            }),
            interruptions_count: spec.options.interruptions_count,
            policy: spec.options.retry,
            timeout: spec.options.timeout,
            key: &idempotency,
            what: &what,
            started: |attempt| match attempt {
                1 if plain => Event::StepStarted {
                    step,
                    name: spec.name.clone(),
                    input: spec.input.clone(),
                    compensable,
                },
                1 => Event::StepStartedAt {
                    step,
                    key: key.clone(),
                    name: spec.name.clone(),
                    input: spec.input.clone(),
                    compensable,
                },
                _ => Event::StepRetried { step, attempt },
            },
            failed: |attempt, error, retry_at| Event::StepAttemptFailed { step, attempt, error, retry_at },
        };
        let history = recorded.map(|(_, r)| r.attempts.clone()).unwrap_or_default();
        // Only a step that runs live has a span: one the journal answers did no work now.
        let span = tracing::info_span!(
            "step",
            // As `&str`, not `%`: a string is recorded as it is, with no formatter run for it.
            hodei.saga.id = self.id.as_str(),
            hodei.step.name = spec.name.as_str(),
            hodei.step.index = step,
            hodei.step.key = key.as_str(),
            hodei.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        let attempted = log
            .run(history, |n| {
                let ctx = StepContext {
                    saga_id: self.id.clone(),
                    step,
                    name: spec.name.clone(),
                    attempt: n,
                    idempotency_key: idempotency.clone(),
                    signals: self.control.signals(stop.subscribe()),
                    resources: self.host.resources.clone(),
                };
                attempt(ctx, &spec.input)
            })
            .instrument(span.clone())
            .await;
        record_outcome(&span, &attempted);
        let result = match attempted {
            Attempted::Stopped(why, started) => {
                if let Interrupt::Cancelled(reason) | Interrupt::BranchCancelled(reason) = &why {
                    if started > 0 {
                        // Every started step ends in the journal.
                        self.durably(Event::StepCancelled { step, reason: reason.clone() }).await;
                    } else if slot.is_some() {
                        // Stopped before its first attempt: it never started, so nothing of it
                        // is to be undone.
                        lock(&self.stack).retain(|pending| pending.step != step);
                    }
                }
                return match why {
                    Interrupt::BranchCancelled(_) => scope.stop().await,
                    why => self.suspend(why).await,
                };
            }
            Attempted::Done(Ok(output)) if output.len() > self.host.max_payload => {
                Err(StepError::terminal(format!(
                    "step `{}`: the output is {} bytes, over the limit of {} bytes",
                    spec.name,
                    output.len(),
                    self.host.max_payload
                )))
            }
            Attempted::Done(result) => result,
        };
        let event = match &result {
            Ok(output) => Event::StepCompleted { step, output: output.clone() },
            Err(e) => Event::StepFailed { step, error: e.message().to_string(), retryable: e.is_retryable() },
        };
        // Durable before the body sees the result: whatever the body does next (awaits
        // something unjournaled, computes, blocks, panics), a kill can no longer make this step
        // run again or turn its finished attempt into an interrupted one.
        self.durably(event).await;
        let output = result?;
        set_output(&output);
        Ok((step, output))
    }
}
