//! Forking a run: a new run that reuses what another one recorded before a step, then runs live
//! from there, on the source's version or another one. A stranded source (parked, or waiting for
//! a version no process registers) is moved: it ends, and its fork carries on in its place.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::handle::SagaHandle;
use super::start::saga_started;
use super::state::Engine;
use crate::driver::{LiveSaga, final_status};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus};
use crate::lock::lock;
use crate::replay_check::ReplayVerdict;
use crate::saga::SagaDefinition;

impl Engine {
    /// Starts a new run `id` of a finished or stranded saga that reuses what `source` recorded
    /// before it started step `from_step`, then runs live from there, on the source's version.
    ///
    /// [`fork_onto`](Self::fork_onto) with that step and the default version: see it for what
    /// is reused, which runs can be forked and what becomes of a stranded source.
    pub async fn fork(&self, source: &SagaId, from_step: u32, id: impl Into<String>) -> Result<SagaHandle> {
        self.fork_onto(source, None, Some(from_step), id).await
    }

    /// Starts a new run `id` that reuses what `source` recorded before step `from_step`, then
    /// runs live from there as `version` of the source's definition.
    ///
    /// **What is reused**: everything the source finished before the fork point: the steps it
    /// completed (their recorded outputs; their bodies do not run again), the timers that fired,
    /// the signal waits that ended (with the signals they took), the signals it received, and the
    /// groups of branches it started with the branches that succeeded. Everything else runs
    /// live: a step that started but did not complete, and whatever followed. Failures,
    /// cancels, pauses and compensations are not carried over: forking a run that compensated
    /// reuses the outputs of steps whose compensation ran, without redoing them.
    ///
    /// **The fork point**: `from_step` is a step number the source started
    /// ([`Event::step_start`] gives each step's number and name). `None` forks from the source's
    /// last good step: the first step it started after the last top-level step it completed (for
    /// a run that failed in a step, that step), or, if it started none after it, the end of its
    /// journal, so that everything it finished is reused. A completed source has no such
    /// default: name the step to run again from.
    ///
    /// **The version**: `None` is the source's own version if it is registered, and otherwise
    /// the newest registered version of its definition (a run waiting for a version no process
    /// registers any more moves onto the current one). The version's code must call what is
    /// reused as the source recorded it (same step names and inputs), as a resumed run would:
    /// the fork's journal is replayed on it first, with nothing run (as
    /// [`check_journal`](Self::check_journal) does), and a fork that would park is refused with
    /// [`Error::Fork`], naming the difference: fork from an earlier step. The source's input must
    /// decode as the version's input type ([`Error::InvalidInput`]).
    ///
    /// **The source** must have finished, be [parked](SagaStatus::Parked) or
    /// [wait for its version](SagaStatus::WaitingForVersion): a running, compensating or paused
    /// run is refused with [`Error::Fork`]. A finished source is left as it ended. A stranded
    /// source is moved: it ends [`Failed`](SagaStatus::Failed) with the cause "moved to fork
    /// `<id>` ...", so that it is neither left in flight nor resumed by a later deploy, and
    /// whoever awaits its outcome gets that failure. Its steps are not compensated: the fork
    /// carries on what they did. A stranded run is moved only by the engine that holds it: on a
    /// store shared by several engines, one that another engine drives is refused with
    /// [`Error::Fork`]; fork it from that engine.
    ///
    /// Both journals link to each other: the fork's begins with `ForkedFrom`, and the source's
    /// gets `Forked` after its end. The fork's creation and the source's end are two writes:
    /// should the process die between them, the fork runs and the source is still stranded
    /// (cancel it). Fails with [`Error::SagaNotFound`] for an unknown source,
    /// [`Error::UnknownSaga`] for a version that is not registered, [`Error::IdempotencyConflict`]
    /// when `id` is taken, and [`Error::Fork`] for a step the source never started.
    ///
    /// ```
    /// use hodei_core::{Engine, MemoryStore, Outcome, SagaDefinition, SagaRun, StepError};
    ///
    /// /// `build`, then `deploy`, which version 1 gets wrong.
    /// fn release(version: u32) -> SagaDefinition {
    ///     SagaDefinition::new("release", version, move |ctx, app: String| async move {
    ///         let artifact = ctx
    ///             .step("build")
    ///             .input(app)
    ///             .run(|_, app: String| async move { Ok::<_, StepError>(format!("{app}.tar")) })
    ///             .await?;
    ///         ctx.step("deploy")
    ///             .input(artifact)
    ///             .run(move |_, artifact: String| async move {
    ///                 match version {
    ///                     1 => Err(StepError::terminal("wrong cluster")),
    ///                     _ => Ok(format!("{artifact} deployed")),
    ///                 }
    ///             })
    ///             .await
    ///     })
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let engine = Engine::builder()
    ///     .store(MemoryStore::new())
    ///     .register(release(1))
    ///     .register(release(2))
    ///     .start()
    ///     .await?;
    /// let run = engine.start(SagaRun::new("release", "r-1", &"app")?.version(1)).await?;
    /// assert!(matches!(run.outcome::<String>().await?, Outcome::Failed { .. }));
    ///
    /// // Onto version 2, from the step that failed: `build` is reused, `deploy` runs live.
    /// let fork = engine.fork_onto(run.id(), Some(2), None, "r-1-fixed").await?;
    /// assert_eq!(fork.outcome::<String>().await?, Outcome::Completed("app.tar deployed".into()));
    /// assert_eq!(fork.status()?.version, 2);
    /// # Ok(()) }
    /// ```
    pub async fn fork_onto(
        &self,
        source: &SagaId,
        version: Option<u32>,
        from_step: Option<u32>,
        id: impl Into<String>,
    ) -> Result<SagaHandle> {
        let id = SagaId::new(id)?;
        let ask = Ask { source, version, from_step, id };
        loop {
            if !self.inner.accepting.load(Ordering::SeqCst) {
                return Err(Error::ShuttingDown);
            }
            let Some(live) = self.inner.live(source) else {
                return self.fork_of(&ask, None).await;
            };
            // Held until the source is moved, so that no cancel, other fork or registration of
            // its version comes between the check that it is stranded and its end.
            let _requests = live.control.requests.lock().await;
            if !self.inner.live(source).is_some_and(|now| Arc::ptr_eq(&now, &live)) {
                // It ended, or its version was registered and it runs again: look again.
                continue;
            }
            let status = live.journal.record().status;
            return match status {
                SagaStatus::Parked { .. } | SagaStatus::WaitingForVersion => {
                    self.fork_of(&ask, Some(&live)).await
                }
                // Its end is written and its driver is letting go of it: a finished source.
                status if status.is_final() => self.fork_of(&ask, None).await,
                status => Err(ask.refused(format!(
                    "it is still {}; fork a run that has finished, is parked or waits for its version",
                    status.kind()
                ))),
            };
        }
    }

    /// Forks as `ask` says from a finished source, or from the stranded one `stranded`, whose
    /// requests the caller holds.
    async fn fork_of(&self, ask: &Ask<'_>, stranded: Option<&Arc<LiveSaga>>) -> Result<SagaHandle> {
        let inner = &self.inner;
        let source = ask.source;
        let record = match stranded {
            Some(live) => live.journal.record(),
            None => self.status(source)?,
        };
        if stranded.is_none() && !record.status.is_final() {
            // In flight, and not driven here: another engine sharing the store holds it, and only
            // that engine's journal of it may end it.
            return Err(ask.refused(format!(
                "it is {} and another engine drives it; fork it from that engine",
                record.status.kind()
            )));
        }
        let history = self.history(source)?;
        let Some(Event::SagaStarted { definition: name, version: recorded, input }) =
            history.first().map(|r| &r.event)
        else {
            return Err(ask.refused("its journal does not begin with SagaStarted".into()));
        };
        let definition = self.fork_definition(name, *recorded, ask.version)?;
        (definition.input.check)(input).map_err(|reason| Error::InvalidInput {
            definition: definition.name.clone(),
            version: definition.version,
            reason,
        })?;
        let (cut, from_step) = match ask.from_step {
            Some(step) => {
                let cut = history
                    .iter()
                    .position(|r| r.event.step_start().is_some_and(|(started, _)| started == step))
                    .ok_or_else(|| ask.refused(format!("it never started a step {step}")))?;
                (cut, step)
            }
            None if record.status == SagaStatus::Completed => {
                return Err(ask.refused("it completed; name the step to run again from".into()));
            }
            None => after_last_good_step(&history),
        };
        let now = inner.timers.now();
        let first = saga_started(&definition, input, now);
        let mut rest = vec![Event::ForkedFrom { source: source.clone(), step: from_step }];
        rest.extend(fork_prefix(&history[..cut], 2));
        let rest: Vec<RecordedEvent> =
            rest.into_iter().zip(1..).map(|(event, seq)| RecordedEvent { seq, at: now, event }).collect();
        // A fork that would park at once moves nothing: refused before anything is written.
        let journal: Vec<RecordedEvent> =
            std::iter::once(first.clone()).chain(rest.iter().cloned()).collect();
        match self.check_journal(&ask.id, &journal).await?.verdict {
            ReplayVerdict::WouldPark { reason } | ReplayVerdict::Stalled { reason } => {
                return Err(ask.refused(format!(
                    "version {} of `{}` does not replay what the fork would reuse ({reason}); fork from \
                     an earlier step",
                    definition.version, definition.name
                )));
            }
            _ => {}
        }
        let fork = SagaRecord::new(ask.id.clone(), definition.name.clone(), definition.version, now);
        {
            let _live = lock(&inner.live);
            if inner.store.create(&fork, &first)?.is_some() {
                return Err(Error::IdempotencyConflict {
                    id: ask.id.clone(),
                    difference: "an existing run".into(),
                });
            }
            inner.store.append(&ask.id, &rest, Some(&fork))?;
        }
        inner.observe_start(&definition.name);
        let link = Event::Forked { fork: ask.id.clone(), step: from_step };
        match stranded {
            None => {
                let link = RecordedEvent { seq: history.len() as u64, at: now, event: link };
                inner.store.append(source, &[link], None)?;
            }
            Some(live) => {
                let moved = format!(
                    "moved to fork `{}` (version {}, from step {from_step})",
                    ask.id, definition.version
                );
                if let Err(e) = self.end_stranded(live, Event::SagaFailed { cause: moved }, Some(link)).await
                {
                    // Never adopted: the fork ends before it runs anything, so that the source
                    // (still stranded) is not carried on twice.
                    let why = format!("its source `{source}` could not be moved to it: {e}");
                    abandon(self, &fork, rest.len() as u64 + 1, why);
                    return Err(e);
                }
            }
        }
        inner.store.durable().await?;
        tracing::info!(
            saga.id = %ask.id, source = %source, step = from_step, version = definition.version, "forked"
        );
        inner.adopt(fork)?;
        Ok(SagaHandle { id: ask.id.clone(), inner: inner.clone() })
    }

    /// The definition a fork runs: `asked`, or else the source's `recorded` version if it is
    /// registered, or else the newest one.
    fn fork_definition(&self, name: &str, recorded: u32, asked: Option<u32>) -> Result<SagaDefinition> {
        let registry = &self.inner.registry;
        let definition = match asked {
            Some(version) => registry.get(name, Some(version)),
            None => registry.get(name, Some(recorded)).or_else(|| registry.get(name, None)),
        };
        definition.ok_or_else(|| Error::UnknownSaga { name: name.to_owned(), version: asked })
    }

    /// Ends a stranded saga (parked, or waiting for its version) whose requests the caller
    /// holds: journals the final event `end` through its journal (followed by `link`, if any,
    /// as a fork's link), and lets its waiters and the live set know it finished. Nothing runs:
    /// a stranded saga has no driver.
    pub(super) async fn end_stranded(&self, live: &LiveSaga, end: Event, link: Option<Event>) -> Result<()> {
        let status = final_status(&end);
        let end = live.journal.transition(Some(end), status).await?;
        let end = end.ok_or_else(|| Error::SagaFinished(live.journal.id.clone()))?;
        if let Some(link) = link {
            // After the final event the journal takes nothing more, as for a fork of a finished
            // run. The source's end already names the fork, so a link lost here loses no fact.
            let link = RecordedEvent { seq: end.seq + 1, at: end.at, event: link };
            if let Err(e) = self.inner.store.append(&live.journal.id, &[link], None) {
                tracing::warn!(
                    saga.id = %live.journal.id, error = %e, "the link to the fork was not journaled"
                );
            }
        }
        tracing::info!(saga.id = %live.journal.id, "stranded saga ended");
        self.inner.finished(live, end);
        Ok(())
    }
}

/// What a fork was asked for.
struct Ask<'a> {
    source: &'a SagaId,
    version: Option<u32>,
    from_step: Option<u32>,
    id: SagaId,
}

impl Ask<'_> {
    fn refused(&self, reason: String) -> Error {
        Error::Fork { saga: self.source.clone(), reason }
    }
}

/// Ends a fork that was created but must not run, its journal's next sequence number being
/// `next_seq`. Should even that fail, the fork is in flight and runs on the next start.
fn abandon(engine: &Engine, fork: &SagaRecord, next_seq: u64, cause: String) {
    let inner = &engine.inner;
    let now = inner.timers.now();
    let mut ended = fork.clone();
    ended.status = SagaStatus::Failed;
    ended.updated_at = now;
    let end = RecordedEvent { seq: next_seq, at: now, event: Event::SagaFailed { cause } };
    if let Err(e) = inner.store.append(&fork.id, &[end], Some(&ended)) {
        tracing::error!(saga.id = %fork.id, error = %e, "a fork that must not run could not be ended");
    }
}

/// Where a fork that names no step starts, and the step it records as its fork point: the first
/// step the source started after the last top-level step it completed; or, if it started none
/// after it, the end of its journal and the number its next step would have had.
///
/// Only top-level steps count: branches run concurrently, so the last branch step to complete
/// says nothing about what the others had done.
fn after_last_good_step(history: &[RecordedEvent]) -> (usize, u32) {
    let top_level: HashSet<u32> = history
        .iter()
        .filter_map(|r| match &r.event {
            Event::StepStarted { step, .. } => Some(*step),
            Event::StepStartedAt { step, key, .. } if !key.contains('.') => Some(*step),
            _ => None,
        })
        .collect();
    let after = history
        .iter()
        .rposition(|r| matches!(&r.event, Event::StepCompleted { step, .. } if top_level.contains(step)))
        .map_or(0, |completed| completed + 1);
    let next = history[after..]
        .iter()
        .enumerate()
        .find_map(|(offset, r)| r.event.step_start().map(|(step, _)| (after + offset, step)));
    next.unwrap_or_else(|| {
        let next_step = history.iter().filter_map(|r| r.event.step_start()).map(|(step, _)| step + 1).max();
        (history.len(), next_step.unwrap_or(0))
    })
}

/// The part of a journal a fork reuses: what finished before the fork point, renumbered from
/// `first_seq`. Unfinished attempts, failures, cancels and compensations are left out, so the
/// fork runs them live.
fn fork_prefix(prefix: &[RecordedEvent], first_seq: u64) -> Vec<Event> {
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
            // A patch marker says which path the code took at its key; one whose operation is not
            // reused answers as a live call would (the new path).
            Event::SignalReceived { .. }
            | Event::SignalReceivedBy { .. }
            | Event::BranchesStarted { .. }
            | Event::Patched { .. } => true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Timestamp;

    fn journal(events: Vec<Event>) -> Vec<RecordedEvent> {
        events
            .into_iter()
            .zip(0..)
            .map(|(event, seq)| RecordedEvent { seq, at: Timestamp(seq), event })
            .collect()
    }

    fn started(step: u32, name: &str) -> Event {
        Event::StepStarted { step, name: name.into(), input: vec![], compensable: false }
    }

    fn completed(step: u32) -> Event {
        Event::StepCompleted { step, output: vec![] }
    }

    #[test]
    fn the_last_good_step_is_the_first_started_after_the_last_completed_top_level_step() {
        let begin = Event::SagaStarted { definition: "d".into(), version: 1, input: vec![] };
        let history = journal(vec![
            begin.clone(),
            started(0, "build"),
            completed(0),
            Event::TimerStarted { key: "1".into(), due: Timestamp(9) },
            Event::TimerFired { key: "1".into() },
            started(1, "test"),
        ]);
        assert_eq!(after_last_good_step(&history), (5, 1), "the timer that fired is before the cut");

        // A branch step that completed later does not move the cut past its group's start.
        let history = journal(vec![
            begin.clone(),
            started(0, "build"),
            completed(0),
            Event::BranchesStarted {
                key: "1".into(),
                name: "tests".into(),
                count: 2,
                mode: crate::event::JoinMode::All,
            },
            Event::StepStartedAt {
                step: 1,
                key: "1.0.0".into(),
                name: "a".into(),
                input: vec![],
                compensable: false,
            },
            Event::StepStartedAt {
                step: 2,
                key: "1.1.0".into(),
                name: "b".into(),
                input: vec![],
                compensable: false,
            },
            completed(2),
        ]);
        assert_eq!(after_last_good_step(&history), (4, 1));

        // Nothing started after the last completed step: the whole journal, and the next number.
        let history = journal(vec![begin.clone(), started(0, "build"), completed(0)]);
        assert_eq!(after_last_good_step(&history), (3, 1));
        // No step completed: from the first one.
        let history = journal(vec![begin, started(0, "build")]);
        assert_eq!(after_last_good_step(&history), (1, 0));
    }
}
