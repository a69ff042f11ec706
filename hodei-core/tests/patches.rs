//! Patches across a SIGKILL: a run in flight on the old code and a run started on the patched
//! code both complete, each on its own path, after the processes that ran them were killed.
//!
//! The test binary is its own child (see `crash.rs`): the parent re-runs it filtered to
//! [`patch_child_entry_point`], which does nothing unless [`CHILD_ENV`] names a directory.
#![cfg(all(unix, feature = "sled"))]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{
    Engine, Event, EventStore, Outcome, SagaContext, SagaDefinition, SagaId, SagaRun, SledStore, StepError,
};
use support::crash::{READY, Run, append_line, read_lines, run_child};

mod support;

/// Set in the child only: the directory of its database and its effect log.
const CHILD_ENV: &str = "HODEI_PATCH_CHILD";
/// Which code the child runs: `old` or `patched`.
const CODE_ENV: &str = "HODEI_PATCH_CODE";
const CHILD_TEST: &str = "patch_child_entry_point";
const PATCH: &str = "verify-fetch";

/// fetch, then (patched code only, behind the patch) verify, then a wait for `go`, then ship.
/// Each step body appends `<run> <step>` to the effect log.
fn release(patched_code: bool, effects: PathBuf) -> SagaDefinition {
    SagaDefinition::new("release", 1, move |ctx: SagaContext, _: ()| {
        let effects = effects.clone();
        async move {
            step(&ctx, "fetch", &effects).await?;
            if patched_code && ctx.patched(PATCH).await {
                step(&ctx, "verify", &effects).await?;
            }
            ctx.wait_signal::<bool>("go").await?;
            step(&ctx, "ship", &effects).await
        }
    })
}

async fn step(ctx: &SagaContext, name: &str, effects: &Path) -> Result<(), StepError> {
    let line = format!("{} {name}", ctx.id());
    let effects = effects.to_path_buf();
    ctx.step(name)
        .run(move |_, _: ()| {
            let (line, effects) = (line.clone(), effects.clone());
            async move { append_line(&effects, &line).map_err(StepError::terminal) }
        })
        .await
}

async fn waiting_for_go(engine: &Engine, id: &SagaId) {
    let mut journal = engine.follow(id, 0).unwrap();
    while let Some(recorded) = journal.next().await {
        if matches!(recorded.unwrap().event, Event::SignalWaitStarted { .. }) {
            return;
        }
    }
    panic!("{id} ended before it waited for `go`");
}

/// The child: runs the code `CODE_ENV` names on the directory `CHILD_ENV` names until its run
/// waits for `go`, makes everything durable, says it is ready and waits to be killed.
#[test]
fn patch_child_entry_point() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let patched_code = std::env::var(CODE_ENV).as_deref() == Ok("patched");
    let dir = PathBuf::from(dir);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = Arc::new(SledStore::open(dir.join("db")).unwrap());
        let engine = Engine::builder()
            .store(store.clone())
            .register(release(patched_code, dir.join("effects")))
            .start()
            .await
            .unwrap();
        let id = if patched_code { "new-run" } else { "old-run" };
        let run = engine.start(SagaRun::new("release", id, &()).unwrap()).await.unwrap();
        waiting_for_go(&engine, run.id()).await;
        store.durable().await.unwrap();
        println!("{READY}");
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn runs_before_and_after_a_patch_complete_each_on_its_own_path_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let child_env =
        |code: &str| [(CHILD_ENV, dir.path().display().to_string()), (CODE_ENV, code.to_string())];
    // The old code starts `old-run`; it is killed waiting for `go`, past where the patch goes.
    assert_eq!(run_child(CHILD_TEST, &child_env("old"), 0), Run::Killed);
    // The patched code resumes `old-run` and starts `new-run`; killed with both waiting.
    assert_eq!(run_child(CHILD_TEST, &child_env("patched"), 0), Run::Killed);

    let effects = dir.path().join("effects");
    let engine = Engine::builder()
        .store(SledStore::open(dir.path().join("db")).unwrap())
        .register(release(true, effects.clone()))
        .start()
        .await
        .unwrap();
    for id in ["old-run", "new-run"] {
        let id = SagaId::new(id).unwrap();
        engine.signal(&id, "go", &true).await.unwrap();
        let outcome = engine.handle(&id).unwrap().outcome::<()>().await.unwrap();
        assert_eq!(outcome, Outcome::Completed(()), "{id}");
    }
    let mut ran = read_lines(&effects);
    ran.sort();
    assert_eq!(
        ran,
        ["new-run fetch", "new-run ship", "new-run verify", "old-run fetch", "old-run ship"],
        "each run took its own path once: the old one without `verify`, the new one with it"
    );
    let marker = Event::Patched { key: "1".into(), patch: PATCH.into() };
    let has_marker =
        |id: &str| engine.history(&SagaId::new(id).unwrap()).unwrap().iter().any(|r| r.event == marker);
    assert!(has_marker("new-run"), "the new run journaled that it took the new path");
    assert!(!has_marker("old-run"), "the old run recorded the old path");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}
