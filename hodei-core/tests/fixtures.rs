//! Committed journal fixtures: journals written by an earlier build, one run per primitive,
//! replayed by every later build. A change that breaks old journals (an event variant moved, a
//! field changed, replay reading a journal differently) fails here.
//!
//! Each fixture is a `.journal` file (a [`JournalFile`], in the stores' record format) and a
//! `.json` file, the same events as JSON, for review and to catch an event decoded as another.
//! They were written by [`write_journal_fixtures`], which is ignored: fixtures are written once,
//! by the build whose journals they keep, and never rewritten by a later one. When the event
//! model grows, add a run that journals the new event and write only its files:
//! `HODEI_FIXTURES_WRITE=<run id> cargo test -p hodei-core --test fixtures -- --ignored`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hodei_core::testing::TestEnv;
use hodei_core::{
    Branch, CompensationContext, Engine, Event, EventStore, JournalFile, MemoryStore, Outcome, RetryPolicy,
    SagaContext, SagaDefinition, SagaId, SagaRun, SagaStatus, StepError,
};

/// The runs the fixtures hold, by id: `(id, still in flight when written)`.
const FIXTURES: [(&str, bool); 13] = [
    ("steps", false),
    ("retries", false),
    ("compensation", false),
    ("timers", false),
    ("signals", false),
    ("signal-waiting", true),
    ("branches", false),
    ("child", false),
    ("child-parent", false),
    ("cancel", false),
    ("fork-source", false),
    ("fork", false),
    ("patch", false),
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journals")
}

async fn step<O>(ctx: &SagaContext, name: &str, output: O) -> Result<O, StepError>
where
    O: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    ctx.step(name)
        .run(move |_, _: ()| {
            let output = output.clone();
            async move { Ok::<_, StepError>(output) }
        })
        .await
}

/// The code the fixtures were written by. Later builds keep it as it is: the fixtures test the
/// engine's reading of old journals, not changes to these sagas.
fn definitions(fail_once: Arc<AtomicBool>) -> Vec<SagaDefinition> {
    let attempts = Arc::new(AtomicU32::new(0));
    vec![
        SagaDefinition::new("steps", 1, |ctx, n: u32| async move {
            let a = step(&ctx, "a", n + 1).await?;
            step(&ctx, "b", a * 2).await
        }),
        SagaDefinition::new("retries", 1, move |ctx, _: ()| {
            let attempts = attempts.clone();
            async move {
                ctx.step("flaky")
                    .retry(RetryPolicy::attempts(3).initial_backoff(Duration::from_secs(60)).jitter(0.0))
                    .run(move |_, _: ()| {
                        let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            match attempt {
                                1 | 2 => Err(StepError::retryable(format!("attempt {attempt} failed"))),
                                _ => Ok(attempt),
                            }
                        }
                    })
                    .await
            }
        }),
        SagaDefinition::new("compensation", 1, |ctx, _: ()| async move {
            ctx.step("reserve")
                .compensate(|_: CompensationContext<(), String>| async { Ok(()) })
                .run(|_, _: ()| async { Ok::<_, StepError>("reservation-1".to_string()) })
                .await?;
            ctx.step("charge")
                .run(|_, _: ()| async { Err::<(), _>(StepError::terminal("card declined")) })
                .await
        }),
        SagaDefinition::new("timers", 1, |ctx, _: ()| async move {
            ctx.sleep(Duration::from_secs(3600)).await;
            step(&ctx, "after", ()).await
        }),
        SagaDefinition::new("signals", 1, |ctx, _: ()| async move {
            let approver: String = ctx.wait_signal("approve").await?;
            let second: Option<bool> = ctx.wait_signal_timeout("second", Duration::from_secs(600)).await?;
            Ok(format!("{approver} {second:?}"))
        }),
        SagaDefinition::new("branches", 1, |ctx, _: ()| async move {
            let all = ctx
                .all(
                    "build",
                    (0..2u32)
                        .map(|i| {
                            Branch::new(move |ctx: SagaContext| async move {
                                step(&ctx, &format!("build-{i}"), i).await
                            })
                        })
                        .collect(),
                )
                .await?;
            let (winner, _) = ctx
                .first(
                    "mirror",
                    vec![
                        Branch::new(|ctx: SagaContext| async move { step(&ctx, "fast", 1u32).await }),
                        // Running when the fast one wins: it is cancelled.
                        Branch::new(|ctx: SagaContext| async move {
                            ctx.step("slow")
                                .run(|_, _: ()| std::future::pending::<Result<u32, StepError>>())
                                .await
                        }),
                    ],
                )
                .await?;
            Ok(all.iter().sum::<u32>() + winner as u32)
        }),
        SagaDefinition::new("child", 1, |ctx, n: u32| async move { step(&ctx, "double", n * 2).await }),
        SagaDefinition::new("child-parent", 1, |ctx, _: ()| async move {
            let doubled: u32 =
                ctx.child(SagaRun::new("child", "child", &21u32).map_err(StepError::terminal)?).await?;
            Ok(doubled)
        }),
        SagaDefinition::new("cancel", 1, |ctx, _: ()| async move {
            ctx.step("lock")
                .compensate(|_: CompensationContext<(), ()>| async { Ok(()) })
                .run(|_, _: ()| async { Ok::<_, StepError>(()) })
                .await?;
            ctx.wait_signal::<bool>("never").await?;
            Ok(())
        }),
        SagaDefinition::new("fork", 1, move |ctx, _: ()| {
            let fail_once = fail_once.clone();
            async move {
                step(&ctx, "prepare", 1u32).await?;
                ctx.step("release")
                    .run(move |_, _: ()| {
                        let fail = fail_once.swap(false, Ordering::SeqCst);
                        async move {
                            match fail {
                                true => Err(StepError::terminal("the registry was down")),
                                false => Ok(2u32),
                            }
                        }
                    })
                    .await
            }
        }),
        SagaDefinition::new("patch", 1, |ctx, _: ()| async move {
            if ctx.patched("extra-check").await {
                step(&ctx, "check", ()).await?;
            }
            step(&ctx, "ship", ()).await
        }),
    ]
}

/// 2030-01-01T00:00:00Z, so that the journals' times are the same in every writing.
fn epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_893_456_000)
}

/// Runs every fixture's saga to where its fixture leaves it, on a virtual clock, and returns
/// the journals by run id.
async fn written_journals() -> Vec<JournalFile> {
    let store = Arc::new(MemoryStore::new());
    let mut builder = TestEnv::builder().start_at(epoch()).store(store.clone());
    for definition in definitions(Arc::new(AtomicBool::new(true))) {
        builder = builder.register(definition);
    }
    let env = builder.start().await.unwrap();
    let id = |id: &str| SagaId::new(id).unwrap();
    let finish = async |run: &str, definition: &str, input: serde_json::Value| {
        let handle = env.start(SagaRun::new(definition, run, &input).unwrap()).await.unwrap();
        handle.outcome::<serde_json::Value>().await.unwrap()
    };
    finish("steps", "steps", 1.into()).await;
    finish("retries", "retries", ().into()).await;
    finish("compensation", "compensation", ().into()).await;
    finish("timers", "timers", ().into()).await;
    let signals = env.start(SagaRun::new("signals", "signals", &()).unwrap()).await.unwrap();
    env.signal(signals.id(), "approve", &"alice").await.unwrap();
    signals.outcome::<String>().await.unwrap();
    let waiting = env.start(SagaRun::new("signals", "signal-waiting", &()).unwrap()).await.unwrap();
    env.wait_for(waiting.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    finish("branches", "branches", ().into()).await;
    finish("child-parent", "child-parent", ().into()).await;
    let cancel = env.start(SagaRun::new("cancel", "cancel", &()).unwrap()).await.unwrap();
    env.wait_for(cancel.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    env.cancel_as(cancel.id(), "superseded by 1.3", "ops").await.unwrap();
    cancel.outcome::<()>().await.unwrap();
    finish("fork-source", "fork", ().into()).await;
    let fork = env.fork(&id("fork-source"), 1, "fork").await.unwrap();
    assert_eq!(fork.outcome::<u32>().await.unwrap(), Outcome::Completed(2));
    finish("patch", "patch", ().into()).await;
    FIXTURES
        .iter()
        .map(|(run, _)| JournalFile { saga: id(run), events: store.history(&id(run)).unwrap() })
        .collect()
}

#[tokio::test]
#[ignore = "writes the journal fixtures: run only to add a fixture, with HODEI_FIXTURES_WRITE=<run id>"]
async fn write_journal_fixtures() {
    let only =
        std::env::var("HODEI_FIXTURES_WRITE").expect("HODEI_FIXTURES_WRITE names the fixtures to write");
    std::fs::create_dir_all(dir()).unwrap();
    for journal in written_journals().await {
        if only != "all" && !only.split(',').any(|run| run == journal.saga.as_str()) {
            continue;
        }
        let name = journal.saga.as_str();
        std::fs::write(dir().join(format!("{name}.journal")), journal.to_bytes().unwrap()).unwrap();
        // One event a line: a reviewer reads a fixture as a journal.
        let lines: Vec<String> = journal.events.iter().map(|e| serde_json::to_string(e).unwrap()).collect();
        std::fs::write(dir().join(format!("{name}.json")), format!("[\n{}\n]\n", lines.join(",\n"))).unwrap();
    }
}

fn committed(run: &str) -> JournalFile {
    let bytes = std::fs::read(dir().join(format!("{run}.journal"))).unwrap();
    let journal = JournalFile::from_bytes(&bytes).unwrap_or_else(|e| panic!("fixture {run}: {e}"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join(format!("{run}.json"))).unwrap()).unwrap();
    assert_eq!(
        serde_json::to_value(&journal.events).unwrap(),
        json,
        "fixture {run}: this build reads its journal as other events than the build that wrote it"
    );
    assert_eq!(journal.saga.as_str(), run);
    journal
}

async fn checker() -> Engine {
    let mut builder = Engine::builder().store(MemoryStore::new());
    for definition in definitions(Arc::new(AtomicBool::new(false))) {
        builder = builder.register(definition);
    }
    builder.start().await.unwrap()
}

#[tokio::test]
async fn every_committed_journal_replays_clean_on_this_build() {
    let engine = checker().await;
    for (run, _) in FIXTURES {
        let journal = committed(run);
        let report = engine.check_journal(&journal.saga, &journal.events).await.unwrap();
        assert!(report.verdict.is_clean(), "fixture {run}: {:?}", report.verdict);
        if run == "patch" {
            assert_eq!(report.patches.len(), 1);
            assert!(report.patches[0].new_path, "the fixture's run took the patch's new path");
        }
    }
}

#[tokio::test]
async fn every_primitive_has_a_fixture() {
    let kinds: std::collections::BTreeSet<String> = FIXTURES
        .iter()
        .flat_map(|(run, _)| committed(run).events)
        .map(|r| format!("{:?}", r.event).split([' ', '{', '(']).next().unwrap_or_default().to_string())
        .collect();
    for kind in [
        "SagaStarted",
        "StepStarted",
        "StepStartedAt",
        "StepRetried",
        "StepAttemptFailed",
        "StepCompleted",
        "StepFailed",
        "BodyFailed",
        "CompensationStarted",
        "CompensationCompleted",
        "SagaCompleted",
        "SagaCompensated",
        "TimerStarted",
        "TimerFired",
        "SignalReceived",
        "SignalWaitExpects",
        "SignalWaitStarted",
        "SignalConsumed",
        "SignalWaitTimedOut",
        "BranchesStarted",
        "BranchFinished",
        "StepCancelled",
        "CancelRequestedBy",
        "ForkedFrom",
        "Forked",
        "Patched",
    ] {
        assert!(kinds.contains(kind), "no fixture journals {kind}: {kinds:?}");
    }
}

#[tokio::test]
async fn a_run_in_flight_when_its_fixture_was_written_resumes_and_finishes_on_this_build() {
    let store = Arc::new(MemoryStore::new());
    for (run, in_flight) in FIXTURES {
        if !in_flight {
            continue;
        }
        committed(run).import_into(store.as_ref()).unwrap();
    }
    let mut builder = Engine::builder().store(store.clone());
    for definition in definitions(Arc::new(AtomicBool::new(false))) {
        builder = builder.register(definition);
    }
    let engine = builder.start().await.unwrap();
    let waiting = SagaId::new("signal-waiting").unwrap();
    assert_eq!(engine.status(&waiting).unwrap().status, SagaStatus::Running);
    engine.signal(&waiting, "approve", &"bob").await.unwrap();
    engine.signal(&waiting, "second", &true).await.unwrap();
    let outcome = engine.handle(&waiting).unwrap().outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Completed("bob Some(true)".into()));
}
