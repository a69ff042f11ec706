//! A saga written with `#[saga]`/`#[step]` resumes after its process is killed, and never
//! re-runs a step whose completion was recorded or whose result reached the saga body. Uses
//! the crash harness of `hodei-core/tests/support/crash.rs`.
//!
//! The kills land in the step bodies and in the saga body: between steps, at the end of a
//! branch of a fan-out, and while the body awaits something unjournaled with a step's result in
//! hand. Round after round of four sagas, until enough kills landed in the saga body.
//!
//! Replay a failure with `HODEI_MACRO_CRASH_SEED=<seed> cargo test --test macros_crash`.
#![cfg(unix)]

// The engine's test support, shared with its own crash tests.
#[path = "../hodei-core/tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hodei::{
    Branch, Engine, Event, EventStore, Outcome, SagaContext, SagaId, SledStore, StepContext, StepError, saga,
    step,
};
use support::crash::{
    DONE, Key, Kills, Kind, READY, Window, append_line, check_attempts, check_not_rerun, count_effects,
    effect_attempts, format_journal, kill_point, ran_live, read_effects, returned, returned_while_awaiting,
    run_child_at, settle, settle_returned,
};
use support::seed::seed;

const CHILD_ENV: &str = "HODEI_MACRO_CRASH_CHILD";
const ROUND_ENV: &str = "HODEI_MACRO_CRASH_ROUND";
const SEED_ENV: &str = "HODEI_MACRO_CRASH_SEED";
const CHILD_TEST: &str = "macro_crash_child_entry_point";
const SAGAS: u32 = 4;
const STEPS: [&str; 5] = ["checkout", "build", "unit", "e2e", "deploy"];
/// A run is killed after fewer than this many kill-point lines, so the 40 lines of a round
/// (per saga, 5 step bodies and 5 points in its body) take several runs. A resumed saga's
/// first line is a step body's, and a step's result is durable by the time the body offers
/// its next point: with at most two steps at once per saga (the fan-out), the ninth line of a
/// run is always past some saga's progress.
const MAX_LINES_PER_RUN: u64 = 10;
/// Rounds run until this many kills landed in the saga body, and every window was hit.
const MIN_BODY_KILLS: u32 = 50;
const MIN_ROUNDS: u32 = 2;
/// A round needing this many runs, or a test needing this many rounds, makes no progress.
const MAX_RUNS_PER_ROUND: u32 = 200;
const MAX_ROUNDS: u32 = 40;
const WINDOWS: [Window; 4] = [Window::Step, Window::BetweenSteps, Window::AfterBranch, Window::Unjournaled];
/// The saga-body windows every other run aims at ([`Kills::new`]).
const AIMS: [Window; 3] = [Window::BetweenSteps, Window::AfterBranch, Window::Unjournaled];

fn root() -> PathBuf {
    PathBuf::from(std::env::var(CHILD_ENV).expect("child env"))
}

fn effect_log(root: &Path) -> PathBuf {
    root.join("effects")
}

fn saga_id(round: u32, index: u32) -> String {
    format!("r{round}-m{index}")
}

/// Appends the step's side effect outside the database, then reports it to the parent.
fn effect(ctx: &StepContext) -> Result<(), StepError> {
    let line = format!("step {} {} {} {}", ctx.saga_id, ctx.step, ctx.name, ctx.attempt);
    append_line(&effect_log(&root()), &line)?;
    kill_point(Window::Step, &line);
    ran_live(ctx);
    Ok(())
}

#[saga(name = "macro-release")]
async fn release(ctx: SagaContext, seed: u64) -> Result<u64, StepError> {
    let dir = root();
    let a = checkout(&ctx, seed).await?;
    returned(&dir, Window::BetweenSteps, ctx.id(), "checkout");
    let b = build(&ctx, a).await?;
    // With the build in hand, the body awaits something the journal knows nothing of.
    returned_while_awaiting(&dir, ctx.id(), "build").await;
    let suites = ctx
        .all(
            "suites",
            vec![
                Branch::new(move |ctx: SagaContext| async move {
                    let n = unit(&ctx, b).await?;
                    returned(&root(), Window::AfterBranch, ctx.id(), "unit");
                    Ok(n)
                }),
                Branch::new(move |ctx: SagaContext| async move {
                    let n = e2e(&ctx, b).await?;
                    returned(&root(), Window::AfterBranch, ctx.id(), "e2e");
                    Ok(n)
                }),
            ],
        )
        .await?;
    let d = deploy(&ctx, suites.iter().sum()).await?;
    returned(&dir, Window::BetweenSteps, ctx.id(), "deploy");
    Ok(d)
}

// Five steps over one body, each with its own name in the journal.
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn checkout(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, n).await
}
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn build(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, n).await
}
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn unit(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, n).await
}
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn e2e(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, n).await
}
#[step(retry(max_attempts = 1000, backoff = "1ms", jitter = 0.0))]
async fn deploy(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    stage_body(ctx, n).await
}

async fn stage_body(ctx: StepContext, n: u64) -> Result<u64, StepError> {
    effect(&ctx)?;
    tokio::task::yield_now().await;
    Ok(n + 1)
}

/// A saga's input, and its output: checkout and build add 2, each suite 1 to the build's, and
/// deploy 1 to their sum.
fn input(index: u32) -> u64 {
    u64::from(index) * 100
}

fn output(index: u32) -> u64 {
    2 * (input(index) + 3) + 1
}

/// The child: runs (or resumes) every saga of its round to its end. Does nothing unless
/// [`CHILD_ENV`] is set by the parent test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macro_crash_child_entry_point() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    let round: u32 = std::env::var(ROUND_ENV).expect("round").parse().expect("round number");
    let engine = Engine::builder()
        .data_dir(Path::new(&root).join("db"))
        .register(release::definition())
        .start()
        .await
        .expect("engine");
    println!("{READY}");
    let mut runs = Vec::new();
    for i in 0..SAGAS {
        runs.push(release::start(&engine, saga_id(round, i), &input(i)).await.expect("start"));
    }
    for (i, run) in (0..SAGAS).zip(&runs) {
        assert_eq!(run.outcome().await.expect("outcome"), Outcome::Completed(output(i)));
    }
    engine.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    println!("{DONE}");
}

fn histories(root: &Path, round: u32) -> Vec<(String, Vec<hodei::RecordedEvent>)> {
    let store = SledStore::open(root.join("db")).expect("open the store between runs");
    (0..SAGAS)
        .map(|i| {
            let saga = saga_id(round, i);
            let history = store.history(&SagaId::new(saga.clone()).unwrap()).expect("history");
            (saga, history)
        })
        .collect()
}

fn journal_of(root: &Path, saga: &str) -> String {
    let store = SledStore::open(root.join("db")).expect("open the store");
    format_journal(&store.history(&SagaId::new(saga).expect("id")).expect("history"))
}

/// The steps whose completion a journal of the round records, or whose result reached a saga
/// body, with how often each has run so far. None of them may run again.
fn settled(root: &Path, round: u32) -> HashMap<Key, usize> {
    let effects = read_effects(&effect_log(root));
    let counts = count_effects(&effects);
    let mut settled = HashMap::new();
    for (saga, history) in histories(root, round) {
        settle(&saga, &history, &counts, |_| false, &mut settled);
    }
    settle_returned(root, &effect_attempts(&effects), &mut settled);
    settled
}

/// Each saga of a finished round completed, and ran each step's journaled attempts once each.
fn check_round(root: &Path, round: u32) {
    let effects = read_effects(&effect_log(root));
    for (saga, history) in histories(root, round) {
        let journal = format_journal(&history);
        assert!(matches!(history.last().map(|r| &r.event), Some(Event::SagaCompleted { .. })), "{journal}");
        let mut journaled: HashMap<u32, (String, Vec<u32>)> = HashMap::new();
        for recorded in &history {
            match &recorded.event {
                Event::StepStarted { step, name, .. } | Event::StepStartedAt { step, name, .. } => {
                    journaled.insert(*step, (name.clone(), vec![1]));
                }
                Event::StepRetried { step, attempt } => {
                    journaled.get_mut(step).expect("a started step").1.push(*attempt)
                }
                _ => {}
            }
        }
        let mut names: Vec<&str> = journaled.values().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        let mut expected = STEPS.to_vec();
        expected.sort_unstable();
        assert_eq!(names, expected, "{saga}; journal:\n{journal}");
        for (step, (name, attempts)) in &journaled {
            let ran: Vec<u32> = effects
                .iter()
                .filter(|e| e.saga == saga && e.step == *step && e.kind == Kind::Step)
                .map(|e| e.attempt)
                .collect();
            assert!(!ran.is_empty(), "{saga} {name} never ran; journal:\n{journal}");
            check_attempts(&format!("{saga} {name}"), &ran, attempts, true, &journal);
        }
    }
}

#[test]
fn macro_sagas_resume_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut kills = Kills::new(seed(SEED_ENV), MAX_LINES_PER_RUN - 1, &AIMS, MAX_RUNS_PER_ROUND);
    let mut round = 0;
    let enough = |kills: &Kills| kills.in_body() >= MIN_BODY_KILLS && kills.hit_all(&WINDOWS);
    while round < MIN_ROUNDS || (!enough(&kills) && round < MAX_ROUNDS) {
        let env = [(CHILD_ENV, root.display().to_string()), (ROUND_ENV, round.to_string())];
        kills.run_round(
            &format!("round {round}"),
            || settled(root, round),
            |kill| run_child_at(CHILD_TEST, &env, kill),
            |settled, when| {
                let counts = count_effects(&read_effects(&effect_log(root)));
                check_not_rerun(&counts, settled, when, |saga| journal_of(root, saga));
            },
        );
        check_round(root, round);
        round += 1;
    }
    println!("{} child runs over {round} rounds\n{kills}", kills.runs());
    kills.assert_hit("macros", &WINDOWS);
    assert!(enough(&kills), "{round} rounds, and only {kills}");
}
