//! Behaviour of the saga engine through its public API: compensation, retries, timeouts,
//! idempotency, payload limits, cancellation and inspection. Restart, versioning and
//! corruption live in `tests/recovery.rs`; crashes of a real process in `tests/crash.rs`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hodei_core::{
    CompensationContext, Engine, EngineEventKind, Error, Event, MemoryStore, Outcome, RetryPolicy,
    SagaFilter, SagaId, SagaRun, SagaStatus, StepError, StepRef,
};
use support::{Effects, engine_with, events_of, saga};

/// Three compensable steps, then one that fails for good: the three are undone newest first,
/// and the failed step has no compensation to run.
#[tokio::test]
async fn a_terminal_failure_compensates_completed_steps_in_reverse_order() {
    let effects = Effects::default();
    let fx = effects.clone();
    let def = saga("release", 1, move |ctx, _: ()| {
        let fx = fx.clone();
        async move {
            for name in ["checkout", "build", "deploy"] {
                let fx = fx.clone();
                ctx.step(name)
                    .input(name.to_string())
                    .compensate(move |c: CompensationContext<String, String>| {
                        let fx = fx.clone();
                        async move {
                            fx.push(format!("undo {} after {:?}", c.input, c.output));
                            Ok(())
                        }
                    })
                    .run(|_, n: String| async move { Ok::<_, StepError>(format!("{n} done")) })
                    .await?;
            }
            ctx.step("smoke-test")
                .retry(RetryPolicy::none())
                .run(|_, ()| async { Err::<(), _>(StepError::terminal("health check failed")) })
                .await?;
            Ok(())
        }
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("release", "r1", &()).unwrap()).await.unwrap();
    assert_eq!(
        run.outcome::<()>().await.unwrap(),
        Outcome::Compensated { cause: "health check failed".into() }
    );
    assert_eq!(
        effects.take(),
        [
            "undo deploy after Some(\"deploy done\")",
            "undo build after Some(\"build done\")",
            "undo checkout after Some(\"checkout done\")"
        ]
    );
    let kinds = events_of(&engine, "r1");
    assert!(kinds.ends_with(&[
        "BodyFailed",
        "CompensationStarted",
        "CompensationCompleted",
        "CompensationStarted",
        "CompensationCompleted",
        "CompensationStarted",
        "CompensationCompleted",
        "SagaCompensated"
    ]));
    assert_eq!(engine.status(&SagaId::new("r1").unwrap()).unwrap().status, SagaStatus::Compensated);
}

#[tokio::test]
async fn a_failure_with_nothing_to_compensate_is_failed() {
    let def = saga("lint", 1, |ctx, _: ()| async move {
        ctx.step("lint").run(|_, ()| async { Err::<(), _>(StepError::terminal("3 warnings")) }).await
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("lint", "l1", &()).unwrap()).await.unwrap();
    assert_eq!(run.outcome::<()>().await.unwrap(), Outcome::Failed { cause: "3 warnings".into() });
}

/// Two retryable failures, then success: three attempts, each journaled, the waits following
/// the policy (checked on the journaled due times, not on a clock).
#[tokio::test]
async fn retryable_failures_are_retried_under_the_policy() {
    let effects = Effects::default();
    let fx = effects.clone();
    let policy =
        RetryPolicy::attempts(5).initial_backoff(Duration::from_millis(20)).multiplier(3.0).jitter(0.0);
    let def = saga("flaky", 1, move |ctx, _: ()| {
        let fx = fx.clone();
        async move {
            ctx.step("fetch")
                .retry(policy)
                .run(|s, ()| {
                    let fx = fx.clone();
                    async move {
                        fx.push(format!("attempt {} key {}", s.attempt, s.idempotency_key));
                        if s.attempt < 3 { Err(StepError::retryable("503")) } else { Ok(s.attempt) }
                    }
                })
                .await
        }
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("flaky", "f1", &()).unwrap()).await.unwrap();
    assert_eq!(run.outcome::<u32>().await.unwrap(), Outcome::Completed(3));
    assert_eq!(effects.take(), ["attempt 1 key f1/0", "attempt 2 key f1/0", "attempt 3 key f1/0"]);

    let history = engine.history(&SagaId::new("f1").unwrap()).unwrap();
    let waits: Vec<u64> = history
        .iter()
        .filter_map(|r| match &r.event {
            Event::StepAttemptFailed { retry_at, .. } => Some(retry_at.0 - r.at.0),
            _ => None,
        })
        .collect();
    // The due time is the failure's clock reading plus the backoff; the record's own time is
    // read a moment later, when it is appended, so the gap can be a millisecond or two short.
    assert_eq!(waits.len(), 2, "{waits:?}");
    for (wait, backoff) in waits.iter().zip([20, 60]) {
        assert!(
            (backoff - 10..=backoff).contains(wait),
            "initial backoff, then times the multiplier: {waits:?}"
        );
    }
    for r in history.iter().filter(|r| matches!(r.event, Event::StepRetried { .. })) {
        let due = history.iter().rev().find_map(|f| match &f.event {
            Event::StepAttemptFailed { retry_at, .. } if f.seq < r.seq => Some(*retry_at),
            _ => None,
        });
        assert!(r.at >= due.unwrap(), "an attempt began before its due time");
    }
}

#[tokio::test]
async fn a_terminal_error_is_not_retried_and_exhausted_retries_fail_the_step() {
    let effects = Effects::default();
    let fx = effects.clone();
    let def = saga("two", 1, move |ctx, _: ()| {
        let fx = fx.clone();
        async move {
            let quick = RetryPolicy::attempts(3).initial_backoff(Duration::ZERO);
            let fx1 = fx.clone();
            let terminal = ctx
                .step("terminal")
                .retry(quick)
                .run(|_, ()| {
                    let fx = fx1.clone();
                    async move {
                        fx.push("terminal".into());
                        Err::<(), _>(StepError::terminal("bad manifest"))
                    }
                })
                .await;
            // The body may handle a step's failure itself and go on.
            assert!(!terminal.unwrap_err().is_retryable());
            ctx.step("exhausted")
                .retry(quick)
                .run(|_, ()| {
                    let fx = fx.clone();
                    async move {
                        fx.push("exhausted".into());
                        Err::<(), _>(StepError::retryable("still down"))
                    }
                })
                .await
        }
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("two", "t1", &()).unwrap()).await.unwrap();
    assert_eq!(run.outcome::<()>().await.unwrap(), Outcome::Failed { cause: "still down".into() });
    assert_eq!(effects.take(), ["terminal", "exhausted", "exhausted", "exhausted"]);
    let history = engine.history(&SagaId::new("t1").unwrap()).unwrap();
    assert!(
        history
            .iter()
            .any(|r| r.event == Event::StepFailed { step: 1, error: "still down".into(), retryable: true })
    );
}

#[tokio::test]
async fn a_step_past_its_timeout_is_cancelled_and_retried() {
    let effects = Effects::default();
    let fx = effects.clone();
    let def = saga("slow", 1, move |ctx, _: ()| {
        let fx = fx.clone();
        async move {
            ctx.step("hang")
                .timeout(Duration::from_millis(30))
                .retry(RetryPolicy::attempts(2).initial_backoff(Duration::ZERO))
                .run(|s, ()| {
                    let fx = fx.clone();
                    async move {
                        fx.push(format!("attempt {}", s.attempt));
                        std::future::pending::<Result<(), StepError>>().await
                    }
                })
                .await
        }
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("slow", "s1", &()).unwrap()).await.unwrap();
    match run.outcome::<()>().await.unwrap() {
        Outcome::Failed { cause } => assert_eq!(cause, "step `hang` timed out after 30ms"),
        other => panic!("{other:?}"),
    }
    assert_eq!(effects.take(), ["attempt 1", "attempt 2"]);
    let kinds = events_of(&engine, "s1");
    assert_eq!(kinds.iter().filter(|k| **k == "StepAttemptFailed").count(), 1);
}

#[tokio::test]
async fn the_saga_id_is_the_idempotency_key() {
    let effects = Effects::default();
    let fx = effects.clone();
    let def = saga("greet", 1, move |ctx, name: String| {
        let fx = fx.clone();
        async move {
            ctx.step("greet")
                .input(name)
                .run(|_, n: String| {
                    let fx = fx.clone();
                    async move {
                        fx.push(n.clone());
                        Ok::<_, StepError>(format!("hello {n}"))
                    }
                })
                .await
        }
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let first = engine.start(SagaRun::new("greet", "g1", &"ada").unwrap()).await.unwrap();
    assert_eq!(first.outcome::<String>().await.unwrap(), Outcome::Completed("hello ada".into()));
    let again = engine.start(SagaRun::new("greet", "g1", &"ada").unwrap()).await.unwrap();
    assert_eq!(again.outcome::<String>().await.unwrap(), Outcome::Completed("hello ada".into()));
    assert_eq!(effects.take(), ["ada"], "the second start returned the first run");

    let other_input = engine.start(SagaRun::new("greet", "g1", &"bob").unwrap()).await.unwrap_err();
    assert!(
        matches!(&other_input, Error::IdempotencyConflict { difference, .. } if difference == "another input")
    );
    let same_version = engine.start(SagaRun::new("greet", "g1", &"ada").unwrap().version(1)).await.unwrap();
    assert_eq!(same_version.id(), first.id(), "naming the version it ran with is the same run");
    assert_eq!(same_version.outcome::<String>().await.unwrap(), Outcome::Completed("hello ada".into()));
    assert_eq!(effects.take(), Vec::<String>::new(), "and runs nothing again");
    let unknown = engine.start(SagaRun::new("nope", "n1", &()).unwrap()).await.unwrap_err();
    assert!(matches!(&unknown, Error::UnknownSaga { name, version: None } if name == "nope"), "{unknown}");
    let unknown_version =
        engine.start(SagaRun::new("greet", "g2", &"x").unwrap().version(7)).await.unwrap_err();
    assert!(matches!(unknown_version, Error::UnknownSaga { version: Some(7), .. }));
    assert!(matches!(SagaRun::new("greet", "", &()), Err(Error::InvalidSagaId { .. })));
}

#[tokio::test]
async fn payloads_over_the_limit_are_refused_and_the_journal_stays_intact() {
    let def = saga("big", 1, |ctx, size: usize| async move {
        ctx.step("small").run(|_, ()| async { Ok::<_, StepError>(1u8) }).await?;
        ctx.step("huge")
            .input(size)
            .run(|_, n: usize| async move { Ok::<_, StepError>(vec![7u8; n]) })
            .await?;
        Ok(())
    });
    let engine = Engine::builder()
        .store(MemoryStore::new())
        .register(def)
        .max_payload_bytes(1024)
        .start()
        .await
        .unwrap();
    let run = engine.start(SagaRun::new("big", "b1", &4096usize).unwrap()).await.unwrap();
    match run.outcome::<()>().await.unwrap() {
        Outcome::Failed { cause } => {
            assert!(cause.contains("over the limit of 1024 bytes"), "{cause}")
        }
        other => panic!("{other:?}"),
    }
    let history = engine.history(&SagaId::new("b1").unwrap()).unwrap();
    assert!(history.iter().all(|r| !matches!(&r.event, Event::StepCompleted { step: 1, .. })));
    assert!(history.last().unwrap().event.is_final());

    let input = engine.start(SagaRun::new("big", "b2", &vec![0u8; 2048]).unwrap()).await.unwrap_err();
    assert!(matches!(input, Error::PayloadTooLarge { limit: 1024, .. }), "{input}");
}

/// Cancelling a saga cancels its running step, then compensates what it started: the running
/// step too, with no output, since its side effect may have happened.
#[tokio::test]
async fn cancel_stops_the_running_step_and_compensates() {
    let effects = Effects::default();
    let fx = effects.clone();
    let started = Arc::new(tokio::sync::Notify::new());
    let started_in_step = started.clone();
    let def = saga("deploy", 1, move |ctx, _: ()| {
        let (fx, started) = (fx.clone(), started_in_step.clone());
        async move {
            let undo = |fx: Effects| {
                move |c: CompensationContext<(), String>| {
                    let fx = fx.clone();
                    async move {
                        fx.push(format!("undo {} {:?} {}", c.name, c.output, c.idempotency_key));
                        Ok(())
                    }
                }
            };
            ctx.step("canary")
                .compensate(undo(fx.clone()))
                .run(|_, ()| async { Ok::<_, StepError>("v2".to_string()) })
                .await?;
            ctx.step("rollout")
                .compensate(undo(fx.clone()))
                .run(|_, ()| {
                    let started = started.clone();
                    async move {
                        started.notify_one();
                        std::future::pending::<Result<String, StepError>>().await
                    }
                })
                .await?;
            Ok(())
        }
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("deploy", "d1", &()).unwrap()).await.unwrap();
    started.notified().await;
    run.cancel("operator pressed stop").await.unwrap();
    assert_eq!(
        run.outcome::<()>().await.unwrap(),
        Outcome::Compensated { cause: "cancelled: operator pressed stop".into() }
    );
    assert_eq!(effects.take(), ["undo rollout None d1/1", "undo canary Some(\"v2\") d1/0"]);
    assert!(events_of(&engine, "d1").contains(&"CancelRequested"));

    let finished = run.cancel("again").await.unwrap_err();
    assert!(matches!(finished, Error::SagaFinished(_)), "{finished}");
    let unknown = engine.cancel(&SagaId::new("ghost").unwrap(), "x").await.unwrap_err();
    assert!(matches!(unknown, Error::SagaNotFound(_)));
}

/// A compensation that fails for good stops the unwinding: the outcome names it and lists what
/// an operator still has to undo, and the older compensations never run.
#[tokio::test]
async fn a_failed_compensation_reports_what_is_left_undone() {
    let effects = Effects::default();
    let fx = effects.clone();
    let def = saga("db", 1, move |ctx, _: ()| {
        let fx = fx.clone();
        async move {
            let fx_a = fx.clone();
            ctx.step("create-db")
                .compensate(move |_: CompensationContext<(), ()>| {
                    let fx = fx_a.clone();
                    async move {
                        fx.push("drop-db".into());
                        Ok(())
                    }
                })
                .run(|_, ()| async { Ok::<_, StepError>(()) })
                .await?;
            ctx.step("migrate")
                .compensate_retrying(
                    RetryPolicy::attempts(2).initial_backoff(Duration::ZERO),
                    |_: CompensationContext<(), ()>| async { Err(StepError::retryable("lock held")) },
                )
                .run(|_, ()| async { Ok::<_, StepError>(()) })
                .await?;
            ctx.step("verify")
                .run(|_, ()| async { Err::<(), _>(StepError::terminal("schema mismatch")) })
                .await
        }
    });
    let engine = engine_with(MemoryStore::new(), [def]).await;
    let run = engine.start(SagaRun::new("db", "db1", &()).unwrap()).await.unwrap();
    let migrate = StepRef { index: 1, name: "migrate".into() };
    let create = StepRef { index: 0, name: "create-db".into() };
    assert_eq!(
        run.outcome::<()>().await.unwrap(),
        Outcome::CompensationFailed {
            step: migrate.clone(),
            error: "lock held".into(),
            undone: vec![migrate, create]
        }
    );
    assert!(effects.take().is_empty(), "create-db's compensation must wait for an operator");
    assert_eq!(engine.status(run.id()).unwrap().status, SagaStatus::CompensationFailed);
    assert_eq!(events_of(&engine, "db1").iter().filter(|k| **k == "CompensationStarted").count(), 2);
}

#[tokio::test]
async fn inspection_lists_filters_streams_and_purges() {
    let def = saga("echo", 1, |ctx, n: u32| async move {
        ctx.step("echo").input(n).run(|_, n: u32| async move { Ok::<_, StepError>(n) }).await
    });
    let parked = saga("stuck", 1, |ctx, _: ()| async move {
        ctx.step("wait").run(|_, ()| std::future::pending::<Result<(), StepError>>()).await
    });
    let engine = engine_with(MemoryStore::new(), [def, parked]).await;
    let mut events = engine.subscribe();
    let done = engine.start(SagaRun::new("echo", "e1", &7u32).unwrap()).await.unwrap();
    done.outcome::<u32>().await.unwrap();
    let _running = engine.start(SagaRun::new("stuck", "w1", &()).unwrap()).await.unwrap();

    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if event.saga_id.as_str() == "e1" {
            seen.push(match event.kind {
                EngineEventKind::Journaled(r) => {
                    format!("{:?}", r.event).split([' ', '{']).next().unwrap().to_string()
                }
                EngineEventKind::Status(s) => format!("status {}", s.kind()),
                _ => "other".into(),
            });
        }
    }
    assert_eq!(seen, ["SagaStarted", "StepStarted", "StepCompleted", "SagaCompleted", "status completed"]);

    let completed = engine.list(&SagaFilter::default().status(&SagaStatus::Completed)).unwrap();
    assert_eq!(completed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["e1"]);
    let stuck = engine.list(&SagaFilter::default().definition("stuck")).unwrap();
    assert_eq!(stuck.len(), 1);
    assert_eq!(stuck[0].status, SagaStatus::Running);

    let history = engine.history(&SagaId::new("e1").unwrap()).unwrap();
    assert!(history.windows(2).all(|w| w[0].at <= w[1].at && w[0].seq + 1 == w[1].seq));

    assert!(engine.purge(Duration::from_secs(3600)).unwrap().is_empty(), "nothing is that old yet");
    let purged = engine.purge(Duration::ZERO).unwrap();
    assert_eq!(purged, [SagaId::new("e1").unwrap()], "running sagas are never purged");
    assert!(matches!(engine.status(&SagaId::new("e1").unwrap()), Err(Error::SagaNotFound(_))));
    assert!(engine.status(&SagaId::new("w1").unwrap()).is_ok());
}
