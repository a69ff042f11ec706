//! The durable primitives of issue 7, each on its own: timers, signals, concurrent branches,
//! child sagas, cancellation, fork, and the nondeterminism checks of branches. Crashes of the
//! process are in `primitives_crash.rs`; 10,000 sleeping sagas in `timers_scale.rs`.

mod support;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hodei_core::{
    Branch, Engine, Error, Event, MemoryStore, Outcome, SagaContext, SagaHandle, SagaId, SagaRun, SagaStatus,
    StepError, Timestamp,
};
use serde::de::DeserializeOwned;
use support::{Effects, engine_with, saga};
use tokio::sync::{oneshot, watch};

fn id(id: &str) -> SagaId {
    SagaId::new(id).unwrap()
}

/// Not a bound the engine is held to: it only turns a wait that can never end (a gate that
/// never opens, a timer that cannot fire while the test runs) into a failure instead of a
/// test run that hangs.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The saga's outcome; `hung` says what it means if it never comes.
async fn outcome_of<O: DeserializeOwned>(handle: &SagaHandle, hung: &str) -> Outcome<O> {
    match tokio::time::timeout(HANG_GUARD, handle.outcome::<O>()).await {
        Ok(outcome) => outcome.unwrap(),
        Err(_) => panic!("hung for {HANG_GUARD:?}: {hung}"),
    }
}

/// Orders concurrent work in place of timing: shut until opened, then open for good, for any
/// number of waiters.
#[derive(Clone)]
struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    async fn passed(&self) {
        // The sender lives as long as `self`, so this ends only when the gate opens.
        let _ = self.0.subscribe().wait_for(|open| *open).await;
    }

    /// For the test itself, which has no outcome to guard: `hung` says what it means if the
    /// gate never opens.
    async fn reached(&self, hung: &str) {
        if tokio::time::timeout(HANG_GUARD, self.passed()).await.is_err() {
            panic!("hung for {HANG_GUARD:?}: {hung}");
        }
    }
}

/// Counts the polls of a group of branches, so that a branch can wait until the group has
/// taken another branch's result. The journal's finishing order is the order the group takes
/// its branches' results in, and a branch's future having returned does not mean the group has
/// taken its result: its task still has to end and wake the group, so a branch that only waited
/// for another's return could still be taken first. A group waiting on its branches is woken by
/// nothing but their ends here (no cancel, no signal, no shutdown), so a poll that begins after
/// a branch returned and leaves the group waiting again has taken that branch's result.
#[derive(Clone)]
struct GroupPolls(Arc<watch::Sender<Polls>>);

#[derive(Default)]
struct Polls {
    begun: u64,
    /// The last poll that left the group waiting on its branches.
    waiting: u64,
}

impl GroupPolls {
    fn new() -> Self {
        Self(Arc::new(watch::Sender::new(Polls::default())))
    }

    async fn watch<F: Future>(&self, group: F) -> F::Output {
        let mut group = pin!(group);
        poll_fn(|cx| {
            let mut this = 0;
            self.0.send_if_modified(|polls| {
                polls.begun += 1;
                this = polls.begun;
                false
            });
            let polled = group.as_mut().poll(cx);
            if polled.is_pending() {
                self.0.send_modify(|polls| polls.waiting = this);
            }
            polled
        })
        .await
    }

    fn begun(&self) -> u64 {
        self.0.borrow().begun
    }

    /// Waits until poll `poll`, or a later one, has left the group waiting on its branches.
    async fn waiting_since(&self, poll: u64) {
        let _ = self.0.subscribe().wait_for(|polls| polls.waiting >= poll).await;
    }
}

/// A step that records its effect and returns its input's length.
async fn effect_step(ctx: &SagaContext, effects: &Effects, name: &str) -> Result<usize, StepError> {
    let effects = effects.clone();
    let label = name.to_owned();
    ctx.step(name)
        .run(move |_, ()| {
            let (effects, label) = (effects.clone(), label.clone());
            async move {
                effects.push(label.clone());
                Ok::<_, StepError>(label.len())
            }
        })
        .await
}

/// A compensable step that records its effect and its undo.
async fn undoable(ctx: &SagaContext, effects: &Effects, name: &str) -> Result<(), StepError> {
    let (run_effects, undo_effects) = (effects.clone(), effects.clone());
    ctx.step(name)
        .input(name.to_owned())
        .compensate(move |c: hodei_core::CompensationContext<String, ()>| {
            let effects = undo_effects.clone();
            async move {
                effects.push(format!("undo {}", c.input));
                Ok(())
            }
        })
        .run(move |_, name: String| {
            let effects = run_effects.clone();
            async move {
                effects.push(name);
                Ok::<_, StepError>(())
            }
        })
        .await
}

/// Starts a run, waits until it has set `timers` timers, and shuts the engine down: the run is
/// left asleep in its journal, as a crash would leave it.
async fn start_then_stop_asleep(engine: &Engine, run: SagaRun, timers: usize) {
    let mut journal = engine.subscribe();
    engine.start(run).await.unwrap();
    let mut set = 0;
    while set < timers {
        if let hodei_core::EngineEventKind::Journaled(r) = journal.recv().await.unwrap().kind {
            set += matches!(r.event, Event::TimerStarted { .. }) as usize;
        }
    }
    let report = engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(report.in_flight.len(), 1, "{report:?}");
}

fn events(engine: &Engine, saga: &str) -> Vec<Event> {
    engine.history(&id(saga)).unwrap().into_iter().map(|r| r.event).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_is_journaled_and_resumes_at_its_original_due_time_after_a_restart() {
    let store = Arc::new(MemoryStore::new());
    // After the restart the code asks for an hour: only the journaled due time can wake the
    // saga while the test runs, so a timer the restart re-armed from its length would hang.
    let sleeper = |resumed: bool| {
        saga("sleeper", 1, move |ctx: SagaContext, ms: u64| async move {
            let length = if resumed { Duration::from_secs(3600) } else { Duration::from_millis(ms) };
            ctx.sleep(length).await;
            Ok::<_, StepError>(Timestamp::now().0)
        })
    };
    let engine = engine_with(store.clone(), [sleeper(false)]).await;
    let started = Timestamp::now();
    let mut journal = engine.subscribe();
    engine.start(SagaRun::new("sleeper", "s-1", &600u64).unwrap()).await.unwrap();
    // Stopped while it sleeps: the timer is in the journal, the wait is not in memory any more.
    while !matches!(journal.recv().await.unwrap().kind, hodei_core::EngineEventKind::Journaled(ref r) if matches!(r.event, Event::TimerStarted { .. }))
    {
    }
    let report = engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(report.in_flight, vec![id("s-1")]);
    let due = match &events(&engine, "s-1")[1] {
        Event::TimerStarted { key, due } => {
            assert_eq!(key, "0");
            *due
        }
        other => panic!("expected TimerStarted, found {other:?}"),
    };
    assert!(due.0 >= started.0 + 600);

    let engine = engine_with(store, [sleeper(true)]).await;
    let handle = engine.handle(&id("s-1")).unwrap();
    let woke =
        match outcome_of::<u64>(&handle, "the restart re-armed the timer instead of keeping its due time")
            .await
        {
            Outcome::Completed(at) => at,
            other => panic!("unexpected {other:?}"),
        };
    assert!(woke >= due.0, "woke at {woke}, before its due time {}", due.0);
    assert!(matches!(events(&engine, "s-1")[2], Event::TimerFired { .. }));
}

fn approval_saga() -> hodei_core::SagaDefinition {
    saga("gate", 1, |ctx: SagaContext, timeout_ms: u64| async move {
        let who = ctx.wait_signal_timeout::<String>("approve", Duration::from_millis(timeout_ms)).await?;
        Ok::<_, StepError>(who.unwrap_or_else(|| "timed out".into()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_before_the_wait_during_it_or_after_its_timeout() {
    let signalled = Gate::new();
    let gate = signalled.clone();
    let waits_first = saga("waits-first", 1, move |ctx: SagaContext, ()| {
        let signalled = gate.clone();
        async move {
            // A step before the wait, held until the signal is journaled, so that it arrives
            // before the wait begins.
            ctx.step("hold")
                .run(move |_, ()| {
                    let signalled = signalled.clone();
                    async move {
                        signalled.passed().await;
                        Ok::<_, StepError>(())
                    }
                })
                .await?;
            let who: String = ctx.wait_signal("approve").await?;
            Ok::<_, StepError>(who)
        }
    });
    let engine = engine_with(MemoryStore::new(), [approval_saga(), waits_first]).await;

    // Before: the signal is journaled, kept, and taken when the wait begins.
    let early = engine.start(SagaRun::new("waits-first", "early", &()).unwrap()).await.unwrap();
    engine.signal(&id("early"), "approve", &"alice").await.unwrap();
    signalled.open();
    let outcome = outcome_of::<String>(&early, "the kept signal was never taken").await;
    assert_eq!(outcome, Outcome::Completed("alice".into()));
    let history = events(&engine, "early");
    let received = history.iter().position(|e| matches!(e, Event::SignalReceived { .. })).unwrap();
    let waited = history.iter().position(|e| matches!(e, Event::SignalWaitStarted { .. })).unwrap();
    assert!(received < waited, "the signal must have arrived before the wait: {history:?}");

    // During: the wait is journaled first, then the signal wakes it.
    let mut journal = engine.subscribe();
    let during = engine.start(SagaRun::new("gate", "during", &60_000u64).unwrap()).await.unwrap();
    loop {
        let event = journal.recv().await.unwrap();
        if event.saga_id == id("during")
            && matches!(event.kind, hodei_core::EngineEventKind::Journaled(ref r) if matches!(r.event, Event::SignalWaitStarted { .. }))
        {
            break;
        }
    }
    engine.signal(&id("during"), "approve", &"bob").await.unwrap();
    assert_eq!(during.outcome::<String>().await.unwrap(), Outcome::Completed("bob".into()));

    // After the timeout: the wait has ended, the saga is finished, the signal is refused.
    let late = engine.start(SagaRun::new("gate", "late", &100u64).unwrap()).await.unwrap();
    assert_eq!(late.outcome::<String>().await.unwrap(), Outcome::Completed("timed out".into()));
    assert!(events(&engine, "late").iter().any(|e| matches!(e, Event::SignalWaitTimedOut { .. })));
    let err = engine.signal(&id("late"), "approve", &"carol").await.unwrap_err();
    assert!(matches!(err, Error::SagaFinished(_)), "{err:?}");
    let err = engine.signal(&id("nobody"), "approve", &"dave").await.unwrap_err();
    assert!(matches!(err, Error::SagaNotFound(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_of_the_wrong_type_fails_the_wait_with_a_clear_error() {
    let engine = engine_with(MemoryStore::new(), [approval_saga()]).await;
    let handle = engine.start(SagaRun::new("gate", "typed", &60_000u64).unwrap()).await.unwrap();
    // Nothing: a String needs at least its length.
    engine.signal(&id("typed"), "approve", &()).await.unwrap();
    match handle.outcome::<String>().await.unwrap() {
        Outcome::Failed { cause } => assert!(cause.contains("signal `approve` does not decode"), "{cause}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_returns_outputs_in_branch_order_and_journals_finishing_order() {
    let effects = Effects::default();
    let e = effects.clone();
    let fanout = saga("fanout", 1, move |ctx: SagaContext, ()| {
        let effects = e.clone();
        async move {
            // Later branches finish first: each runs its step only once the group has taken the
            // result of the branch after it, and branch 2 once the group waits on its branches
            // (a result taken while the group was still starting them would go uncounted).
            let polls = GroupPolls::new();
            let mut later_ended: Option<oneshot::Receiver<u64>> = None;
            let mut branches = Vec::new();
            for i in (0..3u64).rev() {
                let (ended, ended_rx) = oneshot::channel();
                let after = later_ended.replace(ended_rx);
                let (effects, polls) = (effects.clone(), polls.clone());
                branches.push(Branch::new(move |ctx: SagaContext| async move {
                    let since = match after {
                        None => polls.begun(),
                        Some(later) => later.await.expect("the later branch ended") + 1,
                    };
                    polls.waiting_since(since).await;
                    effect_step(&ctx, &effects, &format!("branch-{i}")).await?;
                    let _ = ended.send(polls.begun());
                    Ok::<_, StepError>(i * 10)
                }));
            }
            branches.reverse();
            polls.watch(ctx.all("fan", branches)).await
        }
    });
    let engine = engine_with(MemoryStore::new(), [fanout]).await;
    let handle = engine.start(SagaRun::new("fanout", "f-1", &()).unwrap()).await.unwrap();
    let outcome = outcome_of::<Vec<u64>>(&handle, "a branch waited for a turn that never came").await;
    assert_eq!(outcome, Outcome::Completed(vec![0, 10, 20]), "outputs come back in branch order");
    let finished: Vec<u32> = events(&engine, "f-1")
        .iter()
        .filter_map(|e| match e {
            Event::BranchFinished { branch, error: None, .. } => Some(*branch),
            _ => None,
        })
        .collect();
    assert_eq!(finished, vec![2, 1, 0], "journaled in the order they finished");
    let keys: Vec<String> = events(&engine, "f-1")
        .iter()
        .filter_map(|e| match e {
            Event::StepStartedAt { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(keys, ["0.2.0", "0.1.0", "0.0.0"], "steps are keyed by their branch, not by timing");
    assert_eq!(effects.take(), ["branch-2", "branch-1", "branch-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_branch_cancels_the_running_ones_and_completed_branches_are_compensated() {
    let effects = Effects::default();
    let cancelled = Arc::new(AtomicBool::new(false));
    let (e, c) = (effects.clone(), cancelled.clone());
    let fanout = saga("fail-fast", 1, move |ctx: SagaContext, ()| {
        let (effects, cancelled) = (e.clone(), c.clone());
        async move {
            // The branch that fails does so only once one branch has completed its step and
            // another's step is running; that one starts only after the first completed, so
            // the order of starts, and of undos, is fixed.
            let (done_completed, slow_running) = (Gate::new(), Gate::new());
            let done = {
                let (effects, done_completed) = (effects.clone(), done_completed.clone());
                Branch::new(move |ctx: SagaContext| async move {
                    undoable(&ctx, &effects, "done").await?;
                    done_completed.open();
                    Ok(())
                })
            };
            let running = {
                let (effects, cancelled, slow_running) =
                    (effects.clone(), cancelled.clone(), slow_running.clone());
                Branch::new(move |ctx: SagaContext| async move {
                    done_completed.passed().await;
                    let (run_effects, undo_effects) = (effects.clone(), effects.clone());
                    ctx.step("slow")
                        .compensate(move |_: hodei_core::CompensationContext<(), ()>| {
                            let effects = undo_effects.clone();
                            async move {
                                effects.push("undo slow".into());
                                Ok(())
                            }
                        })
                        .run(move |_, ()| {
                            let (effects, cancelled, slow_running) =
                                (run_effects.clone(), cancelled.clone(), slow_running.clone());
                            async move {
                                effects.push("slow".into());
                                // Flags its own cancellation when dropped unfinished.
                                struct OnDrop(Arc<AtomicBool>);
                                impl Drop for OnDrop {
                                    fn drop(&mut self) {
                                        self.0.store(true, Ordering::SeqCst);
                                    }
                                }
                                let guard = OnDrop(cancelled);
                                slow_running.open();
                                std::future::pending::<()>().await;
                                std::mem::forget(guard);
                                Ok::<_, StepError>(())
                            }
                        })
                        .await
                })
            };
            let failing = {
                let effects = effects.clone();
                Branch::new(move |ctx: SagaContext| async move {
                    slow_running.passed().await;
                    effect_step(&ctx, &effects, "before-failure").await?;
                    Err::<(), _>(StepError::terminal("tests failed"))
                })
            };
            ctx.all("fan", vec![done, running, failing]).await?;
            undoable(&ctx, &effects, "after").await
        }
    });
    let engine = engine_with(MemoryStore::new(), [fanout]).await;
    let handle = engine.start(SagaRun::new("fail-fast", "ff", &()).unwrap()).await.unwrap();
    match outcome_of::<()>(&handle, "the failure never cancelled the running step").await {
        Outcome::Compensated { cause } => assert!(cause.contains("tests failed"), "{cause}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(cancelled.load(Ordering::SeqCst), "the running branch's step must be cancelled");
    // Reverse start order: the slow step started after `done` completed, so it is undone
    // first; a started, cancelled step is compensated too, and nothing after the group runs.
    assert_eq!(effects.take(), ["done", "slow", "before-failure", "undo slow", "undo done"]);
    let history = events(&engine, "ff");
    let started = |name: &str| {
        history
            .iter()
            .find_map(|e| match e {
                Event::StepStartedAt { step, name: n, .. } if n == name => Some(*step),
                _ => None,
            })
            .unwrap()
    };
    assert!(started("done") < started("slow"), "{history:#?}");
    // The cancelled step's end is in the journal, with why.
    assert_eq!(unended_steps(&history), Vec::<u32>::new(), "{history:#?}");
    let slow_end = history.iter().find_map(|e| match e {
        Event::StepCancelled { step, reason } if *step == started("slow") => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(slow_end.as_deref(), Some("branch 2 of `fan` failed"), "{history:#?}");
    // The failure decided the group; the branch it cancelled never finished.
    let failed: Vec<u32> = history
        .iter()
        .filter_map(|e| match e {
            Event::BranchFinished { branch, error: Some(_), .. } => Some(*branch),
            _ => None,
        })
        .collect();
    assert_eq!(failed, [2], "{history:#?}");
    assert!(!history.iter().any(|e| matches!(e, Event::BranchFinished { branch: 1, .. })), "{history:#?}");
}

/// The steps a journal starts without ending them.
fn unended_steps(history: &[Event]) -> Vec<u32> {
    let mut started = std::collections::BTreeSet::new();
    for event in history {
        match event {
            Event::StepStarted { step, .. } | Event::StepStartedAt { step, .. } => {
                started.insert(*step);
            }
            Event::StepCompleted { step, .. }
            | Event::StepFailed { step, .. }
            | Event::StepCancelled { step, .. } => {
                started.remove(step);
            }
            _ => {}
        }
    }
    started.into_iter().collect()
}

/// Where a [`stoppable`] step has got to, and the gate its wind-down waits on.
#[derive(Clone)]
struct Stages {
    /// Open once the step's body runs.
    running: Gate,
    /// Open once the body has been asked to stop.
    stopping: Gate,
    /// The body stops what it started only once this opens.
    wind_down: Gate,
}

impl Stages {
    fn new() -> Self {
        Self { running: Gate::new(), stopping: Gate::new(), wind_down: Gate::new() }
    }
}

/// A step that waits until it is stopped, then stops what it started once `stages.wind_down`
/// opens, noting each stage and its undo. Its cancel grace is the hang guard: the test, not a
/// deadline, decides when the wind-down ends.
async fn stoppable(
    ctx: &SagaContext,
    effects: &Effects,
    name: &str,
    stages: &Stages,
) -> Result<(), StepError> {
    let (run_effects, undo_effects) = (effects.clone(), effects.clone());
    let (label, undo_label) = (name.to_owned(), name.to_owned());
    let stages = stages.clone();
    ctx.step(name)
        .cancel_grace(HANG_GUARD)
        .compensate(move |c: hodei_core::CompensationContext<(), ()>| {
            let (effects, label) = (undo_effects.clone(), undo_label.clone());
            async move {
                assert_eq!(c.output, None, "a cancelled step has no output");
                effects.push(format!("undo {label}"));
                Ok(())
            }
        })
        .run(move |step: hodei_core::StepContext, ()| {
            let (effects, label, stages) = (run_effects.clone(), label.clone(), stages.clone());
            async move {
                effects.push(format!("{label} running"));
                stages.running.open();
                let reason = step.cancelled().await;
                stages.stopping.open();
                stages.wind_down.passed().await;
                effects.push(format!("{label} wound down: {reason}"));
                Err::<(), _>(StepError::terminal("stopped"))
            }
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losing_branch_winds_down_and_journals_its_end_before_first_returns() {
    let effects = Effects::default();
    let stages = Stages::new();
    let (e, s) = (effects.clone(), stages.clone());
    let race = saga("wind-down", 1, move |ctx: SagaContext, ()| {
        let (effects, stages) = (e.clone(), s.clone());
        async move {
            let loser = {
                let (effects, stages) = (effects.clone(), stages.clone());
                Branch::new(move |ctx: SagaContext| async move {
                    stoppable(&ctx, &effects, "loser", &stages).await.map(|()| 0)
                })
            };
            let winner = {
                let effects = effects.clone();
                Branch::new(move |ctx: SagaContext| async move {
                    // Wins only once the loser runs.
                    stages.running.passed().await;
                    effect_step(&ctx, &effects, "winner").await
                })
            };
            let (index, _) = ctx.first("race", vec![loser, winner]).await?;
            effects.push(format!("decided {index}"));
            Ok::<_, StepError>(index)
        }
    });
    let engine = engine_with(MemoryStore::new(), [race]).await;
    let handle = engine.start(SagaRun::new("wind-down", "wd", &()).unwrap()).await.unwrap();
    // The losing step holds its wind-down until the test has seen it asked to stop, so the
    // group, which must wait for it, cannot have returned yet.
    stages.stopping.reached("the losing step was dropped, or never asked to stop").await;
    stages.wind_down.open();
    assert_eq!(outcome_of::<u32>(&handle, "the losing step never wound down").await, Outcome::Completed(1));
    assert_eq!(
        effects.take(),
        ["loser running", "winner", "loser wound down: branch 1 of `race` finished first", "decided 1"],
        "the group returned only once the losing step had stopped what it started"
    );
    let history = events(&engine, "wd");
    assert_eq!(unended_steps(&history), Vec::<u32>::new(), "{history:#?}");
    assert!(history.iter().any(
        |e| matches!(e, Event::StepCancelled { reason, .. } if reason == "branch 1 of `race` finished first")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_saga_journals_its_running_steps_end_and_compensates_after_they_wound_down() {
    let effects = Effects::default();
    let stages = Stages::new();
    let (e, s) = (effects.clone(), stages.clone());
    let waits = saga("waits", 1, move |ctx: SagaContext, ()| {
        let (effects, stages) = (e.clone(), s.clone());
        async move { stoppable(&ctx, &effects, "deploy", &stages).await }
    });
    let engine = engine_with(MemoryStore::new(), [waits]).await;
    let handle = engine.start(SagaRun::new("waits", "w", &()).unwrap()).await.unwrap();
    stages.running.reached("the step never ran").await;
    engine.cancel(&id("w"), "an operator aborts").await.unwrap();
    stages.stopping.reached("the running step was never asked to stop").await;
    // The step is still winding down: nothing may be undone before it has.
    let history = events(&engine, "w");
    assert!(
        !history.iter().any(|e| matches!(e, Event::StepCancelled { .. } | Event::CompensationStarted { .. })),
        "{history:#?}"
    );
    stages.wind_down.open();
    match outcome_of::<()>(&handle, "the cancelled step never wound down").await {
        Outcome::Compensated { cause } => assert!(cause.contains("an operator aborts"), "{cause}"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(effects.take(), ["deploy running", "deploy wound down: an operator aborts", "undo deploy"]);
    let history = events(&engine, "w");
    assert_eq!(unended_steps(&history), Vec::<u32>::new(), "{history:#?}");
    let ended =
        history.iter().position(|e| matches!(e, Event::StepCancelled { .. })).expect("the step's end");
    let undone =
        history.iter().position(|e| matches!(e, Event::CompensationStarted { .. })).expect("its undo");
    assert!(ended < undone, "{history:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_cancelled_before_its_step_could_run_journals_no_start_of_it() {
    let never = saga("never", 1, |ctx: SagaContext, ()| async move {
        let failing =
            Branch::new(|_ctx: SagaContext| async move { Err::<(), _>(StepError::terminal("lint failed")) });
        let waiting = Branch::new(|ctx: SagaContext| async move {
            ctx.sleep(Duration::from_secs(3600)).await;
            ctx.step("never").run(|_, ()| async move { Ok::<_, StepError>(()) }).await
        });
        ctx.all("checks", vec![failing, waiting]).await.map(drop)
    });
    let engine = engine_with(MemoryStore::new(), [never]).await;
    let handle = engine.start(SagaRun::new("never", "n", &()).unwrap()).await.unwrap();
    assert!(matches!(handle.outcome::<()>().await.unwrap(), Outcome::Failed { .. }));
    let history = events(&engine, "n");
    assert!(
        !history.iter().any(|e| matches!(e, Event::StepStarted { .. } | Event::StepStartedAt { .. })),
        "{history:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_returns_the_winner_and_cancels_the_losers() {
    let race = saga("race", 1, |ctx: SagaContext, ()| async move {
        let branch = |length: Duration, label: &'static str| {
            Branch::new(move |ctx: SagaContext| async move {
                ctx.sleep(length).await;
                Ok::<_, StepError>(label.to_owned())
            })
        };
        // The loser's timer cannot fire while the test runs: a race that waited for it would
        // never return.
        let branches =
            vec![branch(Duration::from_secs(3600), "slow"), branch(Duration::from_millis(50), "fast")];
        let (index, winner) = ctx.first("race", branches).await?;
        Ok::<_, StepError>(format!("{index}:{winner}"))
    });
    let engine = engine_with(MemoryStore::new(), [race]).await;
    let handle = engine.start(SagaRun::new("race", "r", &()).unwrap()).await.unwrap();
    let outcome = outcome_of::<String>(&handle, "the race waited for its loser").await;
    assert_eq!(outcome, Outcome::Completed("1:fast".into()));
    let fired: Vec<String> = events(&engine, "r")
        .into_iter()
        .filter_map(|e| match e {
            Event::TimerFired { key } => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(fired, ["0.1.0"], "only the winner's timer fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matrix_runs_at_most_its_limit_at_once() {
    #[derive(Default)]
    struct Suites {
        /// Counted as the group starts each suite's branch, while it is being polled.
        spawned: usize,
        started: usize,
        running: usize,
        peak: usize,
        /// The group's last poll left it waiting on its branches.
        group_waiting: bool,
    }
    let suites = Arc::new(watch::Sender::new(Suites::default()));
    let s = suites.clone();
    let matrix = saga("matrix", 1, move |ctx: SagaContext, params: Vec<u32>| {
        let (suites, for_group) = (s.clone(), s.clone());
        async move {
            let group = ctx.matrix("suites", params, 2, move |ctx: SagaContext, n: u32| {
                suites.send_modify(|s| s.spawned += 1);
                let suites = suites.clone();
                async move {
                    ctx.step("suite")
                        .input(n)
                        .run(move |_, n: u32| {
                            let suites = suites.clone();
                            async move {
                                suites.send_modify(|s| {
                                    s.started += 1;
                                    s.running += 1;
                                    s.peak = s.peak.max(s.running);
                                });
                                // No suite ends before every suite the group has started is
                                // running and the group waits on them: a matrix that broke its
                                // limit would have more than two running at once by then.
                                let _ = suites
                                    .subscribe()
                                    .wait_for(|s| s.group_waiting && s.started == s.spawned)
                                    .await;
                                suites.send_modify(|s| s.running -= 1);
                                Ok::<_, StepError>(n * n)
                            }
                        })
                        .await
                }
            });
            let mut group = pin!(group);
            poll_fn(|cx| {
                for_group.send_if_modified(|s| {
                    s.group_waiting = false;
                    false
                });
                let polled = group.as_mut().poll(cx);
                for_group.send_modify(|s| s.group_waiting = polled.is_pending());
                polled
            })
            .await
        }
    });
    let engine = engine_with(MemoryStore::new(), [matrix]).await;
    let handle =
        engine.start(SagaRun::new("matrix", "m", &vec![1u32, 2, 3, 4, 5, 6]).unwrap()).await.unwrap();
    let outcome = outcome_of::<Vec<u32>>(&handle, "a suite the group started never ran").await;
    assert_eq!(outcome, Outcome::Completed(vec![1, 4, 9, 16, 25, 36]));
    assert_eq!(suites.borrow().peak, 2, "the limit is 2 and there were 6 suites");
}

fn child_definitions(effects: &Effects) -> Vec<hodei_core::SagaDefinition> {
    let e = effects.clone();
    let child = saga("child", 1, move |ctx: SagaContext, tag: String| {
        let effects = e.clone();
        async move {
            undoable(&ctx, &effects, &format!("child {tag}")).await?;
            if tag == "slow" {
                ctx.sleep(Duration::from_secs(3600)).await;
            }
            Ok::<_, StepError>(format!("built {tag}"))
        }
    });
    let e = effects.clone();
    let parent = saga("parent", 1, move |ctx: SagaContext, (tag, fail): (String, bool)| {
        let effects = e.clone();
        async move {
            let child_id = format!("{}/child", ctx.id());
            let built: String = ctx.child(SagaRun::new("child", child_id, &tag).unwrap()).await?;
            undoable(&ctx, &effects, "parent step").await?;
            if fail {
                return Err(StepError::terminal("release refused"));
            }
            Ok::<_, StepError>(built)
        }
    });
    vec![child, parent]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_saga_returns_its_output_and_is_compensated_with_its_parent() {
    let effects = Effects::default();
    let engine = engine_with(MemoryStore::new(), child_definitions(&effects)).await;

    let ok = engine.start(SagaRun::new("parent", "p-ok", &("a", false)).unwrap()).await.unwrap();
    assert_eq!(ok.outcome::<String>().await.unwrap(), Outcome::Completed("built a".into()));
    assert_eq!(engine.status(&id("p-ok/child")).unwrap().status, SagaStatus::Completed);
    assert!(events(&engine, "p-ok").iter().any(|e| e.step_start().is_some_and(|(_, n)| n == "child child")));
    effects.take();

    let failed = engine.start(SagaRun::new("parent", "p-fail", &("b", true)).unwrap()).await.unwrap();
    assert!(matches!(failed.outcome::<String>().await.unwrap(), Outcome::Compensated { .. }));
    assert_eq!(
        engine.status(&id("p-fail/child")).unwrap().status,
        SagaStatus::Compensated,
        "the completed child is compensated as part of its parent"
    );
    let seen = effects.take();
    assert_eq!(seen, ["child b", "parent step", "undo parent step", "undo child b"]);
    let child_history = events(&engine, "p-fail/child");
    let completed = child_history.iter().position(|e| matches!(e, Event::SagaCompleted { .. })).unwrap();
    assert!(matches!(child_history[completed + 1], Event::CancelRequested { .. }));
    assert!(matches!(child_history.last(), Some(Event::SagaCompensated { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_parent_cancels_the_child() {
    let effects = Effects::default();
    let engine = engine_with(MemoryStore::new(), child_definitions(&effects)).await;
    let mut journal = engine.subscribe();
    let parent = engine.start(SagaRun::new("parent", "p-cancel", &("slow", false)).unwrap()).await.unwrap();
    loop {
        let event = journal.recv().await.unwrap();
        if event.saga_id == id("p-cancel/child")
            && matches!(event.kind, hodei_core::EngineEventKind::Journaled(ref r) if matches!(r.event, Event::TimerStarted { .. }))
        {
            break;
        }
    }
    parent.cancel("release withdrawn").await.unwrap();
    match parent.outcome::<String>().await.unwrap() {
        Outcome::Compensated { cause } => assert!(cause.contains("release withdrawn"), "{cause}"),
        other => panic!("unexpected {other:?}"),
    }
    let child = engine.status(&id("p-cancel/child")).unwrap();
    assert_eq!(child.status, SagaStatus::Compensated);
    assert_eq!(effects.take(), ["child slow", "undo child slow"]);
    let err = engine.cancel(&id("p-cancel"), "again").await.unwrap_err();
    assert!(matches!(err, Error::SagaFinished(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_reuses_the_steps_before_n_and_links_both_runs() {
    let effects = Effects::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let (e, f) = (effects.clone(), fixed.clone());
    let pipeline = saga("pipeline", 1, move |ctx: SagaContext, ()| {
        let (effects, fixed) = (e.clone(), f.clone());
        async move {
            effect_step(&ctx, &effects, "checkout").await?;
            ctx.sleep(Duration::from_millis(10)).await;
            effect_step(&ctx, &effects, "build").await?;
            let ok = fixed.load(Ordering::SeqCst);
            ctx.step("deploy")
                .run(move |_, ()| async move {
                    if ok { Ok(()) } else { Err(StepError::terminal("cluster unreachable")) }
                })
                .await?;
            Ok::<_, StepError>("deployed".to_string())
        }
    });
    let engine = engine_with(MemoryStore::new(), [pipeline]).await;
    let original = engine.start(SagaRun::new("pipeline", "run-1", &()).unwrap()).await.unwrap();
    assert!(matches!(original.outcome::<String>().await.unwrap(), Outcome::Failed { .. }));
    assert_eq!(effects.take(), ["checkout", "build"]);
    let deploy = events(&engine, "run-1")
        .iter()
        .find_map(|e| e.step_start().filter(|(_, name)| *name == "deploy").map(|(step, _)| step))
        .unwrap();

    let err = engine.fork(&id("run-1"), 99, "run-x").await.unwrap_err();
    assert!(matches!(err, Error::Fork { .. }), "{err:?}");

    fixed.store(true, Ordering::SeqCst);
    let fork = engine.fork(&id("run-1"), deploy, "run-2").await.unwrap();
    assert_eq!(fork.outcome::<String>().await.unwrap(), Outcome::Completed("deployed".into()));
    assert!(effects.take().is_empty(), "steps before the fork point are reused, not run");
    let forked = events(&engine, "run-2");
    assert_eq!(forked[1], Event::ForkedFrom { source: id("run-1"), step: deploy });
    assert!(
        matches!(events(&engine, "run-1").last(), Some(Event::Forked { fork, .. }) if *fork == id("run-2"))
    );
    // The source's outcome still reads past the link.
    assert!(matches!(original.outcome::<String>().await.unwrap(), Outcome::Failed { .. }));

    let err = engine.fork(&id("run-1"), deploy, "run-2").await.unwrap_err();
    assert!(matches!(err, Error::IdempotencyConflict { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_branch_structure_changed_is_parked_with_a_clear_error() {
    let store = Arc::new(MemoryStore::new());
    let with_branches = |count: usize| {
        saga("shape", 1, move |ctx: SagaContext, ()| async move {
            let branches = (0..count)
                .map(|_| {
                    Branch::new(|ctx: SagaContext| async move {
                        ctx.sleep(Duration::from_secs(3600)).await;
                        Ok::<_, StepError>(())
                    })
                })
                .collect();
            ctx.all("tests", branches).await?;
            Ok::<_, StepError>(())
        })
    };
    let engine = engine_with(store.clone(), [with_branches(2)]).await;
    start_then_stop_asleep(&engine, SagaRun::new("shape", "shape-1", &()).unwrap(), 2).await;

    let engine = engine_with(store, [with_branches(3)]).await;
    let mut statuses = engine.subscribe();
    let reason = loop {
        match engine.status(&id("shape-1")).unwrap().status {
            SagaStatus::Parked { reason } => break reason,
            _ => {
                let _ = statuses.recv().await;
            }
        }
    };
    assert!(reason.contains("3 branches") && reason.contains("recorded 2"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_right_after_a_restart_compensates_every_branch_replay_recorded() {
    let store = Arc::new(MemoryStore::new());
    let effects = Effects::default();
    let definition = |effects: &Effects| {
        let e = effects.clone();
        saga("parallel-deploy", 1, move |ctx: SagaContext, ()| {
            let effects = e.clone();
            async move {
                let branches = ["eu", "us", "ap"]
                    .into_iter()
                    .map(|region| {
                        let effects = effects.clone();
                        Branch::new(move |ctx: SagaContext| async move {
                            undoable(&ctx, &effects, &format!("deploy {region}")).await?;
                            ctx.sleep(Duration::from_secs(3600)).await;
                            Ok::<_, StepError>(())
                        })
                    })
                    .collect();
                ctx.all("regions", branches).await?;
                Ok::<_, StepError>(())
            }
        })
    };
    let engine = engine_with(store.clone(), [definition(&effects)]).await;
    start_then_stop_asleep(&engine, SagaRun::new("parallel-deploy", "pd", &()).unwrap(), 3).await;
    assert_eq!(effects.take().len(), 3);

    // The cancel lands before the resumed saga has replayed: its branches replay in their own
    // tasks, and every one of their recorded steps must still be compensated.
    let engine = engine_with(store, [definition(&effects)]).await;
    engine.cancel(&id("pd"), "rollout halted").await.unwrap();
    let outcome = engine.handle(&id("pd")).unwrap().outcome::<()>().await.unwrap();
    assert!(matches!(outcome, Outcome::Compensated { .. }), "{outcome:?}");
    let mut undone = effects.take();
    undone.sort();
    assert_eq!(undone, ["undo deploy ap", "undo deploy eu", "undo deploy us"]);
}
