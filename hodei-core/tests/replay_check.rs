//! Replay checks: a run's journal replayed on changed code reports whether the run would park,
//! and where, in the words the park gives; patched code replays clean.

use std::sync::Arc;
use std::time::Duration;

use hodei_core::testing::TestEnv;
use hodei_core::{
    Branch, Engine, Event, EventStore, MemoryStore, PatchUse, RecordedEvent, ReplayVerdict, SagaContext,
    SagaDefinition, SagaId, SagaRun, SagaStatus, StepError,
};

/// How a variant of the release saga differs from the code the journal was written by.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Change {
    None,
    StepRenamed,
    StepInserted,
    StepRemoved,
    TimerAdded,
    BranchAdded,
    /// The inserted step behind `ctx.patched`.
    StepInsertedBehindPatch,
    /// The patch retired: its call and old path removed, the inserted step kept.
    PatchRetired,
}

async fn step(ctx: &SagaContext, name: &str) -> Result<String, StepError> {
    let owned = name.to_owned();
    ctx.step(name)
        .run(move |_, _: ()| {
            let owned = owned.clone();
            async move { Ok::<_, StepError>(owned) }
        })
        .await
}

/// fetch, a timer, two branches of one step each, a wait for `go`, ship: with `change` made.
fn release(change: Change) -> SagaDefinition {
    SagaDefinition::new("release", 1, move |ctx: SagaContext, _: ()| async move {
        if change == Change::TimerAdded {
            ctx.sleep(Duration::from_secs(5)).await;
        }
        if change == Change::StepInserted {
            step(&ctx, "lint").await?;
        }
        match change {
            Change::StepRenamed => step(&ctx, "download").await?,
            Change::StepRemoved => String::new(),
            _ => step(&ctx, "fetch").await?,
        };
        let verify = match change {
            Change::StepInsertedBehindPatch => ctx.patched("verify-fetch").await,
            Change::PatchRetired => true,
            _ => false,
        };
        if verify {
            step(&ctx, "verify").await?;
        }
        ctx.sleep(Duration::from_secs(60)).await;
        let count = if change == Change::BranchAdded { 3 } else { 2 };
        let branches = (0..count)
            .map(|i| {
                Branch::new(move |ctx: SagaContext| async move { step(&ctx, &format!("test-{i}")).await })
            })
            .collect();
        ctx.all("tests", branches).await?;
        ctx.wait_signal::<bool>("go").await?;
        step(&ctx, "ship").await?;
        Ok(())
    })
}

/// The journal of a run of the unchanged saga, waiting for `go`; with `finish`, after `go`.
async fn journal(id: &str, finish: bool) -> Vec<RecordedEvent> {
    let env = TestEnv::builder().register(release(Change::None)).start().await.unwrap();
    let run = env.start(SagaRun::new("release", id, &()).unwrap()).await.unwrap();
    env.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    if finish {
        env.signal(run.id(), "go", &true).await.unwrap();
        run.outcome::<()>().await.unwrap();
    }
    env.history(run.id()).unwrap()
}

async fn check(change: Change, id: &str, history: &[RecordedEvent]) -> (ReplayVerdict, Vec<PatchUse>) {
    let checker =
        Engine::builder().store(MemoryStore::new()).register(release(change)).start().await.unwrap();
    let report = checker.check_journal(&SagaId::new(id).unwrap(), history).await.unwrap();
    assert_eq!((report.definition.as_str(), report.version), ("release", 1));
    (report.verdict, report.patches)
}

fn parks(reason: &str) -> ReplayVerdict {
    ReplayVerdict::WouldPark { reason: reason.into() }
}

#[tokio::test]
async fn each_change_that_parks_is_reported_with_the_operation_and_the_clean_ones_are_clean() {
    let history = journal("in-flight", false).await;
    let cases = [
        (Change::None, ReplayVerdict::Clean { next: Some("the wait for signal `go`".into()) }),
        (
            Change::StepRenamed,
            parks("step 0: the code now calls `download`, but the journal recorded `fetch` there"),
        ),
        (
            Change::StepInserted,
            parks("step 0: the code now calls `lint`, but the journal recorded `fetch` there"),
        ),
        (
            Change::StepRemoved,
            parks("operation 0: the code now sets a timer, but the journal recorded a step there"),
        ),
        (
            Change::TimerAdded,
            parks("operation 0: the code now sets a timer, but the journal recorded a step there"),
        ),
        (
            Change::BranchAdded,
            parks(
                "operation 2: the code now runs 3 branches in `tests` (All), but the journal recorded 2 in `tests` (All)",
            ),
        ),
        (
            Change::StepInsertedBehindPatch,
            ReplayVerdict::Clean { next: Some("the wait for signal `go`".into()) },
        ),
    ];
    for (change, expected) in cases {
        let (verdict, _) = check(change, "in-flight", &history).await;
        assert_eq!(verdict, expected, "{change:?}");
    }
}

#[tokio::test]
async fn a_check_reports_what_a_restart_on_the_changed_code_parks_the_run_for() {
    // The same run, resumed on the renamed code by a real engine: its park reason is the
    // check's, word for word.
    let store = Arc::new(MemoryStore::new());
    let first =
        TestEnv::builder().store(store.clone()).register(release(Change::None)).start().await.unwrap();
    let run = first.start(SagaRun::new("release", "resumed", &()).unwrap()).await.unwrap();
    first.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    first.shutdown(Duration::from_secs(5)).await.unwrap();
    let id = run.id().clone();
    let history = store.history(&id).unwrap();
    let (verdict, _) = check(Change::StepRenamed, "resumed", &history).await;
    let engine =
        Engine::builder().store(store.clone()).register(release(Change::StepRenamed)).start().await.unwrap();
    let mut status = engine.status(&id).unwrap().status;
    let mut events = engine.subscribe();
    while !matches!(status, SagaStatus::Parked { .. }) {
        let _ = events.recv().await;
        status = engine.status(&id).unwrap().status;
    }
    let SagaStatus::Parked { reason } = status else { unreachable!() };
    assert_eq!(verdict, ReplayVerdict::WouldPark { reason });
}

#[tokio::test]
async fn a_finished_journal_replays_clean_and_a_removed_last_step_is_reported() {
    let history = journal("finished", true).await;
    let (verdict, _) = check(Change::None, "finished", &history).await;
    assert_eq!(verdict, ReplayVerdict::Clean { next: None }, "it ends on what the journal records");
    let (verdict, _) = check(Change::StepRemoved, "finished", &history).await;
    assert!(!verdict.is_clean(), "{verdict:?}");
}

#[tokio::test]
async fn the_report_lists_each_patch_with_the_path_each_run_took() {
    // Before the patch: the journal recorded the timer where the patched step now is.
    let old = journal("old-run", false).await;
    let (verdict, patches) = check(Change::StepInsertedBehindPatch, "old-run", &old).await;
    assert!(verdict.is_clean(), "{verdict:?}");
    assert_eq!(patches.len(), 1);
    assert_eq!(
        (patches[0].patch.as_str(), patches[0].key.as_str(), patches[0].new_path),
        ("verify-fetch", "1", false)
    );

    // A run started on the patched code takes the new path and journals the marker.
    let env = TestEnv::builder().register(release(Change::StepInsertedBehindPatch)).start().await.unwrap();
    let run = env.start(SagaRun::new("release", "new-run", &()).unwrap()).await.unwrap();
    env.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    let new = env.history(run.id()).unwrap();
    assert!(
        new.iter().any(|r| r.event == Event::Patched { key: "1".into(), patch: "verify-fetch".into() }),
        "{}",
        hodei_core::Timeline(&new)
    );
    let (verdict, patches) = check(Change::StepInsertedBehindPatch, "new-run", &new).await;
    assert!(verdict.is_clean(), "{verdict:?}");
    assert!(patches[0].new_path);
    // Retired: the new run's marker is ignored, and the old run would park, which is what
    // its `new_path: false` said: the patch cannot go while that run is in flight.
    let (verdict, patches) = check(Change::PatchRetired, "new-run", &new).await;
    assert_eq!(
        (verdict, patches),
        (ReplayVerdict::Clean { next: Some("the wait for signal `go`".into()) }, vec![])
    );
    let (verdict, _) = check(Change::PatchRetired, "old-run", &old).await;
    assert_eq!(
        verdict,
        parks("operation 1: the code now runs step `verify`, but the journal recorded a timer there")
    );
}
