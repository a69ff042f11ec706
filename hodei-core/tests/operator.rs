//! An operator's verbs on a real engine over sled: pause and resume (across a restart),
//! retry now, retrying a failed compensation (across a restart), cancel of a paused saga, and
//! who asked for each, as the journal and the timeline name them.
#![cfg(feature = "sled")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hodei_core::{
    CompensationContext, Engine, EngineEvent, EngineEventKind, Error, Event, Outcome, RecordedEvent,
    RetryPolicy, SagaDefinition, SagaFilter, SagaId, SagaRun, SagaStatus, StepError, Timeline,
};
use support::{Effects, saga};
use tokio::sync::{Notify, broadcast};

async fn open(dir: &std::path::Path, definitions: impl IntoIterator<Item = SagaDefinition>) -> Engine {
    let mut builder = Engine::builder().data_dir(dir);
    for definition in definitions {
        builder = builder.register(definition);
    }
    builder.start().await.unwrap()
}

fn id(id: &str) -> SagaId {
    SagaId::new(id).unwrap()
}

/// Waits until the engine journals an event of saga `saga` that `wanted` accepts.
async fn journaled(
    events: &mut broadcast::Receiver<EngineEvent>,
    saga: &str,
    wanted: impl Fn(&Event) -> bool,
) -> RecordedEvent {
    loop {
        let EngineEvent { saga_id, kind, .. } = events.recv().await.unwrap();
        if let EngineEventKind::Journaled(recorded) = kind
            && saga_id.as_str() == saga
            && wanted(&recorded.event)
        {
            return recorded;
        }
    }
}

/// The position in the journal of the first event `wanted` accepts.
fn position(history: &[RecordedEvent], wanted: impl Fn(&Event) -> bool) -> usize {
    history.iter().position(|r| wanted(&r.event)).unwrap_or_else(|| panic!("{}", Timeline(history)))
}

/// `build`, which waits for `gate` once it has said it started, then `release`.
fn deploy(effects: &Effects, reached: Arc<Notify>, gate: Arc<Notify>) -> SagaDefinition {
    let fx = effects.clone();
    saga("deploy", 1, move |ctx, _: ()| {
        let (fx, reached, gate) = (fx.clone(), reached.clone(), gate.clone());
        async move {
            let fx1 = fx.clone();
            ctx.step("build")
                .compensate(move |_: CompensationContext<(), ()>| {
                    let fx = fx1.clone();
                    async move {
                        fx.push("undo build".into());
                        Ok(())
                    }
                })
                .run(|_, ()| {
                    let (fx, reached, gate) = (fx.clone(), reached.clone(), gate.clone());
                    async move {
                        fx.push("build".into());
                        reached.notify_one();
                        gate.notified().await;
                        Ok::<_, StepError>(())
                    }
                })
                .await?;
            ctx.step("release")
                .run(|_, ()| {
                    let fx = fx.clone();
                    async move {
                        fx.push("release".into());
                        Ok::<_, StepError>("v1".to_string())
                    }
                })
                .await
        }
    })
}

/// A pause lets the running step finish and holds the next one, through a restart, until a
/// resume: the journal shows the pause before the step's end and the resume before the next
/// step's start, with who asked for each.
#[tokio::test]
async fn a_paused_saga_stays_paused_across_a_restart_and_completes_once_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let engine = open(dir.path(), [deploy(&effects, reached.clone(), gate.clone())]).await;
    let mut events = engine.subscribe();
    engine.start(SagaRun::new("deploy", "d1", &()).unwrap()).await.unwrap();
    reached.notified().await;

    engine.pause(&id("d1"), "alice").await.unwrap();
    assert_eq!(engine.status(&id("d1")).unwrap().status, SagaStatus::Paused);
    engine.pause(&id("d1"), "alice").await.unwrap();
    let pauses = |engine: &Engine| {
        engine.history(&id("d1")).unwrap().iter().filter(|r| matches!(r.event, Event::Paused { .. })).count()
    };
    assert_eq!(pauses(&engine), 1, "pausing a paused saga journals nothing");
    let listed = engine.list(&SagaFilter::default().status(&SagaStatus::Paused)).unwrap();
    assert_eq!(listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["d1"]);

    // The running step goes on to its end; the saga then waits, so shutdown finds no step
    // running to cut off.
    gate.notify_one();
    journaled(&mut events, "d1", |e| matches!(e, Event::StepCompleted { step: 0, .. })).await;
    let report = engine.shutdown(Duration::from_secs(30)).await.unwrap();
    assert_eq!(report.interrupted, Vec::<SagaId>::new());
    assert_eq!(report.in_flight, [id("d1")]);
    drop(engine);

    let engine = open(dir.path(), [deploy(&effects, reached.clone(), gate.clone())]).await;
    assert_eq!(engine.status(&id("d1")).unwrap().status, SagaStatus::Paused);
    engine.resume(&id("d1"), "bob").await.unwrap();
    let outcome = engine.handle(&id("d1")).unwrap().outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Completed("v1".into()));
    assert_eq!(effects.take(), ["build", "release"]);

    let history = engine.history(&id("d1")).unwrap();
    let paused = position(&history, |e| matches!(e, Event::Paused { by } if by == "alice"));
    let built = position(&history, |e| matches!(e, Event::StepCompleted { step: 0, .. }));
    let resumed = position(&history, |e| matches!(e, Event::Resumed { by } if by == "bob"));
    let released = position(&history, |e| matches!(e.step_start(), Some((_, "release"))));
    assert!(paused < built && built < resumed && resumed < released, "{}", Timeline(&history));
    let timeline = Timeline(&history).to_string();
    assert!(timeline.contains("paused by alice") && timeline.contains("resumed by bob"), "{timeline}");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A cancel of a paused saga lifts the pause and compensates at once; the next step never
/// starts, and the journal names who cancelled.
#[tokio::test]
async fn a_paused_saga_is_cancelled_and_compensates() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let engine = open(dir.path(), [deploy(&effects, reached.clone(), gate.clone())]).await;
    let mut events = engine.subscribe();
    let run = engine.start(SagaRun::new("deploy", "d2", &()).unwrap()).await.unwrap();
    reached.notified().await;
    engine.pause(&id("d2"), "alice").await.unwrap();
    gate.notify_one();
    journaled(&mut events, "d2", |e| matches!(e, Event::StepCompleted { step: 0, .. })).await;

    engine.cancel_as(&id("d2"), "wrong commit", "carol").await.unwrap();
    let outcome = run.outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Compensated { cause: "cancelled: wrong commit".into() });
    assert_eq!(effects.take(), ["build", "undo build"]);
    let history = engine.history(&id("d2")).unwrap();
    assert!(
        history.iter().any(
            |r| matches!(&r.event, Event::CancelRequestedBy { reason, by } if reason == "wrong commit" && by == "carol")
        ),
        "{}",
        Timeline(&history)
    );
    assert!(Timeline(&history).to_string().contains("cancel requested by carol: wrong commit"));
    let err = engine.pause(&id("d2"), "alice").await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidState { status: SagaStatus::Compensated, action: "pause", .. }),
        "{err:?}"
    );
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A step that failed once waits an hour to retry; the test finishes only because retry-now
/// starts its next attempt at once, and the journal shows the decision between the two.
#[tokio::test]
async fn retry_now_cuts_a_long_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let failed_once = Arc::new(AtomicBool::new(false));
    let failed = failed_once.clone();
    let flaky = saga("flaky", 1, move |ctx, _: ()| {
        let failed = failed.clone();
        async move {
            ctx.step("publish")
                .retry(
                    RetryPolicy::attempts(2)
                        .initial_backoff(Duration::from_secs(3600))
                        .max_backoff(Duration::from_secs(3600))
                        .jitter(0.0),
                )
                .run(|_, ()| {
                    let failed = failed.clone();
                    async move {
                        if !failed.swap(true, Ordering::SeqCst) {
                            return Err(StepError::retryable("registry returned 503"));
                        }
                        Ok::<_, StepError>(7u32)
                    }
                })
                .await
        }
    });
    let engine = open(dir.path(), [flaky]).await;
    let mut events = engine.subscribe();
    let run = engine.start(SagaRun::new("flaky", "f1", &()).unwrap()).await.unwrap();
    let failure = journaled(&mut events, "f1", |e| matches!(e, Event::StepAttemptFailed { .. })).await;
    let Event::StepAttemptFailed { retry_at, .. } = failure.event else { unreachable!() };
    assert_eq!(retry_at.0 - failure.at.0, 3_600_000, "the next attempt is due in an hour");

    engine.retry_now(&id("f1"), "dave").await.unwrap();
    assert_eq!(run.outcome::<u32>().await.unwrap(), Outcome::Completed(7));
    let history = engine.history(&id("f1")).unwrap();
    let failed = position(&history, |e| matches!(e, Event::StepAttemptFailed { .. }));
    let asked = position(&history, |e| matches!(e, Event::RetryNowRequested { by } if by == "dave"));
    let retried = position(&history, |e| matches!(e, Event::StepRetried { attempt: 2, .. }));
    assert!(failed < asked && asked < retried, "{}", Timeline(&history));
    assert!(Timeline(&history).to_string().contains("retry now requested by dave"));

    let err = engine.retry_now(&id("f1"), "dave").await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidState { status: SagaStatus::Completed, action: "retry now", .. }),
        "{err:?}"
    );
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Retry-now with nothing waiting to retry is refused with a typed error, and journals nothing.
#[tokio::test]
async fn retry_now_without_a_backoff_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let engine = open(dir.path(), [deploy(&effects, reached.clone(), gate.clone())]).await;
    let run = engine.start(SagaRun::new("deploy", "d3", &()).unwrap()).await.unwrap();
    reached.notified().await;
    let err = engine.retry_now(&id("d3"), "dave").await.unwrap_err();
    assert!(matches!(&err, Error::NothingToRetry(saga) if saga.as_str() == "d3"), "{err:?}");
    gate.notify_one();
    assert_eq!(run.outcome::<String>().await.unwrap(), Outcome::Completed("v1".into()));
    let history = engine.history(&id("d3")).unwrap();
    assert!(!history.iter().any(|r| matches!(r.event, Event::RetryNowRequested { .. })));
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// `checkout` and `deploy` are compensable, `smoke-test` fails for good. The compensation of
/// `deploy` fails the first time it runs (unless `undo_failed` is already set); after that it
/// says it started and waits for `gate` when `hang` is set.
fn release(
    effects: &Effects,
    undo_failed: Arc<AtomicBool>,
    hang: bool,
    reached: Arc<Notify>,
    gate: Arc<Notify>,
) -> SagaDefinition {
    let fx = effects.clone();
    saga("release", 1, move |ctx, _: ()| {
        let (fx, undo_failed, reached, gate) =
            (fx.clone(), undo_failed.clone(), reached.clone(), gate.clone());
        async move {
            let fx1 = fx.clone();
            ctx.step("checkout")
                .compensate(move |_: CompensationContext<(), ()>| {
                    let fx = fx1.clone();
                    async move {
                        fx.push("undo checkout".into());
                        Ok(())
                    }
                })
                .run(|_, ()| async { Ok::<_, StepError>(()) })
                .await?;
            let fx2 = fx.clone();
            ctx.step("deploy")
                .compensate_retrying(RetryPolicy::attempts(3), move |c: CompensationContext<(), ()>| {
                    let (fx, undo_failed) = (fx2.clone(), undo_failed.clone());
                    let (reached, gate) = (reached.clone(), gate.clone());
                    async move {
                        if !undo_failed.swap(true, Ordering::SeqCst) {
                            fx.push("undo deploy failed".into());
                            return Err(StepError::terminal("the load balancer refused"));
                        }
                        fx.push(format!("undo deploy attempt {}", c.attempt));
                        if hang {
                            reached.notify_one();
                            gate.notified().await;
                        }
                        Ok(())
                    }
                })
                .run(|_, ()| async { Ok::<_, StepError>(()) })
                .await?;
            ctx.step("smoke-test")
                .run(|_, ()| async { Err::<(), _>(StepError::terminal("smoke test failed")) })
                .await
        }
    })
}

/// A compensation that failed for good is retried on request: it runs again, then the one it
/// left undone, and the saga ends compensated.
#[tokio::test]
async fn a_failed_compensation_is_retried_and_the_saga_ends_compensated() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let undo_failed = Arc::new(AtomicBool::new(false));
    let engine = open(
        dir.path(),
        [release(&effects, undo_failed, false, Arc::new(Notify::new()), Arc::new(Notify::new()))],
    )
    .await;
    let run = engine.start(SagaRun::new("release", "r1", &()).unwrap()).await.unwrap();
    assert!(matches!(run.outcome::<()>().await.unwrap(), Outcome::CompensationFailed { .. }));
    assert_eq!(effects.take(), ["undo deploy failed"]);

    let err = engine.pause(&id("r1"), "erin").await.unwrap_err();
    assert!(matches!(&err, Error::InvalidState { status: SagaStatus::CompensationFailed, .. }), "{err:?}");
    engine.retry_compensation(&id("r1"), "erin").await.unwrap();
    assert_eq!(
        run.outcome::<()>().await.unwrap(),
        Outcome::Compensated { cause: "smoke test failed".into() }
    );
    assert_eq!(effects.take(), ["undo deploy attempt 1", "undo checkout"]);
    assert_eq!(engine.status(&id("r1")).unwrap().status, SagaStatus::Compensated);
    let timeline = Timeline(&engine.history(&id("r1")).unwrap()).to_string();
    assert!(timeline.contains("compensation retry requested by erin"), "{timeline}");

    let err = engine.retry_compensation(&id("r1"), "erin").await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidState { status: SagaStatus::Compensated, action: "retry its compensation", .. }
        ),
        "{err:?}"
    );
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A compensation retry cut off by a restart goes on after it: the reopened saga is in flight,
/// and the next engine finishes its compensation.
#[tokio::test]
async fn a_compensation_retry_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let undo_failed = Arc::new(AtomicBool::new(false));
    let reached = Arc::new(Notify::new());
    let engine = open(
        dir.path(),
        [release(&effects, undo_failed.clone(), true, reached.clone(), Arc::new(Notify::new()))],
    )
    .await;
    let run = engine.start(SagaRun::new("release", "r2", &()).unwrap()).await.unwrap();
    assert!(matches!(run.outcome::<()>().await.unwrap(), Outcome::CompensationFailed { .. }));
    engine.retry_compensation(&id("r2"), "erin").await.unwrap();
    reached.notified().await;
    let report = engine.shutdown(Duration::ZERO).await.unwrap();
    assert_eq!(report.in_flight, [id("r2")]);
    // The handle holds the engine, and so the data directory.
    drop((run, engine));

    let engine = open(
        dir.path(),
        [release(&effects, undo_failed, false, Arc::new(Notify::new()), Arc::new(Notify::new()))],
    )
    .await;
    let outcome = engine.handle(&id("r2")).unwrap().outcome::<()>().await.unwrap();
    assert_eq!(outcome, Outcome::Compensated { cause: "smoke test failed".into() });
    // The attempt the restart cut off counts; the next one finishes the job.
    assert_eq!(
        effects.take(),
        ["undo deploy failed", "undo deploy attempt 1", "undo deploy attempt 2", "undo checkout"]
    );
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A pause holds between compensations: the running one finishes, the next starts only once
/// the saga is resumed.
#[tokio::test]
async fn a_pause_holds_between_compensations() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let undo_failed = Arc::new(AtomicBool::new(true));
    let engine =
        open(dir.path(), [release(&effects, undo_failed, true, reached.clone(), gate.clone())]).await;
    let mut events = engine.subscribe();
    let run = engine.start(SagaRun::new("release", "r3", &()).unwrap()).await.unwrap();
    reached.notified().await;
    engine.pause(&id("r3"), "grace").await.unwrap();
    gate.notify_one();
    journaled(&mut events, "r3", |e| matches!(e, Event::CompensationCompleted { step: 1 })).await;
    assert_eq!(engine.status(&id("r3")).unwrap().status, SagaStatus::Paused);

    engine.resume(&id("r3"), "grace").await.unwrap();
    assert_eq!(
        run.outcome::<()>().await.unwrap(),
        Outcome::Compensated { cause: "smoke test failed".into() }
    );
    assert_eq!(effects.take(), ["undo deploy attempt 1", "undo checkout"]);
    let history = engine.history(&id("r3")).unwrap();
    let resumed = position(&history, |e| matches!(e, Event::Resumed { .. }));
    let undo_checkout = position(&history, |e| matches!(e, Event::CompensationStarted { step: 0, .. }));
    assert!(resumed < undo_checkout, "{}", Timeline(&history));
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A signal sent as someone is journaled with its sender, and taken like any other.
#[tokio::test]
async fn a_signal_names_its_sender() {
    let dir = tempfile::tempdir().unwrap();
    let approval = saga("approval", 1, |ctx, _: ()| async move {
        let approved: bool = ctx.wait_signal("approve").await?;
        Ok::<_, StepError>(approved)
    });
    let engine = open(dir.path(), [approval]).await;
    let run = engine.start(SagaRun::new("approval", "a1", &()).unwrap()).await.unwrap();
    engine.signal_as(&id("a1"), "approve", &true, "frank").await.unwrap();
    assert_eq!(run.outcome::<bool>().await.unwrap(), Outcome::Completed(true));
    let history = engine.history(&id("a1")).unwrap();
    assert!(
        history
            .iter()
            .any(|r| matches!(&r.event, Event::SignalReceivedBy { name, by, .. } if name == "approve" && by == "frank")),
        "{}",
        Timeline(&history)
    );
    assert!(Timeline(&history).to_string().contains("signal `approve` sent by frank"));
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Every verb names an unknown saga, refuses a bad actor, and resume of a finished saga names
/// its status.
#[tokio::test]
async fn verbs_refuse_unknown_sagas_and_bad_actors() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let (reached, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let engine = open(dir.path(), [deploy(&effects, reached, gate.clone())]).await;
    let ghost = id("ghost");
    let not_found =
        |result: Result<(), Error>| matches!(result, Err(Error::SagaNotFound(saga)) if saga == ghost);
    assert!(not_found(engine.cancel_as(&ghost, "r", "ops").await));
    assert!(not_found(engine.signal_as(&ghost, "s", &(), "ops").await));
    assert!(not_found(engine.pause(&ghost, "ops").await));
    assert!(not_found(engine.resume(&ghost, "ops").await));
    assert!(not_found(engine.retry_now(&ghost, "ops").await));
    assert!(not_found(engine.retry_compensation(&ghost, "ops").await));

    gate.notify_one();
    let run = engine.start(SagaRun::new("deploy", "d4", &()).unwrap()).await.unwrap();
    assert_eq!(run.outcome::<String>().await.unwrap(), Outcome::Completed("v1".into()));
    for actor in ["", "a\nb"] {
        let err = engine.pause(&id("d4"), actor).await.unwrap_err();
        assert!(matches!(err, Error::InvalidActor { .. }), "{err:?}");
    }
    let err = engine.resume(&id("d4"), "ops").await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidState { status: SagaStatus::Completed, action: "resume", .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "saga `d4` is completed: it cannot resume");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}
