//! The durable primitives of issue 7, each on its own: timers, signals, concurrent branches,
//! child sagas, cancellation, fork, and the nondeterminism checks of branches. Crashes of the
//! process are in `primitives_crash.rs`; 10,000 sleeping sagas in `timers_scale.rs`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hodei::{
    Branch, Engine, Error, Event, MemoryStore, Outcome, SagaContext, SagaId, SagaRun, SagaStatus, StepError,
    Timestamp,
};
use support::{Effects, engine_with, saga};

fn id(id: &str) -> SagaId {
    SagaId::new(id).unwrap()
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
        .compensate(move |c: hodei::CompensationContext<String, ()>| {
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
        if let hodei::EngineEventKind::Journaled(r) = journal.recv().await.unwrap().kind {
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
    let sleeper = || {
        saga("sleeper", 1, |ctx: SagaContext, ms: u64| async move {
            ctx.sleep(Duration::from_millis(ms)).await;
            Ok::<_, StepError>(Timestamp::now().0)
        })
    };
    let engine = engine_with(store.clone(), [sleeper()]).await;
    let started = Timestamp::now();
    let mut journal = engine.subscribe();
    engine.start(SagaRun::new("sleeper", "s-1", &600u64).unwrap()).await.unwrap();
    // Stopped while it sleeps: the timer is in the journal, the wait is not in memory any more.
    while !matches!(journal.recv().await.unwrap().kind, hodei::EngineEventKind::Journaled(ref r) if matches!(r.event, Event::TimerStarted { .. }))
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

    let engine = engine_with(store, [sleeper()]).await;
    let woke = match engine.handle(&id("s-1")).unwrap().outcome::<u64>().await.unwrap() {
        Outcome::Completed(at) => at,
        other => panic!("unexpected {other:?}"),
    };
    assert!(woke >= due.0, "woke at {woke}, before its due time {}", due.0);
    assert!(
        woke < due.0 + 300,
        "woke {} ms after its due time: the restart extended the timer",
        woke - due.0
    );
    assert!(matches!(events(&engine, "s-1")[2], Event::TimerFired { .. }));
}

fn approval_saga() -> hodei::SagaDefinition {
    saga("gate", 1, |ctx: SagaContext, timeout_ms: u64| async move {
        let who = ctx.wait_signal_timeout::<String>("approve", Duration::from_millis(timeout_ms)).await?;
        Ok::<_, StepError>(who.unwrap_or_else(|| "timed out".into()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_before_the_wait_during_it_or_after_its_timeout() {
    let waits_first = saga("waits-first", 1, |ctx: SagaContext, ()| async move {
        // A step before the wait, gated so the signal surely arrives before the wait begins.
        ctx.step("hold").run(|_, ()| async { Ok::<_, StepError>(()) }).await?;
        ctx.sleep(Duration::from_millis(200)).await;
        let who: String = ctx.wait_signal("approve").await?;
        Ok::<_, StepError>(who)
    });
    let engine = engine_with(MemoryStore::new(), [approval_saga(), waits_first]).await;

    // Before: the signal is journaled, kept, and taken when the wait begins.
    let early = engine.start(SagaRun::new("waits-first", "early", &()).unwrap()).await.unwrap();
    engine.signal(&id("early"), "approve", &"alice").await.unwrap();
    assert_eq!(early.outcome::<String>().await.unwrap(), Outcome::Completed("alice".into()));
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
            && matches!(event.kind, hodei::EngineEventKind::Journaled(ref r) if matches!(r.event, Event::SignalWaitStarted { .. }))
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
            let branches = (0..3u64)
                .map(|i| {
                    let effects = effects.clone();
                    Branch::new(move |ctx: SagaContext| async move {
                        // Later branches finish first.
                        ctx.sleep(Duration::from_millis(150 - 50 * i)).await;
                        effect_step(&ctx, &effects, &format!("branch-{i}")).await?;
                        Ok::<_, StepError>(i * 10)
                    })
                })
                .collect();
            ctx.all("fan", branches).await
        }
    });
    let engine = engine_with(MemoryStore::new(), [fanout]).await;
    let handle = engine.start(SagaRun::new("fanout", "f-1", &()).unwrap()).await.unwrap();
    assert_eq!(handle.outcome::<Vec<u64>>().await.unwrap(), Outcome::Completed(vec![0, 10, 20]));
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
    assert_eq!(keys, ["0.2.1", "0.1.1", "0.0.1"], "steps are keyed by their branch, not by timing");
    assert_eq!(effects.take().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_branch_cancels_the_running_ones_and_completed_branches_are_compensated() {
    let effects = Effects::default();
    let cancelled = Arc::new(AtomicBool::new(false));
    let (e, c) = (effects.clone(), cancelled.clone());
    let fanout = saga("fail-fast", 1, move |ctx: SagaContext, ()| {
        let (effects, cancelled) = (e.clone(), c.clone());
        async move {
            let done = {
                let effects = effects.clone();
                Branch::new(move |ctx: SagaContext| async move { undoable(&ctx, &effects, "done").await })
            };
            let running = {
                let (effects, cancelled) = (effects.clone(), cancelled.clone());
                Branch::new(move |ctx: SagaContext| async move {
                    let (run_effects, undo_effects) = (effects.clone(), effects.clone());
                    ctx.step("slow")
                        .compensate(move |_: hodei::CompensationContext<(), ()>| {
                            let effects = undo_effects.clone();
                            async move {
                                effects.push("undo slow".into());
                                Ok(())
                            }
                        })
                        .run(move |_, ()| {
                            let (effects, cancelled) = (run_effects.clone(), cancelled.clone());
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
                                tokio::time::sleep(Duration::from_secs(3600)).await;
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
                    ctx.sleep(Duration::from_millis(100)).await;
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
    match handle.outcome::<()>().await.unwrap() {
        Outcome::Compensated { cause } => assert!(cause.contains("tests failed"), "{cause}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(cancelled.load(Ordering::SeqCst), "the running branch's step must be cancelled");
    let seen = effects.take();
    assert!(seen.contains(&"undo done".to_string()), "{seen:?}");
    assert!(seen.contains(&"undo slow".to_string()), "a started, cancelled step is compensated: {seen:?}");
    assert!(!seen.iter().any(|e| e.contains("after")), "{seen:?}");
    // Reverse start order: the slow step started after `done`, so it is undone first.
    let undo_slow = seen.iter().position(|e| e == "undo slow").unwrap();
    let undo_done = seen.iter().position(|e| e == "undo done").unwrap();
    let started = |name: &str| {
        events(&engine, "ff")
            .iter()
            .find_map(|e| match e {
                Event::StepStartedAt { step, name: n, .. } if n == name => Some(*step),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(started("slow") > started("done"), undo_slow < undo_done, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_returns_the_winner_and_cancels_the_losers() {
    let race = saga("race", 1, |ctx: SagaContext, ()| async move {
        let branch = |ms: u64, label: &'static str| {
            Branch::new(move |ctx: SagaContext| async move {
                ctx.sleep(Duration::from_millis(ms)).await;
                Ok::<_, StepError>(label.to_owned())
            })
        };
        let (index, winner) = ctx.first("race", vec![branch(5_000, "slow"), branch(50, "fast")]).await?;
        Ok::<_, StepError>(format!("{index}:{winner}"))
    });
    let engine = engine_with(MemoryStore::new(), [race]).await;
    let started = Instant::now();
    let handle = engine.start(SagaRun::new("race", "r", &()).unwrap()).await.unwrap();
    assert_eq!(handle.outcome::<String>().await.unwrap(), Outcome::Completed("1:fast".into()));
    assert!(started.elapsed() < Duration::from_secs(4), "the loser must not be waited for");
    let fired = events(&engine, "r").iter().filter(|e| matches!(e, Event::TimerFired { .. })).count();
    assert_eq!(fired, 1, "the losing branch's timer never fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matrix_runs_at_most_its_limit_at_once() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let matrix = saga("matrix", 1, move |ctx: SagaContext, params: Vec<u32>| {
        let (running, peak) = (r.clone(), p.clone());
        async move {
            ctx.matrix("suites", params, 2, move |ctx: SagaContext, n: u32| {
                let (running, peak) = (running.clone(), peak.clone());
                async move {
                    ctx.step("suite")
                        .input(n)
                        .run(move |_, n: u32| {
                            let (running, peak) = (running.clone(), peak.clone());
                            async move {
                                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(now, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(30)).await;
                                running.fetch_sub(1, Ordering::SeqCst);
                                Ok::<_, StepError>(n * n)
                            }
                        })
                        .await
                }
            })
            .await
        }
    });
    let engine = engine_with(MemoryStore::new(), [matrix]).await;
    let handle =
        engine.start(SagaRun::new("matrix", "m", &vec![1u32, 2, 3, 4, 5, 6]).unwrap()).await.unwrap();
    assert_eq!(handle.outcome::<Vec<u32>>().await.unwrap(), Outcome::Completed(vec![1, 4, 9, 16, 25, 36]));
    assert_eq!(peak.load(Ordering::SeqCst), 2, "the limit is 2 and there were 6 suites");
}

fn child_definitions(effects: &Effects) -> Vec<hodei::SagaDefinition> {
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
            && matches!(event.kind, hodei::EngineEventKind::Journaled(ref r) if matches!(r.event, Event::TimerStarted { .. }))
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
