//! Restarts on the sled store: resuming, nondeterminism, versions, durable backoff, graceful
//! shutdown, corrupt records and the directory lock. A "restart" here is an engine cut off
//! with `shutdown(Duration::ZERO)` and a new one opened on the same directory; real process
//! kills are in `tests/crash.rs`.
#![cfg(feature = "sled")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use hodei_core::{
    CompensationContext, Engine, Error, Event, Outcome, RetryPolicy, SagaDefinition, SagaId, SagaRun,
    SagaStatus, SledStore, StepError,
};
use support::{Effects, events_of, saga};
use tokio::sync::Notify;

async fn open(dir: &std::path::Path, definitions: impl IntoIterator<Item = SagaDefinition>) -> Engine {
    let mut builder = Engine::builder().data_dir(dir);
    for definition in definitions {
        builder = builder.register(definition);
    }
    builder.start().await.unwrap()
}

/// A two-step pipeline whose second step either hangs (the first process) or finishes.
fn pipeline(effects: &Effects, second_finishes: bool, reached: Arc<Notify>) -> SagaDefinition {
    let fx = effects.clone();
    saga("pipeline", 1, move |ctx, input: String| {
        let (fx, reached) = (fx.clone(), reached.clone());
        async move {
            let fx1 = fx.clone();
            let built = ctx
                .step("build")
                .input(input)
                .run(|_, i: String| {
                    let fx = fx1.clone();
                    async move {
                        fx.push("build".into());
                        Ok::<_, StepError>(format!("{i}.tar"))
                    }
                })
                .await?;
            ctx.step("test")
                .input(built)
                .run(|s, artifact: String| {
                    let (fx, reached) = (fx.clone(), reached.clone());
                    async move {
                        fx.push(format!("test attempt {}", s.attempt));
                        reached.notify_one();
                        if !second_finishes {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, StepError>(format!("{artifact} ok"))
                    }
                })
                .await
        }
    })
}

#[tokio::test]
async fn a_restart_resumes_without_rerunning_recorded_steps() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let reached = Arc::new(Notify::new());
    let engine = open(dir.path(), [pipeline(&effects, false, reached.clone())]).await;
    engine.start(SagaRun::new("pipeline", "p1", &"app".to_string()).unwrap()).await.unwrap();
    reached.notified().await;
    let report = engine.shutdown(Duration::ZERO).await.unwrap();
    assert_eq!(report.interrupted, [SagaId::new("p1").unwrap()]);
    assert_eq!(report.in_flight, [SagaId::new("p1").unwrap()]);
    drop(engine);

    let engine = open(dir.path(), [pipeline(&effects, true, Arc::new(Notify::new()))]).await;
    let run = engine.handle(&SagaId::new("p1").unwrap()).unwrap();
    assert_eq!(run.outcome::<String>().await.unwrap(), Outcome::Completed("app.tar ok".into()));
    // The interrupted attempt counts: the resumed one is attempt 2.
    assert_eq!(effects.take(), ["build", "test attempt 1", "test attempt 2"]);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn code_that_no_longer_matches_its_journal_is_parked_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let reached = Arc::new(Notify::new());
    let engine = open(dir.path(), [pipeline(&effects, false, reached.clone())]).await;
    engine.start(SagaRun::new("pipeline", "p1", &"app".to_string()).unwrap()).await.unwrap();
    reached.notified().await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);
    effects.take();

    // A deploy renamed the second step: replay must stop at it, not run the new code.
    let fx = effects.clone();
    let renamed = saga("pipeline", 1, move |ctx, input: String| {
        let fx = fx.clone();
        async move {
            ctx.step("build")
                .input(input)
                .run(|_, i: String| async move { Ok::<_, StepError>(format!("{i}.tar")) })
                .await?;
            ctx.step("unit-tests")
                .run(|_, ()| {
                    let fx = fx.clone();
                    async move {
                        fx.push("unit-tests ran".into());
                        Ok::<_, StepError>(String::new())
                    }
                })
                .await
        }
    });
    let engine = Engine::builder().data_dir(dir.path()).register(renamed).start().await.unwrap();
    let id = SagaId::new("p1").unwrap();
    let status = loop {
        let status = engine.status(&id).unwrap().status;
        if !matches!(status, SagaStatus::Running) {
            break status;
        }
        tokio::task::yield_now().await;
    };
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(engine);
    match status {
        SagaStatus::Parked { reason } => {
            assert_eq!(
                reason,
                "step 1: the code now calls `unit-tests`, but the journal recorded `test` there"
            )
        }
        other => panic!("expected parked, got {other:?}"),
    }
    assert!(effects.take().is_empty(), "the mismatching step must never run");

    // Fixing the code resumes it.
    let engine = open(dir.path(), [pipeline(&effects, true, Arc::new(Notify::new()))]).await;
    let run = engine.handle(&SagaId::new("p1").unwrap()).unwrap();
    assert_eq!(run.outcome::<String>().await.unwrap(), Outcome::Completed("app.tar ok".into()));
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_saga_waits_for_its_version_and_runs_only_that_version() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let reached = Arc::new(Notify::new());
    let engine = open(dir.path(), [pipeline(&effects, false, reached.clone())]).await;
    engine.start(SagaRun::new("pipeline", "old", &"app".to_string()).unwrap()).await.unwrap();
    reached.notified().await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);

    let v2 = saga("pipeline", 2, |_, input: String| async move { Ok::<_, StepError>(format!("v2 {input}")) });
    let engine = open(dir.path(), [v2]).await;
    let old = SagaId::new("old").unwrap();
    assert_eq!(engine.status(&old).unwrap().status, SagaStatus::WaitingForVersion);
    let new = engine.start(SagaRun::new("pipeline", "new", &"app".to_string()).unwrap()).await.unwrap();
    assert_eq!(
        new.outcome::<String>().await.unwrap(),
        Outcome::Completed("v2 app".into()),
        "new runs take the newest"
    );
    assert_eq!(engine.status(&old).unwrap().status, SagaStatus::WaitingForVersion, "never run by v2");

    engine.register(pipeline(&effects, true, Arc::new(Notify::new()))).unwrap();
    let resumed = engine.handle(&old).unwrap();
    assert_eq!(resumed.outcome::<String>().await.unwrap(), Outcome::Completed("app.tar ok".into()));
    let duplicate = engine.register(pipeline(&effects, true, Arc::new(Notify::new()))).unwrap_err();
    assert!(matches!(duplicate, Error::DuplicateDefinition { version: 1, .. }));
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A crash during a retry's backoff resets neither the attempt count nor the due time.
#[tokio::test]
async fn backoff_and_attempts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let failed_once = Arc::new(Notify::new());
    let definition = |fx: Effects, failed_once: Arc<Notify>| {
        saga("retry", 1, move |ctx, _: ()| {
            let (fx, failed_once) = (fx.clone(), failed_once.clone());
            async move {
                ctx.step("flaky")
                    // Long enough that the shutdown below always lands inside it.
                    .retry(RetryPolicy::attempts(3).initial_backoff(Duration::from_secs(2)).jitter(0.0))
                    .run(|s, ()| {
                        let (fx, failed_once) = (fx.clone(), failed_once.clone());
                        async move {
                            fx.push(format!("attempt {}", s.attempt));
                            if s.attempt == 1 {
                                failed_once.notify_one();
                                return Err(StepError::retryable("connection reset"));
                            }
                            Ok(s.attempt)
                        }
                    })
                    .await
            }
        })
    };
    let engine = open(dir.path(), [definition(effects.clone(), failed_once.clone())]).await;
    let id = SagaId::new("r1").unwrap();
    engine.start(SagaRun::new("retry", "r1", &()).unwrap()).await.unwrap();
    failed_once.notified().await;
    // Wait until the failure is journaled, then stop in the middle of the backoff.
    while !events_of(&engine, "r1").contains(&"StepAttemptFailed") {
        tokio::task::yield_now().await;
    }
    let report = engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(report.interrupted.is_empty(), "a saga in backoff stops at once, cleanly");
    assert!(
        !events_of(&engine, "r1").contains(&"StepRetried"),
        "the retry must not have run before the restart, or this test proves nothing"
    );
    drop(engine);

    let engine = open(dir.path(), [definition(effects.clone(), Arc::new(Notify::new()))]).await;
    assert_eq!(engine.handle(&id).unwrap().outcome::<u32>().await.unwrap(), Outcome::Completed(2));
    assert_eq!(effects.take(), ["attempt 1", "attempt 2"]);
    let history = engine.history(&id).unwrap();
    let due = history.iter().find_map(|r| match r.event {
        Event::StepAttemptFailed { retry_at, .. } => Some(retry_at),
        _ => None,
    });
    let retried = history.iter().find(|r| r.event == Event::StepRetried { step: 0, attempt: 2 }).unwrap();
    assert!(retried.at >= due.unwrap(), "the retry waited for the journaled due time");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Shutdown lets the running step finish, starts no new one, and everything resumes later.
#[tokio::test]
async fn graceful_shutdown_finishes_running_steps_and_resumes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let definition = |fx: Effects, entered: Arc<Notify>, release: Arc<Notify>, block: bool| {
        saga("two", 1, move |ctx, _: ()| {
            let (fx, entered, release) = (fx.clone(), entered.clone(), release.clone());
            async move {
                let fx1 = fx.clone();
                ctx.step("first")
                    .run(|_, ()| {
                        let (fx, entered, release) = (fx1.clone(), entered.clone(), release.clone());
                        async move {
                            fx.push("first".into());
                            if block {
                                entered.notify_one();
                                release.notified().await;
                            }
                            Ok::<_, StepError>(())
                        }
                    })
                    .await?;
                ctx.step("second")
                    .run(|_, ()| {
                        let fx = fx.clone();
                        async move {
                            fx.push("second".into());
                            Ok::<_, StepError>(())
                        }
                    })
                    .await
            }
        })
    };
    let engine =
        open(dir.path(), [definition(effects.clone(), entered.clone(), release.clone(), true)]).await;
    engine.start(SagaRun::new("two", "g1", &()).unwrap()).await.unwrap();
    entered.notified().await;
    let mut stopping = Box::pin(engine.shutdown(Duration::from_secs(30)));
    // Poll shutdown once: it stops taking work at once, then waits for the running step.
    tokio::select! {
        biased;
        _ = &mut stopping => panic!("shutdown cannot finish while a step runs"),
        () = std::future::ready(()) => {}
    }
    let late = engine.start(SagaRun::new("two", "late", &()).unwrap()).await.unwrap_err();
    assert!(matches!(late, Error::ShuttingDown), "{late}");
    release.notify_one();
    let report = stopping.await.unwrap();
    assert!(report.interrupted.is_empty());
    assert_eq!(report.in_flight.iter().map(SagaId::as_str).collect::<Vec<_>>(), ["g1"]);
    assert_eq!(effects.take(), ["first"], "no new step starts during shutdown");
    drop(engine);

    let engine = open(dir.path(), [definition(effects.clone(), entered, release, false)]).await;
    engine.handle(&SagaId::new("g1").unwrap()).unwrap().outcome::<()>().await.unwrap();
    assert_eq!(effects.take(), ["second"], "the finished step was not run again");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A step interrupted by a crash, then cancelled: its compensation still runs, with the
/// step's input and idempotency key and no output.
#[tokio::test]
async fn an_interrupted_step_is_compensated_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let reached = Arc::new(Notify::new());
    let definition = |fx: Effects, reached: Arc<Notify>| {
        saga("release", 1, move |ctx, _: ()| {
            let (fx, reached) = (fx.clone(), reached.clone());
            async move {
                ctx.step("deploy")
                    .input("v2".to_string())
                    .compensate(move |c: CompensationContext<String, String>| {
                        let fx = fx.clone();
                        async move {
                            fx.push(format!(
                                "rollback {} key {} output {:?}",
                                c.input, c.idempotency_key, c.output
                            ));
                            Ok(())
                        }
                    })
                    .run(|_, _: String| {
                        let reached = reached.clone();
                        async move {
                            reached.notify_one();
                            std::future::pending::<Result<String, StepError>>().await
                        }
                    })
                    .await
            }
        })
    };
    let engine = open(dir.path(), [definition(effects.clone(), reached.clone())]).await;
    engine.start(SagaRun::new("release", "x1", &()).unwrap()).await.unwrap();
    reached.notified().await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);

    let reached = Arc::new(Notify::new());
    let engine = open(dir.path(), [definition(effects.clone(), reached.clone())]).await;
    reached.notified().await;
    let run = engine.handle(&SagaId::new("x1").unwrap()).unwrap();
    run.cancel("abandon the release").await.unwrap();
    assert!(matches!(run.outcome::<String>().await.unwrap(), Outcome::Compensated { .. }));
    assert_eq!(effects.take(), ["rollback v2 key x1/0 output None"]);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A step whose interruptions do not count (a remote job re-attached after a restart) keeps
/// every attempt of its policy for real failures: three restarts cut off its first three
/// attempts, then one fails retryably, and the policy of two attempts still retries it.
#[tokio::test]
async fn restarts_do_not_use_up_the_attempts_of_a_step_whose_interruptions_do_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let definition = |fx: Effects, reached: Arc<Notify>| {
        saga("job", 1, move |ctx, _: ()| {
            let (fx, reached) = (fx.clone(), reached.clone());
            async move {
                ctx.step("remote")
                    .retry(RetryPolicy::attempts(2).initial_backoff(Duration::from_millis(1)))
                    .interruptions_count(false)
                    .run(|s, (): ()| {
                        let (fx, reached) = (fx.clone(), reached.clone());
                        async move {
                            fx.push(format!("attempt {}", s.attempt));
                            match s.attempt {
                                1..=3 => {
                                    reached.notify_one();
                                    std::future::pending().await
                                }
                                4 => Err(StepError::retryable("worker lost")),
                                _ => Ok::<_, StepError>(s.attempt),
                            }
                        }
                    })
                    .await
            }
        })
    };
    for restart in 0..3 {
        let reached = Arc::new(Notify::new());
        let engine = open(dir.path(), [definition(effects.clone(), reached.clone())]).await;
        if restart == 0 {
            engine.start(SagaRun::new("job", "j1", &()).unwrap()).await.unwrap();
        }
        reached.notified().await;
        engine.shutdown(Duration::ZERO).await.unwrap();
    }
    let engine = open(dir.path(), [definition(effects.clone(), Arc::new(Notify::new()))]).await;
    let outcome = engine.handle(&SagaId::new("j1").unwrap()).unwrap().outcome::<u32>().await.unwrap();
    assert_eq!(outcome, Outcome::Completed(5));
    assert_eq!(effects.take(), ["attempt 1", "attempt 2", "attempt 3", "attempt 4", "attempt 5"]);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_second_engine_on_one_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), []).await;
    let second = Engine::builder().data_dir(dir.path()).start().await.unwrap_err();
    assert!(matches!(&second, Error::Locked { path, .. } if path == dir.path()), "{second}");
    assert!(second.to_string().contains("is locked by another process"), "{second}");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A damaged record is reported with the saga and sequence number, never decoded into
/// something else, and the saga is parked with that reason instead of being run.
#[tokio::test]
async fn a_corrupt_record_is_a_typed_error_naming_the_saga_and_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let reached = Arc::new(Notify::new());
    let engine = open(dir.path(), [pipeline(&effects, false, reached.clone())]).await;
    engine.start(SagaRun::new("pipeline", "c1", &"app".to_string()).unwrap()).await.unwrap();
    reached.notified().await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);

    // Flip one byte of the second journal record, and truncate the third, behind the store's
    // back.
    {
        let db = sled::open(dir.path().join("journal")).unwrap();
        let events = db.open_tree("events").unwrap();
        let mut records: Vec<_> = events.scan_prefix(b"c1\xFF").map(|r| r.unwrap()).collect();
        assert!(records.len() >= 3, "{} records", records.len());
        let (key, value) = records.remove(1);
        let mut damaged = value.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        events.insert(key, damaged).unwrap();
        let (key, value) = records.remove(1);
        events.insert(key, &value[..value.len() / 2]).unwrap();
        db.flush().unwrap();
    }

    let store = SledStore::open(dir.path()).unwrap();
    let err = hodei_core::EventStore::history(&store, &SagaId::new("c1").unwrap()).unwrap_err();
    match &err {
        Error::CorruptRecord { saga, seq: Some(1), reason } => {
            assert_eq!(saga, "c1");
            assert!(reason.contains("checksum mismatch"), "{reason}");
        }
        other => panic!("expected CorruptRecord at 1, got {other:?}"),
    }
    drop(store);

    let engine = open(dir.path(), [pipeline(&effects, true, Arc::new(Notify::new()))]).await;
    let status = engine.status(&SagaId::new("c1").unwrap()).unwrap().status;
    assert!(
        matches!(&status, SagaStatus::Parked { reason } if reason.contains("corrupt record for saga c1 at sequence 1")),
        "{status:?}"
    );
    assert!(matches!(engine.history(&SagaId::new("c1").unwrap()), Err(Error::CorruptRecord { .. })));
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}
