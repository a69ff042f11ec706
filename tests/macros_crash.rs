//! A saga written with `#[saga]`/`#[step]` resumes after its process is killed, and never
//! re-runs a step whose completion was recorded. Uses the crash harness of `tests/crash.rs`.
#![cfg(unix)]

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hodei::{
    Engine, Event, EventStore, Outcome, SagaContext, SagaId, SledStore, StepContext, StepError, saga, step,
};
use support::crash::{DONE, EFFECT, READY, Run, XorShift, run_child, wait_for_parent};

const CHILD_ENV: &str = "HODEI_MACRO_CRASH_CHILD";
const CHILD_TEST: &str = "macro_crash_child_entry_point";
const SAGAS: u32 = 4;
/// A run is killed after fewer than this many effects, so the 16 effects of the sagas take
/// several runs. A resumed saga records progress only once its next step has started, and the
/// first effects of a run are the re-run steps of up to four sagas at once: a kill after the
/// fifth effect always lands past some saga's progress, so every few runs must advance.
const MAX_EFFECTS_PER_RUN: u64 = 6;

fn effects_file() -> PathBuf {
    PathBuf::from(std::env::var(CHILD_ENV).expect("child env")).join("effects")
}

/// Appends the side effect outside the database, then reports it to the parent.
fn effect(line: String) -> Result<(), StepError> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(effects_file())?;
    file.write_all(format!("{line}\n").as_bytes())?;
    println!("{EFFECT} {line}");
    wait_for_parent();
    Ok(())
}

#[saga(name = "macro-release")]
async fn release(ctx: SagaContext, seed: u64) -> Result<u64, StepError> {
    let a = checkout(&ctx, seed).await?;
    let b = build(&ctx, a).await?;
    let c = test(&ctx, b).await?;
    deploy(&ctx, c).await
}

// Four steps over one body, each with its own name in the journal.
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn checkout(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, "checkout", n).await
}
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn build(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, "build", n).await
}
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn test(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, "test", n).await
}
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn deploy(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, "deploy", n).await
}

async fn stage_body(ctx: StepContext, name: &str, n: u64) -> Result<u64, StepError> {
    effect(format!("{} {name}", ctx.saga_id))?;
    tokio::task::yield_now().await;
    Ok(n + 1)
}

/// The child: runs (or resumes) every saga to its end. Does nothing unless [`CHILD_ENV`] is set
/// by the parent test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macro_crash_child_entry_point() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    let engine = Engine::builder()
        .data_dir(Path::new(&root).join("db"))
        .register(release::definition())
        .start()
        .await
        .expect("engine");
    println!("{READY}");
    let mut runs = Vec::new();
    for i in 0..SAGAS {
        runs.push(release::start(&engine, format!("m{i}"), &(u64::from(i) * 100)).await.expect("start"));
    }
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.outcome().await.expect("outcome"), Outcome::Completed(i as u64 * 100 + 4));
    }
    engine.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    println!("{DONE}");
}

fn effect_counts(root: &Path) -> HashMap<String, usize> {
    let text = std::fs::read_to_string(root.join("effects")).unwrap_or_default();
    let mut counts = HashMap::new();
    for line in text.lines() {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    counts
}

/// The effect lines of every step whose completion the journal records.
fn recorded(root: &Path) -> Vec<String> {
    let store = SledStore::open(root.join("db")).expect("open the store between runs");
    let mut done = Vec::new();
    for i in 0..SAGAS {
        let id = SagaId::new(format!("m{i}")).unwrap();
        let history = store.history(&id).expect("history");
        let names: HashMap<u32, String> = history
            .iter()
            .filter_map(|r| match &r.event {
                Event::StepStarted { step, name, .. } => Some((*step, name.clone())),
                _ => None,
            })
            .collect();
        for r in &history {
            if let Event::StepCompleted { step, .. } = r.event {
                done.push(format!("{id} {}", names[&step]));
            }
        }
    }
    done
}

#[test]
fn macro_sagas_resume_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let env = [(CHILD_ENV, root.display().to_string())];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut kills, mut finished) = (0, false);
    while !finished {
        let before = effect_counts(root);
        let settled = recorded(root);
        assert!(kills < 200, "no progress after {kills} kills");
        finished = run_child(CHILD_TEST, &env, rng.below(MAX_EFFECTS_PER_RUN)) == Run::Finished;
        kills += u32::from(!finished);
        let after = effect_counts(root);
        for effect in settled {
            assert_eq!(
                after.get(&effect),
                before.get(&effect),
                "`{effect}` ran again after its completion was recorded"
            );
        }
    }
    assert!(kills >= 16 / MAX_EFFECTS_PER_RUN as u32, "only {kills} kills");
    println!("{kills} kills");
    let store = SledStore::open(root.join("db")).unwrap();
    for i in 0..SAGAS {
        let history = store.history(&SagaId::new(format!("m{i}")).unwrap()).unwrap();
        assert!(matches!(history.last().unwrap().event, Event::SagaCompleted { .. }));
    }
    let counts = effect_counts(root);
    for stage in ["checkout", "build", "test", "deploy"] {
        for i in 0..SAGAS {
            assert!(counts.get(&format!("m{i} {stage}")).is_some_and(|n| *n >= 1), "m{i} {stage} never ran");
        }
    }
}
