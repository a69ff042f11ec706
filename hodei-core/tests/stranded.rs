//! Moving stranded runs: a run parked by a code change, or waiting for a version no process
//! registers any more, forked onto another version from its last good step, or cancelled. A
//! "restart" is an engine cut off with `shutdown(Duration::ZERO)` and a new one on the same
//! in-memory store, with the code of the next deploy.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hodei_core::{
    CompensationContext, Engine, Error, Event, MemoryStore, Outcome, RecordedEvent, SagaDefinition, SagaId,
    SagaRun, SagaStatus, StepError, StepRef,
};
use support::{Effects, engine_with, saga};
use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;

fn id(id: &str) -> SagaId {
    SagaId::new(id).unwrap()
}

/// What a deploy registers: a definition, and what its steps do.
struct Code {
    effects: Effects,
    /// Told when a step that hangs has started.
    reached: Arc<Notify>,
}

impl Code {
    fn new() -> Self {
        Self { effects: Effects::default(), reached: Arc::new(Notify::new()) }
    }

    /// `build` (undone by `undo build`), `test`, then a last step named `last`. The step named
    /// `hang`, if any, says it started and never ends. Each step body records its name.
    fn pipeline(&self, version: u32, last: &'static str, hang: Option<&'static str>) -> SagaDefinition {
        let (effects, reached) = (self.effects.clone(), self.reached.clone());
        saga("pipeline", version, move |ctx, app: String| {
            let (effects, reached) = (effects.clone(), reached.clone());
            async move {
                let body = |name: &'static str| {
                    let (effects, reached) = (effects.clone(), reached.clone());
                    move |_, input: String| {
                        let (effects, reached) = (effects.clone(), reached.clone());
                        async move {
                            effects.push(name.into());
                            if hang == Some(name) {
                                reached.notify_one();
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, StepError>(input)
                        }
                    }
                };
                let undo = effects.clone();
                let artifact = ctx
                    .step("build")
                    .input(format!("{app}.tar"))
                    .compensate(move |_: CompensationContext<String, String>| {
                        let undo = undo.clone();
                        async move {
                            undo.push("undo build".into());
                            Ok(())
                        }
                    })
                    .run(body("build"))
                    .await?;
                let tested = ctx.step("test").input(format!("{artifact} tested")).run(body("test")).await?;
                ctx.step(last).input(format!("{tested}, {last}")).run(body(last)).await
            }
        })
    }

    /// One step, `lint`, with nothing to compensate; it hangs if `hang`.
    fn lint(&self, version: u32, hang: bool) -> SagaDefinition {
        let (effects, reached) = (self.effects.clone(), self.reached.clone());
        saga("lint", version, move |ctx, _: ()| {
            let (effects, reached) = (effects.clone(), reached.clone());
            async move {
                ctx.step("lint")
                    .run(move |_, ()| {
                        let (effects, reached) = (effects.clone(), reached.clone());
                        async move {
                            effects.push("lint".into());
                            if hang {
                                reached.notify_one();
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, StepError>(())
                        }
                    })
                    .await
            }
        })
    }
}

/// Starts `run` on a first engine, waits until its hanging step started, and cuts the engine
/// off there: the store holds the run in flight.
async fn start_then_cut_off(store: &Arc<MemoryStore>, code: &Code, definition: SagaDefinition, run: SagaRun) {
    let engine = engine_with(store.clone(), [definition]).await;
    engine.start(run).await.unwrap();
    code.reached.notified().await;
    engine.shutdown(Duration::ZERO).await.unwrap();
}

/// Waits until `id` is parked, woken by the engine's events; returns why.
async fn parked(engine: &Engine, id: &SagaId) -> String {
    // Subscribed before the status is read, so a park in between still wakes this.
    let mut events = engine.subscribe();
    loop {
        if let SagaStatus::Parked { reason } = engine.status(id).unwrap().status {
            return reason;
        }
        if let Err(RecvError::Closed) = events.recv().await {
            panic!("the engine stopped before `{id}` parked");
        }
    }
}

fn last_two(history: &[RecordedEvent]) -> [&Event; 2] {
    let n = history.len();
    [&history[n - 2].event, &history[n - 1].event]
}

/// The run parks on a deploy that renamed its last step; moved onto version 2 from its last good
/// step, it completes reusing what it had done, and the source ends for good, linked to its fork.
/// Current-thread, so that the waiter of the source's outcome is waiting before the move.
#[tokio::test(flavor = "current_thread")]
async fn a_parked_run_moves_onto_a_new_version_from_its_last_good_step() {
    let store = Arc::new(MemoryStore::new());
    let code = Code::new();
    let run = SagaRun::new("pipeline", "p1", &"app").unwrap();
    start_then_cut_off(&store, &code, code.pipeline(1, "release", Some("release")), run).await;
    assert_eq!(code.effects.take(), ["build", "test", "release"]);

    let renamed = code.pipeline(1, "publish", None);
    let engine = engine_with(store.clone(), [renamed, code.pipeline(2, "publish", None)]).await;
    let source = id("p1");
    let reason = parked(&engine, &source).await;
    assert_eq!(reason, "step 2: the code now calls `publish`, but the journal recorded `release` there");
    let waiting = engine.handle(&source).unwrap();
    let waiter = tokio::spawn(async move { waiting.outcome::<String>().await });
    tokio::task::yield_now().await;

    let fork = engine.fork_onto(&source, Some(2), None, "p1-moved").await.unwrap();
    assert_eq!(fork.outcome::<String>().await.unwrap(), Outcome::Completed("app.tar tested, publish".into()));
    assert_eq!(code.effects.take(), ["publish"], "build and test are reused, not run again");
    assert_eq!(fork.status().unwrap().version, 2);
    let forked = engine.history(fork.id()).unwrap();
    assert_eq!(forked[1].event, Event::ForkedFrom { source: source.clone(), step: 2 });

    let moved = "moved to fork `p1-moved` (version 2, from step 2)";
    assert_eq!(engine.status(&source).unwrap().status, SagaStatus::Failed);
    assert_eq!(
        last_two(&engine.history(&source).unwrap()),
        [&Event::SagaFailed { cause: moved.into() }, &Event::Forked { fork: id("p1-moved"), step: 2 }]
    );
    assert_eq!(waiter.await.unwrap().unwrap(), Outcome::Failed { cause: moved.into() });
    let err = engine.cancel(&source, "too late").await.unwrap_err();
    assert!(matches!(err, Error::SagaFinished(_)), "{err:?}");
    let report = engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(report.in_flight, Vec::<SagaId>::new());
    drop(engine);

    // A deploy of code that matches the source's journal again does not resume it.
    let engine = engine_with(store, [code.pipeline(1, "release", None)]).await;
    assert_eq!(engine.status(&source).unwrap().status, SagaStatus::Failed);
    let report = engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(report.in_flight, Vec::<SagaId>::new());
    assert_eq!(code.effects.take(), Vec::<String>::new());
}

/// A run of version 1 when only later versions are registered moves onto one of them, by default
/// from the step after the last one it completed; a version that does not replay what it would
/// reuse is refused, leaving the run as it was; registering version 1 later does not resume it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_its_version_moves_onto_a_version_that_replays_it() {
    let store = Arc::new(MemoryStore::new());
    let code = Code::new();
    let run = SagaRun::new("pipeline", "w1", &"app").unwrap();
    start_then_cut_off(&store, &code, code.pipeline(1, "release", Some("test")), run).await;
    assert_eq!(code.effects.take(), ["build", "test"]);

    let renamed_build = saga("pipeline", 3, |ctx, app: String| async move {
        ctx.step("compile").input(format!("{app}.tar")).run(|_, tar: String| async move { Ok(tar) }).await
    });
    let engine = engine_with(store, [code.pipeline(2, "release", None), renamed_build]).await;
    let source = id("w1");
    assert_eq!(engine.status(&source).unwrap().status, SagaStatus::WaitingForVersion);
    // By default onto the newest version, 3, which would park on the reused `build`.
    let err = engine.fork_onto(&source, None, None, "w1-moved").await.unwrap_err();
    let refusal = "version 3 of `pipeline` does not replay what the fork would reuse (step 0: the code now \
                   calls `compile`, but the journal recorded `build` there); fork from an earlier step";
    assert!(matches!(&err, Error::Fork { reason, .. } if reason == refusal), "{err:?}");
    assert!(matches!(engine.status(&id("w1-moved")), Err(Error::SagaNotFound(_))));
    assert_eq!(engine.status(&source).unwrap().status, SagaStatus::WaitingForVersion, "left as it was");

    let fork = engine.fork_onto(&source, Some(2), None, "w1-moved").await.unwrap();
    assert_eq!(fork.outcome::<String>().await.unwrap(), Outcome::Completed("app.tar tested, release".into()));
    assert_eq!(
        code.effects.take(),
        ["test", "release"],
        "build is reused; test, never completed, runs again"
    );
    assert_eq!(fork.status().unwrap().version, 2);
    assert_eq!(
        engine.history(fork.id()).unwrap()[1].event,
        Event::ForkedFrom { source: source.clone(), step: 1 }
    );

    let moved = "moved to fork `w1-moved` (version 2, from step 1)";
    assert_eq!(
        last_two(&engine.history(&source).unwrap()),
        [&Event::SagaFailed { cause: moved.into() }, &Event::Forked { fork: id("w1-moved"), step: 1 }]
    );
    let outcome = engine.handle(&source).unwrap().outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Failed { cause: moved.into() });

    engine.register(code.pipeline(1, "release", None)).unwrap();
    assert_eq!(engine.status(&source).unwrap().status, SagaStatus::Failed, "not resumed by its version");
    let report = engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert_eq!(report.in_flight, Vec::<SagaId>::new());
    assert_eq!(code.effects.take(), Vec::<String>::new());
}

/// Cancelling a parked run runs no compensation (the code that would is not the code that
/// matches its journal): it ends compensation-failed, `build` listed as undone. Once code that
/// matches its journal is deployed, retrying the compensation undoes `build`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_parked_run_ends_at_once_and_compensates_once_its_code_matches() {
    let store = Arc::new(MemoryStore::new());
    let code = Code::new();
    let run = SagaRun::new("pipeline", "c1", &"app").unwrap();
    start_then_cut_off(&store, &code, code.pipeline(1, "release", Some("release")), run).await;
    code.effects.take();

    let engine = engine_with(store.clone(), [code.pipeline(1, "publish", None)]).await;
    let source = id("c1");
    let reason = parked(&engine, &source).await;
    engine.cancel_as(&source, "release withdrawn", "alice").await.unwrap();
    assert_eq!(engine.status(&source).unwrap().status, SagaStatus::CompensationFailed);
    assert_eq!(code.effects.take(), Vec::<String>::new(), "no compensation ran");
    let error = format!(
        "not compensated: the run was parked ({reason}), and its compensations need code that matches \
         its journal; deploy such code, then retry the compensation"
    );
    assert_eq!(
        last_two(&engine.history(&source).unwrap()),
        [
            &Event::CancelRequestedBy { reason: "release withdrawn".into(), by: "alice".into() },
            &Event::SagaCompensationFailed { step: 0, error: error.clone(), undone: vec![0] },
        ]
    );
    let build = StepRef { index: 0, name: "build".into() };
    assert_eq!(
        engine.handle(&source).unwrap().outcome::<String>().await.unwrap(),
        Outcome::CompensationFailed { step: build.clone(), error, undone: vec![build] }
    );
    let err = engine.cancel(&source, "again").await.unwrap_err();
    assert!(matches!(err, Error::SagaFinished(_)), "{err:?}");
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);

    let engine = engine_with(store, [code.pipeline(1, "release", None)]).await;
    engine.retry_compensation(&source, "alice").await.unwrap();
    let outcome = engine.handle(&source).unwrap().outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Compensated { cause: "cancelled: release withdrawn".into() });
    assert_eq!(code.effects.take(), ["undo build"], "only the compensation ran; no step ran again");
}

/// Cancelling a run waiting for its version ends it at once: failed with nothing to
/// compensate; compensation-failed, naming the version, when a started step has a compensation,
/// which runs once the version is registered and the compensation retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_waiting_for_its_version_ends_at_once() {
    let store = Arc::new(MemoryStore::new());
    let code = Code::new();
    start_then_cut_off(&store, &code, code.lint(1, true), SagaRun::new("lint", "l1", &()).unwrap()).await;
    let run = SagaRun::new("pipeline", "w2", &"app").unwrap();
    start_then_cut_off(&store, &code, code.pipeline(1, "release", Some("test")), run).await;
    code.effects.take();

    let engine = engine_with(store, [code.lint(2, false), code.pipeline(2, "release", None)]).await;
    let (lint, pipeline) = (id("l1"), id("w2"));
    assert_eq!(engine.status(&lint).unwrap().status, SagaStatus::WaitingForVersion);
    engine.cancel(&lint, "not needed").await.unwrap();
    assert_eq!(
        engine.handle(&lint).unwrap().outcome::<()>().await.unwrap(),
        Outcome::Failed { cause: "cancelled: not needed".into() }
    );

    engine.cancel(&pipeline, "not needed").await.unwrap();
    let error = "not compensated: this engine registers no version 1 of `pipeline`, whose code its \
                 compensations need; register it, then retry the compensation";
    assert_eq!(
        last_two(&engine.history(&pipeline).unwrap()),
        [
            &Event::CancelRequested { reason: "not needed".into() },
            &Event::SagaCompensationFailed { step: 0, error: error.into(), undone: vec![0] },
        ]
    );
    assert_eq!(code.effects.take(), Vec::<String>::new(), "no step and no compensation ran");

    engine.register(code.pipeline(1, "release", None)).unwrap();
    assert_eq!(
        engine.status(&pipeline).unwrap().status,
        SagaStatus::CompensationFailed,
        "ended, not resumed"
    );
    engine.retry_compensation(&pipeline, "alice").await.unwrap();
    let outcome = engine.handle(&pipeline).unwrap().outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Compensated { cause: "cancelled: not needed".into() });
    assert_eq!(code.effects.take(), ["undo build"]);
}

/// What a fork refuses: a run still running, a version nobody registers, a completed run with
/// no step named, an input the version does not take; nothing is created by a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_refuses_runs_it_cannot_move() {
    let code = Code::new();
    let takes_a_number = saga("pipeline", 3, |_, n: u32| async move { Ok::<_, StepError>(n) });
    let engine = engine_with(
        MemoryStore::new(),
        [code.pipeline(1, "release", Some("release")), code.pipeline(2, "release", None), takes_a_number],
    )
    .await;
    engine.start(SagaRun::new("pipeline", "running", &"app").unwrap().version(1)).await.unwrap();
    code.reached.notified().await;
    let err = engine.fork_onto(&id("running"), Some(2), None, "f1").await.unwrap_err();
    assert!(
        matches!(&err, Error::Fork { reason, .. } if reason.starts_with("it is still running")),
        "{err:?}"
    );

    let done = engine.start(SagaRun::new("pipeline", "done", &"app").unwrap().version(2)).await.unwrap();
    assert!(matches!(done.outcome::<String>().await.unwrap(), Outcome::Completed(_)));
    let err = engine.fork_onto(done.id(), None, None, "f2").await.unwrap_err();
    assert!(matches!(&err, Error::Fork { reason, .. } if reason.contains("name the step")), "{err:?}");
    let err = engine.fork_onto(done.id(), Some(7), Some(0), "f3").await.unwrap_err();
    assert!(matches!(err, Error::UnknownSaga { version: Some(7), .. }), "{err:?}");
    let err = engine.fork_onto(done.id(), Some(3), Some(0), "f4").await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { version: 3, .. }), "{err:?}");
    for refused in ["f1", "f2", "f3", "f4"] {
        assert!(matches!(engine.status(&id(refused)), Err(Error::SagaNotFound(_))), "{refused}");
    }

    // From step 1 of the completed run on its own version: build is reused, the rest runs.
    code.effects.take();
    let again = engine.fork_onto(done.id(), None, Some(1), "f5").await.unwrap();
    assert_eq!(
        again.outcome::<String>().await.unwrap(),
        Outcome::Completed("app.tar tested, release".into())
    );
    assert_eq!(code.effects.take(), ["test", "release"]);
}
