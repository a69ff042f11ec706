//! Crash recovery: a child process runs sagas on a sled directory and is killed with SIGKILL at
//! pseudo-random points, hundreds of times, then restarted on the same directory.
//!
//! The test binary is its own child (as sled's `test_crash_recovery` does): the parent test
//! re-runs this executable filtered to [`crash_child_entry_point`], which does nothing unless
//! [`CHILD_ENV`] names a data directory. Every side effect (a step body or a compensation) is
//! appended to a file outside the database, so the parent can count what really ran and hold it
//! against what the journal says was recorded.
//!
//! The saga body offers kill points too: after each step returned, before the next began (or
//! the saga ended), and for every third step on a blocking thread the body awaits, something
//! the journal knows nothing of. A step whose result reached the body must not run again.
//!
//! So does the store: the child's sled store is wrapped in a `KillPointStore`, which stops at
//! every write before it reaches sled, once it is written but not yet durable, and once it is
//! durable but before the engine knows. Every named window must be hit in every run.
//!
//! Replay a failure with `HODEI_CRASH_SEED=<seed> cargo test -p hodei-core --test crash`.
#![cfg(all(unix, feature = "sled"))]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hodei_core::{
    CompensationContext, Engine, Event, EventStore, Outcome, RecordedEvent, RetryPolicy, SagaContext,
    SagaDefinition, SagaId, SagaRun, SagaStatus, SledStore, StepContext, StepError,
};
use serde::{Deserialize, Serialize};
use support::crash::{
    DONE, Key, Kills, Kind, READY, Window, append_line, attempts, check_attempts, check_not_rerun, count,
    format_journal, kill_point, ran_live, read_lines, returned, returned_while_awaiting, run_child_at,
    settle, settle_returned,
};
use support::kill_point_store::KillPointStore;
use support::seed::seed;

mod support;

/// Set in the child only: the directory holding its database and its effect log.
const CHILD_ENV: &str = "HODEI_CRASH_CHILD";
const ROUND_ENV: &str = "HODEI_CRASH_ROUND";
const SEED_ENV: &str = "HODEI_CRASH_SEED";
/// Set in the child when its run is aimed at a store window: only then does it wrap its store
/// in a `KillPointStore`, whose three lines a write would otherwise crowd out the others.
const STORE_POINTS_ENV: &str = "HODEI_CRASH_STORE_POINTS";
const CHILD_TEST: &str = "crash_child_entry_point";

const DEFINITION: &str = "crashy";
const SAGAS_PER_ROUND: u32 = 8;
const STEPS: u32 = 6;
const FAILING_STEP: u32 = 4;
const FAILURE: &str = "step 4 refuses this saga";
const MIN_KILLS: u32 = 150;
/// Of which at least this many in the saga body.
const MIN_BODY_KILLS: u32 = 60;
/// The windows the kills must all have hit.
const WINDOWS: [Window; 6] = [
    Window::Step,
    Window::BetweenSteps,
    Window::Unjournaled,
    Window::StoreBeforeWrite,
    Window::StoreWritten,
    Window::StoreDurable,
];
/// The windows every other run aims at in turn ([`Kills::new`]): those a random kill hits
/// least often.
const AIMS: [Window; 5] = [
    Window::BetweenSteps,
    Window::Unjournaled,
    Window::StoreBeforeWrite,
    Window::StoreWritten,
    Window::StoreDurable,
];
/// A kill lands after 0 to this many kill-point lines of one child run. A round has about 100,
/// so most rounds see several kills and still finish in a few runs.
const MAX_LINES_BEFORE_KILL: u64 = 24;
/// An aimed kill lands at one of its window's first this many lines in the run.
const AIM_SPREAD: u64 = 6;
/// A round that needs this many runs is not making progress: fail instead of looping.
const MAX_RUNS_PER_ROUND: u32 = 200;
/// Rounds go on until the kills are enough ([`MIN_KILLS`], [`MIN_BODY_KILLS`], [`WINDOWS`]), up
/// to this many (about 25 are enough).
const MAX_ROUNDS: u32 = 100;
/// Only a hang guard for the child (a parked saga never finishes): a round takes well under a
/// second.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

fn db_dir(root: &Path) -> PathBuf {
    root.join("db")
}

fn effect_log(root: &Path) -> PathBuf {
    root.join("effects.log")
}

fn saga_id(round: u32, index: u32) -> String {
    format!("r{round}-s{index}")
}

/// What a saga does, as its input: every third saga fails for good at step 4.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Plan {
    steps: u32,
    fail_at: Option<u32>,
}

fn plan(index: u32) -> Plan {
    Plan { steps: STEPS, fail_at: index.is_multiple_of(3).then_some(FAILING_STEP) }
}

fn step_output(step: u32) -> u64 {
    u64::from(step) * 10 + 7
}

fn policy() -> RetryPolicy {
    // An attempt cut off by a kill counts as used, so the budget must outlast every kill.
    RetryPolicy::attempts(1000).initial_backoff(Duration::from_millis(1)).jitter(0.0)
}

/// Appends one effect line with a single write (`O_APPEND`, so lines from concurrent sagas do
/// not interleave), then tells the parent on stdout. The order matters: a line the parent has
/// counted on stdout is always in the file already.
fn record_effect(log: &Path, effect: &str) -> std::io::Result<()> {
    append_line(log, effect)?;
    kill_point(Window::Step, effect);
    Ok(())
}

fn definition(root: &Path) -> SagaDefinition {
    let (root, log) = (Arc::new(root.to_owned()), Arc::new(effect_log(root)));
    SagaDefinition::new(DEFINITION, 1, move |ctx: SagaContext, plan: Plan| {
        let (root, log) = (root.clone(), log.clone());
        async move {
            let mut total = 0;
            for step in 0..plan.steps {
                let compensation_log = log.clone();
                total += ctx
                    .step(format!("step-{step}"))
                    .input(step)
                    .retry(policy())
                    .compensate(move |c: CompensationContext<u32, u64>| {
                        let log = compensation_log.clone();
                        async move {
                            let output = c.output.map_or_else(|| "none".to_string(), |o| o.to_string());
                            record_effect(
                                &log,
                                &format!("comp {} {} {} {output}", c.saga_id, c.step, c.attempt),
                            )?;
                            Ok(())
                        }
                    })
                    .run(|s: StepContext, _: u32| {
                        let log = log.clone();
                        async move {
                            record_effect(&log, &format!("step {} {} {}", s.saga_id, s.step, s.attempt))?;
                            ran_live(&s);
                            if plan.fail_at == Some(s.step) {
                                return Err(StepError::terminal(FAILURE));
                            }
                            Ok::<u64, StepError>(step_output(s.step))
                        }
                    })
                    .await?;
                // The step's result is the body's: a kill from here on must not run it again.
                let name = format!("step-{step}");
                if step % 3 == 2 {
                    returned_while_awaiting(&root, ctx.id(), &name).await;
                } else {
                    returned(&root, Window::BetweenSteps, ctx.id(), &name);
                }
            }
            Ok(total)
        }
    })
}

/// The child process. In a normal test run [`CHILD_ENV`] is unset and this returns at once;
/// `sagas_survive_repeated_sigkill` runs it in a child process, once per spawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_entry_point() {
    let Some(root) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else { return };
    let round: u32 = std::env::var(ROUND_ENV).expect("round").parse().expect("round number");
    let store = SledStore::open(db_dir(&root)).expect("open the store");
    let builder = match std::env::var_os(STORE_POINTS_ENV) {
        Some(_) => Engine::builder().store(KillPointStore::new(store)),
        None => Engine::builder().store(store),
    };
    let engine = builder.register(definition(&root)).start().await.expect("engine start");
    println!("{READY}");
    // Restarting the whole batch is safe: a known id with the same input returns its run.
    let mut handles = Vec::new();
    for index in 0..SAGAS_PER_ROUND {
        let run = SagaRun::new(DEFINITION, saga_id(round, index), &plan(index)).expect("saga run");
        handles.push((index, engine.start(run).await.expect("saga start")));
    }
    let outcomes = tokio::time::timeout(CHILD_DEADLINE, async {
        let mut outcomes = Vec::new();
        for (index, handle) in &handles {
            outcomes.push((*index, handle.outcome::<u64>().await.expect("outcome")));
        }
        outcomes
    })
    .await;
    let Ok(outcomes) = outcomes else {
        let stuck: Vec<_> =
            handles.iter().map(|(_, h)| (h.id().clone(), h.status().map(|r| r.status))).collect();
        panic!("round {round} did not finish within {CHILD_DEADLINE:?}: {stuck:?}");
    };
    let completed_total: u64 = (0..STEPS).map(step_output).sum();
    for (index, outcome) in outcomes {
        match (plan(index).fail_at, outcome) {
            (None, Outcome::Completed(total)) => assert_eq!(total, completed_total, "saga {index}"),
            (Some(_), Outcome::Compensated { cause }) => assert_eq!(cause, FAILURE, "saga {index}"),
            (_, other) => panic!("saga {} of round {round} ended as {other:?}", saga_id(round, index)),
        }
    }
    let report = engine.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert!(report.in_flight.is_empty(), "left in flight: {report:?}");
    println!("{DONE} {round}");
}

/// One line of the effect log.
#[derive(Clone, Debug)]
struct Effect {
    kind: Kind,
    saga: String,
    step: u32,
    attempt: u32,
    /// For a compensation: the step output it was given.
    output: Option<u64>,
}

impl Effect {
    fn key(&self) -> Key {
        (self.kind, self.saga.clone(), self.step)
    }
}

fn read_effects(root: &Path) -> Vec<Effect> {
    read_lines(&effect_log(root))
        .iter()
        .map(|line| parse_effect(line).unwrap_or_else(|| panic!("malformed effect line {line:?}")))
        .collect()
}

fn parse_effect(line: &str) -> Option<Effect> {
    let fields: Vec<&str> = line.split(' ').collect();
    let (kind, saga, step, attempt, output) = match fields[..] {
        ["step", saga, step, attempt] => (Kind::Step, saga, step, attempt, None),
        ["comp", saga, step, attempt, "none"] => (Kind::Comp, saga, step, attempt, None),
        ["comp", saga, step, attempt, output] => {
            (Kind::Comp, saga, step, attempt, Some(output.parse().ok()?))
        }
        _ => return None,
    };
    Some(Effect {
        kind,
        saga: saga.to_string(),
        step: step.parse().ok()?,
        attempt: attempt.parse().ok()?,
        output,
    })
}

fn count_effects(effects: &[Effect]) -> HashMap<Key, usize> {
    count(effects.iter().map(Effect::key))
}

fn journal_of(root: &Path, saga: &str) -> String {
    let store = SledStore::open(db_dir(root)).expect("open the store");
    format_journal(&store.history(&SagaId::new(saga).expect("id")).expect("history"))
}

/// The steps and compensations of one round whose end the journal records, and the steps whose
/// result reached a saga body, with how often each has run so far. None of them may run again.
fn settled(root: &Path, round: u32) -> HashMap<Key, usize> {
    let effects = read_effects(root);
    let counts = count_effects(&effects);
    let store = SledStore::open(db_dir(root)).expect("open the store between runs");
    let mut settled = HashMap::new();
    for index in 0..SAGAS_PER_ROUND {
        let saga = saga_id(round, index);
        let history = store.history(&SagaId::new(saga.clone()).expect("id")).expect("history");
        settle(&saga, &history, &counts, |_| false, &mut settled);
    }
    settle_returned(root, &attempts(effects.iter().map(|e| (e.key(), e.attempt))), &mut settled);
    settled
}

fn check_settled_did_not_rerun(root: &Path, settled: &HashMap<Key, usize>, when: &str) {
    check_not_rerun(&count_effects(&read_effects(root)), settled, when, |saga| journal_of(root, saga));
}

/// See [`check_attempts`]; here every saga has finished, so each checked thing must have run.
fn check_finished_attempts(what: &str, ran: &[u32], journaled: &[u32], history: &str) {
    assert!(!ran.is_empty(), "{what} never ran; journal:\n{history}");
    check_attempts(what, ran, journaled, true, history);
}

/// Checks one finished saga against its plan, its journal and the effect lines it left.
fn check_saga(saga: &str, plan: Plan, status: &SagaStatus, history: &[RecordedEvent], effects: &[&Effect]) {
    let journal = format_journal(history);
    let expected = if plan.fail_at.is_some() { SagaStatus::Compensated } else { SagaStatus::Completed };
    assert_eq!(*status, expected, "{saga}; journal:\n{journal}");
    let last = history.last().map(|r| &r.event);
    match plan.fail_at {
        None => assert!(matches!(last, Some(Event::SagaCompleted { .. })), "{saga}; journal:\n{journal}"),
        Some(_) => {
            assert!(matches!(last, Some(Event::SagaCompensated { .. })), "{saga}; journal:\n{journal}")
        }
    }

    let mut step_attempts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut comp_attempts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut completed: HashMap<u32, u64> = HashMap::new();
    let mut compensated = Vec::new();
    for recorded in history {
        match &recorded.event {
            Event::StepStarted { step, .. } => step_attempts.entry(*step).or_default().push(1),
            Event::StepRetried { step, attempt } => step_attempts.entry(*step).or_default().push(*attempt),
            Event::StepCompleted { step, .. } => {
                completed.insert(*step, step_output(*step));
            }
            Event::CompensationStarted { step, attempt } => {
                comp_attempts.entry(*step).or_default().push(*attempt)
            }
            Event::CompensationCompleted { step } => compensated.push(*step),
            _ => {}
        }
    }
    let ran_steps = plan.fail_at.map_or(plan.steps, |f| f + 1);
    assert_eq!(
        step_attempts.keys().copied().collect::<Vec<_>>(),
        (0..ran_steps).collect::<Vec<_>>(),
        "{saga}"
    );

    let ran = |kind: Kind, step: u32| -> Vec<u32> {
        effects.iter().filter(|e| e.kind == kind && e.step == step).map(|e| e.attempt).collect()
    };
    for (step, journaled) in &step_attempts {
        check_finished_attempts(&format!("{saga} step {step}"), &ran(Kind::Step, *step), journaled, &journal);
    }
    let comps: Vec<&&Effect> = effects.iter().filter(|e| e.kind == Kind::Comp).collect();
    if plan.fail_at.is_none() {
        assert!(comps.is_empty(), "{saga} completed but compensated {comps:?}");
        return;
    }
    // Every step that started is undone, the one that failed (with no output) included.
    let started: Vec<u32> = step_attempts.keys().rev().copied().collect();
    assert_eq!(compensated, started, "{saga}: compensations recorded out of order; journal:\n{journal}");
    for (step, journaled) in &comp_attempts {
        check_finished_attempts(
            &format!("{saga} compensation {step}"),
            &ran(Kind::Comp, *step),
            journaled,
            &journal,
        );
    }
    assert_eq!(
        comp_attempts.keys().copied().collect::<Vec<_>>(),
        (0..ran_steps).collect::<Vec<_>>(),
        "{saga}"
    );
    for pair in comps.windows(2) {
        assert!(pair[0].step >= pair[1].step, "{saga}: compensation order {comps:?}");
    }
    for comp in &comps {
        assert_eq!(comp.output, completed.get(&comp.step).copied(), "{saga}: output given to {comp:?}");
    }
    let first_comp = effects.iter().position(|e| e.kind == Kind::Comp).expect("a compensation ran");
    assert!(
        effects[first_comp..].iter().all(|e| e.kind == Kind::Comp),
        "{saga}: a step ran after compensation began: {effects:?}"
    );
}

/// Checks a finished round; returns how many effect lines each of its sagas left.
fn check_round(root: &Path, round: u32) -> HashMap<String, usize> {
    let effects = read_effects(root);
    let store = SledStore::open(db_dir(root)).expect("open the store after the round");
    let mut lines = HashMap::new();
    for index in 0..SAGAS_PER_ROUND {
        let saga = saga_id(round, index);
        let id = SagaId::new(saga.clone()).expect("id");
        let record = store.record(&id).expect("record").unwrap_or_else(|| panic!("{saga} has no record"));
        let history = store.history(&id).expect("history");
        let mine: Vec<&Effect> = effects.iter().filter(|e| e.saga == saga).collect();
        check_saga(&saga, plan(index), &record.status, &history, &mine);
        lines.insert(saga, mine.len());
    }
    lines
}

#[test]
fn sagas_survive_repeated_sigkill() {
    let seed = seed(SEED_ENV);
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let began = Instant::now();
    let kills = Kills::new(seed, MAX_LINES_BEFORE_KILL, &AIMS, MAX_RUNS_PER_ROUND).aim_spread(AIM_SPREAD);
    let (mut kills, mut round) = (kills, 0);
    let mut finished_rounds: HashMap<String, usize> = HashMap::new();
    let enough = |kills: &Kills| {
        kills.total() >= MIN_KILLS && kills.in_body() >= MIN_BODY_KILLS && kills.hit_all(&WINDOWS)
    };
    while !enough(&kills) && round < MAX_ROUNDS {
        let env = [(CHILD_ENV, root.display().to_string()), (ROUND_ENV, round.to_string())];
        kills.run_round(
            &format!("round {round}"),
            || settled(root, round),
            |kill| {
                let store_points = kill.aimed_at().is_some_and(Window::in_store);
                let env = [&env[..], &[(STORE_POINTS_ENV, String::new())][..store_points as usize]].concat();
                run_child_at(CHILD_TEST, &env, kill)
            },
            |settled, when| check_settled_did_not_rerun(root, settled, when),
        );
        finished_rounds.extend(check_round(root, round));
        round += 1;
    }
    // Later children must not have run anything of an earlier round, finished as it was.
    let effects = read_effects(root);
    for (saga, lines) in &finished_rounds {
        assert_eq!(effects.iter().filter(|e| e.saga == *saga).count(), *lines, "{saga} ran after its round");
    }
    // Lines beyond one per step or compensation are attempts a kill cut off before their end
    // was recorded: without them the kills would never have landed where it matters.
    let reruns = effects.len() - count_effects(&effects).len();
    println!(
        "{} kills, {} child runs, {round} rounds, {} sagas, {} effects ({reruns} re-runs) in {:.1?}\n{kills}",
        kills.total(),
        kills.runs(),
        finished_rounds.len(),
        effects.len(),
        began.elapsed()
    );
    kills.assert_hit("crash", &WINDOWS);
    assert!(enough(&kills), "{round} rounds, and only {kills}");
    assert!(reruns > 0, "no kill landed between a side effect and its record");
}
