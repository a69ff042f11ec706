use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::handle::SagaHandle;
use super::start::saga_started;
use super::state::Engine;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, Timestamp};
use crate::lock::lock;

impl Engine {
    /// Starts a new run `id` of a finished (or failed) saga that reuses the recorded outputs of
    /// the steps `source` completed before it started step `from_step`, then runs live from
    /// there. Both journals link to each other: the fork's begins with `ForkedFrom`, and the
    /// source's gets `Forked` after its end. Timers, signal waits and branches the source
    /// finished before that point are reused as well; anything unfinished there runs again.
    pub async fn fork(&self, source: &SagaId, from_step: u32, id: impl Into<String>) -> Result<SagaHandle> {
        let inner = &self.inner;
        let id = SagaId::new(id)?;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let fork_error = |reason: String| Error::Fork { saga: source.clone(), reason };
        let record = self.status(source)?;
        if !record.status.is_final() {
            return Err(fork_error(format!(
                "it is still {}; fork a run that has finished",
                record.status.kind()
            )));
        }
        let history = self.history(source)?;
        let Some(Event::SagaStarted { definition, version, input }) = history.first().map(|r| &r.event)
        else {
            return Err(fork_error("its journal does not begin with SagaStarted".into()));
        };
        let definition = inner
            .registry
            .get(definition, Some(*version))
            .ok_or_else(|| Error::UnknownSaga { name: definition.clone(), version: Some(*version) })?;
        let cut = history
            .iter()
            .position(|r| r.event.step_start().is_some_and(|(step, _)| step == from_step))
            .ok_or_else(|| fork_error(format!("it never started a step {from_step}")))?;
        let now = Timestamp::now();
        let first = saga_started(&definition, input, now);
        let mut rest = vec![Event::ForkedFrom { source: source.clone(), step: from_step }];
        rest.extend(fork_prefix(&history[..cut], 2));
        let rest: Vec<RecordedEvent> =
            rest.into_iter().zip(1..).map(|(event, seq)| RecordedEvent { seq, at: now, event }).collect();
        let fork = SagaRecord::new(id.clone(), definition.name.clone(), definition.version, now);
        {
            let _live = lock(&inner.live);
            if inner.store.create(&fork, &first)?.is_some() {
                return Err(Error::IdempotencyConflict { id, difference: "an existing run".into() });
            }
            inner.store.append(&id, &rest, Some(&fork))?;
        }
        inner.observe_start(&definition.name);
        let link = RecordedEvent {
            seq: history.len() as u64,
            at: now,
            event: Event::Forked { fork: id.clone(), step: from_step },
        };
        inner.store.append(source, &[link], None)?;
        inner.store.durable().await?;
        tracing::info!(saga.id = %id, source = %source, step = from_step, "forked");
        inner.adopt(fork)?;
        Ok(SagaHandle { id, inner: inner.clone() })
    }
}

/// The part of a journal a fork reuses: what finished before the fork point, renumbered from
/// `first_seq`. Unfinished attempts, failures, cancels and compensations are left out, so the
/// fork runs them live.
fn fork_prefix(prefix: &[RecordedEvent], first_seq: u64) -> Vec<Event> {
    use std::collections::HashSet;
    let mut completed = HashSet::new();
    let mut resolved = HashSet::new();
    for recorded in prefix {
        match &recorded.event {
            Event::StepCompleted { step, .. } => {
                completed.insert(*step);
            }
            Event::TimerFired { key }
            | Event::SignalConsumed { key, .. }
            | Event::SignalWaitTimedOut { key } => {
                resolved.insert(key.as_str());
            }
            _ => {}
        }
    }
    let mut renumbered = HashMap::new();
    let mut kept = Vec::new();
    for recorded in prefix {
        let keep = match &recorded.event {
            Event::StepStarted { step, .. }
            | Event::StepStartedAt { step, .. }
            | Event::StepCompleted { step, .. } => completed.contains(step),
            Event::TimerStarted { key, .. }
            | Event::TimerFired { key }
            | Event::SignalWaitExpects { key, .. }
            | Event::SignalWaitStarted { key, .. }
            | Event::SignalConsumed { key, .. }
            | Event::SignalWaitTimedOut { key } => resolved.contains(key.as_str()),
            Event::SignalReceived { .. } | Event::SignalReceivedBy { .. } | Event::BranchesStarted { .. } => {
                true
            }
            Event::BranchFinished { error, .. } => error.is_none(),
            _ => false,
        };
        if !keep {
            continue;
        }
        let seq = first_seq + kept.len() as u64;
        let event = match &recorded.event {
            Event::SignalReceived { .. } | Event::SignalReceivedBy { .. } => {
                renumbered.insert(recorded.seq, seq);
                recorded.event.clone()
            }
            Event::SignalConsumed { key, signal } => match renumbered.get(signal) {
                Some(signal) => Event::SignalConsumed { key: key.clone(), signal: *signal },
                None => continue,
            },
            other => other.clone(),
        };
        kept.push(event);
    }
    kept
}
