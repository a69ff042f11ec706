//! Each durable primitive of issue 7 (timer, signal, fan-out and matrix, child saga,
//! cancellation, fork) through SIGKILLs of its process at random points, with the crash harness
//! of `tests/crash.rs`: the outcome is the same as without the crash.
//!
//! Every scenario runs once without kills (the reference), then round after round on another
//! directory through kills after a random number of effect lines, until each round finishes.
//! Step bodies and compensations append their effect to a file outside the database; between
//! runs the parent holds the file against the journal: nothing whose end was recorded ran again,
//! every attempt that ran was journaled first and ran once, and the finished round has the
//! reference's outcome and journal shape. Each scenario then checks what its primitive promises,
//! and that some kill landed in the window that matters for it.
//!
//! The saga bodies offer kill points too, where the body has just been given something the
//! journal must keep: a step's result (between steps, at the end of a branch, in something
//! unjournaled the body awaits), a group's result, a fired timer, a taken signal. A step whose
//! result reached the body must never run again, whatever its journal says (`settle_returned`);
//! each scenario runs rounds until a kill landed in each of its body windows.
//!
//! The end of the file holds deterministic reproductions of the hodei-core bugs these tests
//! found: a restart there is a kill at the one point the reproduction is about.
//!
//! Replay a failure with `HODEI_PRIMITIVES_CRASH_SEED=<seed> cargo test -p hodei-core --test
//! primitives_crash`.
#![cfg(all(unix, feature = "sled"))]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use hodei_core::{
    Branch, CompensationContext, Engine, EngineEventKind, Error, Event, EventStore, RecordedEvent,
    RetryPolicy, SagaContext, SagaDefinition, SagaId, SagaRun, SagaStatus, SledStore, StepContext, StepError,
    Timestamp,
};
use serde::{Deserialize, Serialize};
use support::crash::{
    DONE, Effect, Key, KillAt, Kills, Kind, READY, Window, append_line, check_attempts, check_not_rerun,
    count_effects, effect_attempts, format_journal, kill_point, ran_live, read_effects, read_lines, returned,
    returned_while_awaiting, run_child_at, settle, settle_returned,
};
use support::seed::seed;
use tokio::sync::{broadcast, watch};

/// Set in the child only: the directory holding its database and its side files.
const CHILD_ENV: &str = "HODEI_PRIMITIVES_CRASH_CHILD";
const SCENARIO_ENV: &str = "HODEI_PRIMITIVES_CRASH_SCENARIO";
const ROUND_ENV: &str = "HODEI_PRIMITIVES_CRASH_ROUND";
const SEED_ENV: &str = "HODEI_PRIMITIVES_CRASH_SEED";
const CHILD_TEST: &str = "primitives_crash_child";

/// Only a hang guard: a round takes well under a second (the cancelled saga's timer is far
/// longer than this, so a cancel that is not honoured fails the child).
const CHILD_DEADLINE: Duration = Duration::from_secs(20);
/// A round that needs this many runs is not making progress.
const MAX_RUNS_PER_ROUND: u32 = 60;
/// A scenario runs more rounds than it asks for until a kill landed in each of its windows, and
/// this many in its saga bodies, up to [`MAX_ROUNDS_FACTOR`] times as many.
const MIN_BODY_KILLS: u32 = 12;
const MAX_ROUNDS_FACTOR: u32 = 10;

const TIMER: Duration = Duration::from_secs(1);
const CANCEL_TIMER: Duration = Duration::from_secs(60);
const CANCEL_REASON: &str = "an operator aborts";
const FANOUT_BRANCHES: u32 = 4;
const MATRIX_PARAMS: u32 = 5;
const MATRIX_LIMIT: usize = 2;

fn root() -> PathBuf {
    PathBuf::from(std::env::var_os(CHILD_ENV).expect("only the child records effects"))
}

fn db_dir(root: &Path) -> PathBuf {
    root.join("db")
}

fn effect_log(root: &Path) -> PathBuf {
    root.join("effects.log")
}

fn outcome_file(root: &Path, saga: &str) -> PathBuf {
    root.join(format!("outcome-{saga}"))
}

/// When each child run's engine was ready, one `Timestamp` a line.
fn starts_log(root: &Path) -> PathBuf {
    root.join("starts.log")
}

/// The sagas the child has sent their signal to (after `Engine::signal` returned).
fn sent_log(root: &Path) -> PathBuf {
    root.join("signals-sent.log")
}

fn fork_switch(root: &Path, round: u32) -> PathBuf {
    root.join(format!("fixed-{round}"))
}

/// A role `parent/child` names the child saga `parent` starts.
fn saga_id(role: &str, round: u32) -> String {
    match role.split_once('/') {
        Some((parent, child)) => format!("{}-{child}", saga_id(parent, round)),
        None => format!("{role}-r{round}"),
    }
}

fn id(saga: &str) -> SagaId {
    SagaId::new(saga).expect("saga id")
}

/// Appends a side effect, then reports it to the parent, which may kill the process here. The
/// order matters: a line the parent has counted on stdout is in the file already.
fn record_effect(line: &str) -> Result<(), StepError> {
    append_line(&effect_log(&root()), line)?;
    kill_point(Window::Step, line);
    Ok(())
}

/// A kill point in the child's own code, with no side effect of its own.
fn mark(what: &str) {
    kill_point(Window::Outside, &format!("mark {what}"));
}

/// The child's engine, for the saga bodies' [`body_point`]. The engine resumes sagas as it
/// starts, before the child can set it here.
static ENGINE: LazyLock<watch::Sender<Option<Engine>>> = LazyLock::new(|| watch::Sender::new(None));

/// A kill point in the saga body right after the step `name` returned (see [`returned`]).
fn after(ctx: &SagaContext, window: Window, name: &str) {
    returned(&root(), window, ctx.id(), name);
}

/// A kill point in the saga body after something other than a step (a timer fired, a signal
/// was taken, a group returned), before the step `next` (none: before the saga's end). Offered
/// unless the journal shows that `next` has started: the body is replaying past the point.
async fn body_point(ctx: &SagaContext, window: Window, next: Option<&str>) {
    let mut set = ENGINE.subscribe();
    let engine = set.wait_for(Option::is_some).await.expect("the child's engine").clone().expect("set");
    let past =
        next.is_some_and(|next| has(&engine, ctx.id(), |e| e.step_start().is_some_and(|(_, n)| n == next)));
    if !past {
        kill_point(window, &format!("{} before {}", ctx.id(), next.unwrap_or("its end")));
    }
}

fn policy() -> RetryPolicy {
    // An attempt cut off by a kill counts as used, so the budget must outlast every kill.
    RetryPolicy::attempts(1000).initial_backoff(Duration::from_millis(1)).jitter(0.0)
}

/// Whether a tracked step succeeds.
#[derive(Clone, Copy, Debug)]
enum Fails {
    Never,
    Always,
    /// Until the fork switch of this round is on.
    UnlessFixed(u32),
}

fn failure(name: &str) -> String {
    format!("{name} refuses for good")
}

/// A compensable step whose body and compensation each leave an effect line
/// `step|comp <saga> <step number> <name> <attempt>`. Its output is its input's length.
async fn tracked(ctx: &SagaContext, name: &str, input: String, fails: Fails) -> Result<u64, StepError> {
    let label = name.to_owned();
    ctx.step(name)
        .input(input)
        .retry(policy())
        .compensate(move |c: CompensationContext<String, u64>| async move {
            record_effect(&format!("comp {} {} {} {}", c.saga_id, c.step, c.name, c.attempt))
        })
        .run(move |s: StepContext, input: String| {
            let label = label.clone();
            async move {
                record_effect(&format!("step {} {} {label} {}", s.saga_id, s.step, s.attempt))?;
                ran_live(&s);
                let refuses = match fails {
                    Fails::Never => false,
                    Fails::Always => true,
                    Fails::UnlessFixed(round) => !fork_switch(&root(), round).exists(),
                };
                if refuses {
                    return Err(StepError::terminal(failure(&label)));
                }
                Ok(input.len() as u64)
            }
        })
        .await
}

async fn plain(ctx: &SagaContext, name: &str) -> Result<u64, StepError> {
    tracked(ctx, name, name.to_owned(), Fails::Never).await
}

/// The payload of the `approve` signal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Approval {
    by: String,
    ticket: u32,
}

fn approval() -> Approval {
    Approval { by: "alice".into(), ticket: 42 }
}

/// When the child sends the signal: before the saga waits, or while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum SignalAt {
    BeforeWait,
    DuringWait,
}

fn signal_at(round: u32) -> SignalAt {
    if round.is_multiple_of(2) { SignalAt::BeforeWait } else { SignalAt::DuringWait }
}

/// Set by the child once the signal is journaled (or found journaled), in this process.
static SIGNAL_SENT: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::Sender::new(false));

/// Per fan-out saga, in this process: how many of its branches have completed.
static BRANCHES_DONE: LazyLock<Mutex<HashMap<String, Arc<watch::Sender<u32>>>>> =
    LazyLock::new(Mutex::default);

fn branches_done(saga: &SagaId) -> Arc<watch::Sender<u32>> {
    let mut done = BRANCHES_DONE.lock().expect("branch counters");
    done.entry(saga.to_string()).or_insert_with(|| Arc::new(watch::Sender::new(0))).clone()
}

fn definitions() -> Vec<SagaDefinition> {
    vec![
        // Does nothing: starting it makes everything journaled before durable (see `flushed`).
        SagaDefinition::new("durable-mark", 1, |_: SagaContext, (): ()| async { Ok(()) }),
        SagaDefinition::new("timer", 1, |ctx: SagaContext, (): ()| async move {
            let before = plain(&ctx, "before").await?;
            after(&ctx, Window::BetweenSteps, "before");
            ctx.sleep(TIMER).await;
            body_point(&ctx, Window::AfterTimer, Some("after")).await;
            let then = plain(&ctx, "after").await?;
            after(&ctx, Window::BetweenSteps, "after");
            Ok(before + then)
        }),
        SagaDefinition::new("approval", 1, |ctx: SagaContext, at: SignalAt| async move {
            let requested = ctx
                .step("request")
                .input(at)
                .retry(policy())
                .run(|s: StepContext, at: SignalAt| async move {
                    record_effect(&format!("step {} {} request {}", s.saga_id, s.step, s.attempt))?;
                    ran_live(&s);
                    if at == SignalAt::BeforeWait {
                        // The wait begins only once the signal is journaled: it waits in the inbox.
                        let mut sent = SIGNAL_SENT.subscribe();
                        sent.wait_for(|sent| *sent).await.map_err(|e| StepError::terminal(e.to_string()))?;
                    }
                    Ok::<u64, StepError>(1)
                })
                .await?;
            after(&ctx, Window::BetweenSteps, "request");
            let approval: Approval = ctx.wait_signal("approve").await?;
            body_point(&ctx, Window::AfterSignal, Some("apply")).await;
            let applied =
                tracked(&ctx, "apply", format!("{}#{}", approval.by, approval.ticket), Fails::Never).await?;
            after(&ctx, Window::BetweenSteps, "apply");
            Ok(format!("{approval:?} applied {applied} after {requested}"))
        }),
        SagaDefinition::new("fanout", 1, |ctx: SagaContext, fail: bool| async move {
            let done = branches_done(ctx.id());
            let branches = (0..FANOUT_BRANCHES)
                .map(|b| {
                    let done = done.clone();
                    Branch::new(move |ctx: SagaContext| async move {
                        if fail && b == FANOUT_BRANCHES - 1 {
                            // Fails only after every other branch has completed, so that each
                            // of their steps is on the compensation stack, and its own second
                            // step never starts.
                            let mut others = done.subscribe();
                            others
                                .wait_for(|n| *n == FANOUT_BRANCHES - 1)
                                .await
                                .map_err(|e| StepError::terminal(e.to_string()))?;
                            return tracked(&ctx, &format!("b{b}-s0"), String::new(), Fails::Always).await;
                        }
                        let first = plain(&ctx, &format!("b{b}-s0")).await?;
                        after(&ctx, Window::BetweenSteps, &format!("b{b}-s0"));
                        let second = plain(&ctx, &format!("b{b}-s1")).await?;
                        after(&ctx, Window::AfterBranch, &format!("b{b}-s1"));
                        done.send_modify(|n| *n += 1);
                        // Distinct per branch, so that the order of the outputs shows.
                        Ok(u64::from(b) * 100 + first * 10 + second)
                    })
                })
                .collect();
            let outputs = ctx.all("deploy", branches).await?;
            body_point(&ctx, Window::AfterGroup, None).await;
            Ok(outputs)
        }),
        SagaDefinition::new("matrix", 1, |ctx: SagaContext, (): ()| async move {
            let params: Vec<u32> = (0..MATRIX_PARAMS).collect();
            let outputs = ctx
                .matrix("tests", params, MATRIX_LIMIT, |ctx, p| async move {
                    let output = plain(&ctx, &format!("m{p}")).await?;
                    after(&ctx, Window::AfterBranch, &format!("m{p}"));
                    Ok(p * 100 + output as u32)
                })
                .await?;
            body_point(&ctx, Window::AfterGroup, None).await;
            Ok(outputs)
        }),
        SagaDefinition::new("kid", 1, |ctx: SagaContext, (): ()| async move {
            let first = plain(&ctx, "k0").await?;
            after(&ctx, Window::BetweenSteps, "k0");
            let second = plain(&ctx, "k1").await?;
            after(&ctx, Window::BetweenSteps, "k1");
            Ok(first + second)
        }),
        SagaDefinition::new("parent", 1, |ctx: SagaContext, (): ()| async move {
            let first = plain(&ctx, "p0").await?;
            after(&ctx, Window::BetweenSteps, "p0");
            let run = SagaRun::new("kid", format!("{}-kid", ctx.id()), &())
                .map_err(|e| StepError::terminal(e.to_string()))?;
            let kid: u64 = ctx.child(run).await?;
            Ok(first + kid + tracked(&ctx, "p-fail", String::new(), Fails::Always).await?)
        }),
        SagaDefinition::new("cancellable", 1, |ctx: SagaContext, (): ()| async move {
            let mut done = plain(&ctx, "c0").await?;
            after(&ctx, Window::BetweenSteps, "c0");
            done += plain(&ctx, "c1").await?;
            returned_while_awaiting(&root(), ctx.id(), "c1").await;
            ctx.sleep(CANCEL_TIMER).await;
            Ok(done + plain(&ctx, "c2").await?)
        }),
        SagaDefinition::new("forkable", 1, |ctx: SagaContext, round: u32| async move {
            let mut total = plain(&ctx, "s0").await?;
            after(&ctx, Window::BetweenSteps, "s0");
            total += plain(&ctx, "s1").await?;
            returned_while_awaiting(&root(), ctx.id(), "s1").await;
            total += tracked(&ctx, "s2", "s2".into(), Fails::UnlessFixed(round)).await?;
            after(&ctx, Window::BetweenSteps, "s2");
            total += plain(&ctx, "s3").await?;
            after(&ctx, Window::BetweenSteps, "s3");
            Ok(total)
        }),
    ]
}

/// The roles (saga ids without their round) each scenario runs, parents first.
fn roles(scenario: &str) -> &'static [&'static str] {
    match scenario {
        "timer" => &["timer"],
        "signal" => &["signal"],
        "fanout" => &["fan-ok", "fan-fail", "matrix"],
        "child" => &["parent", "parent/kid"],
        "cancel" => &["cancel"],
        "fork" => &["source", "fork"],
        other => panic!("unknown scenario {other}"),
    }
}

fn has(engine: &Engine, saga: &SagaId, what: impl Fn(&Event) -> bool) -> bool {
    engine.history(saga).is_ok_and(|h| h.iter().any(|r| what(&r.event)))
}

/// Waits, without polling, until the saga's journal holds an event `what` accepts, or the saga
/// has finished without one (the parent then finds out what went wrong from its journal).
async fn journaled(engine: &Engine, saga: &SagaId, what: impl Fn(&Event) -> bool) {
    // Subscribed before looking, so that an event written in between is seen.
    let mut bus = engine.subscribe();
    let reached = || has(engine, saga, &what) || finished(engine, saga);
    if reached() {
        return;
    }
    loop {
        match bus.recv().await {
            Ok(e) if e.saga_id == *saga => match &e.kind {
                EngineEventKind::Journaled(r) if what(&r.event) || r.event.is_final() => return,
                EngineEventKind::Status(status) if status.is_final() => return,
                _ => {}
            },
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if reached() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => panic!("the engine stopped while {saga} ran"),
        }
    }
}

/// Waits until everything journaled so far is on disk. The bus announces an event once it is
/// written, before its flush: a kill right then could lose it. Starting a saga returns once its
/// start is on disk, and each flush covers every write made before it.
///
/// The mark is also awaited to its end: a mark still running when the round's last step
/// finishes would be left in flight by the child's shutdown, which stops a saga whose body has
/// not run yet (`left in flight: ["durable-mark-…"]`).
async fn flushed(engine: &Engine) {
    let mark = start(engine, "durable-mark", &format!("durable-mark-{}", std::process::id()), &()).await;
    mark.outcome::<()>().await.expect("a durable mark completes");
}

fn finished(engine: &Engine, saga: &SagaId) -> bool {
    engine.status(saga).is_ok_and(|r| r.status.is_final())
}

/// Starts a saga, or finds the run a previous process started.
async fn start(
    engine: &Engine,
    definition: &str,
    saga: &str,
    input: &impl Serialize,
) -> hodei_core::SagaHandle {
    let run = SagaRun::new(definition, saga, input).expect("saga run");
    engine.start(run).await.unwrap_or_else(|e| panic!("start {saga}: {e}"))
}

async fn outcome<O: serde::de::DeserializeOwned + std::fmt::Debug>(
    engine: &Engine,
    saga: &str,
) -> (String, String) {
    let handle = engine.handle(&id(saga)).unwrap_or_else(|e| panic!("{saga}: {e}"));
    let outcome = handle.outcome::<O>().await.unwrap_or_else(|e| panic!("outcome of {saga}: {e}"));
    (saga.to_owned(), format!("{outcome:?}"))
}

/// One run of a scenario's round in the child: starts (or resumes) its sagas, does what the
/// scenario does from outside, and returns each saga's outcome.
async fn run_scenario(engine: &Engine, scenario: &str, round: u32) -> Vec<(String, String)> {
    let root = root();
    match scenario {
        restart if restart.starts_with("restart-") => {
            let run: u32 = std::env::var(RUN_ENV).expect("run").parse().expect("run number");
            let last = std::env::var(LAST_RUN_ENV).is_ok_and(|last| last == "true");
            let outcome = run_reproduction(engine, restart, run, last).await;
            outcome.map(|outcome| (restart.to_owned(), outcome)).into_iter().collect()
        }
        "timer" => {
            let saga = saga_id("timer", round);
            start(engine, "timer", &saga, &()).await;
            // A kill point while the timer runs (the steps give those before and after it).
            journaled(engine, &id(&saga), |e| matches!(e, Event::TimerStarted { .. })).await;
            flushed(engine).await;
            if !has(engine, &id(&saga), |e| matches!(e, Event::TimerFired { .. })) {
                mark(&format!("{saga} timer-started"));
            }
            vec![outcome::<u64>(engine, &saga).await]
        }
        "signal" => {
            let saga = saga_id("signal", round);
            let sid = id(&saga);
            let at = signal_at(round);
            start(engine, "approval", &saga, &at).await;
            let received = has(engine, &sid, |e| matches!(e, Event::SignalReceived { .. }));
            let sent = read_lines(&sent_log(&root)).contains(&saga);
            assert!(received || !sent, "{saga}: a signal journaled before the crash is lost");
            if !received && !finished(engine, &sid) {
                if at == SignalAt::DuringWait {
                    journaled(engine, &sid, |e| matches!(e, Event::SignalWaitStarted { .. })).await;
                }
                mark(&format!("{saga} before-signal"));
                engine.signal(&sid, "approve", &approval()).await.expect("signal");
                append_line(&sent_log(&root), &saga).expect("note the signal");
                // Before the saga may go on: a kill here leaves the signal in its inbox.
                mark(&format!("{saga} after-signal"));
            }
            SIGNAL_SENT.send_replace(true);
            vec![outcome::<String>(engine, &saga).await]
        }
        "fanout" => {
            let (ok, fail, matrix) =
                (saga_id("fan-ok", round), saga_id("fan-fail", round), saga_id("matrix", round));
            start(engine, "fanout", &ok, &false).await;
            start(engine, "fanout", &fail, &true).await;
            start(engine, "matrix", &matrix, &()).await;
            vec![
                outcome::<Vec<u64>>(engine, &ok).await,
                outcome::<Vec<u64>>(engine, &fail).await,
                outcome::<Vec<u32>>(engine, &matrix).await,
            ]
        }
        "child" => {
            let parent = saga_id("parent", round);
            start(engine, "parent", &parent, &()).await;
            let parent = outcome::<u64>(engine, &parent).await;
            let kid = saga_id("parent/kid", round);
            match engine.status(&id(&kid)) {
                // The parent's journal tells the parent test why.
                Err(Error::SagaNotFound(_)) => vec![parent, (kid, "never started".into())],
                _ => vec![parent, outcome::<u64>(engine, &kid).await],
            }
        }
        "cancel" => {
            let saga = saga_id("cancel", round);
            let sid = id(&saga);
            start(engine, "cancellable", &saga, &()).await;
            if !has(engine, &sid, |e| matches!(e, Event::CancelRequested { .. })) && !finished(engine, &sid) {
                journaled(engine, &sid, |e| matches!(e, Event::TimerStarted { .. })).await;
                mark(&format!("{saga} before-cancel"));
                engine.cancel(&sid, CANCEL_REASON).await.expect("cancel");
                // The cancel is journaled: a kill here must not lose it.
                mark(&format!("{saga} after-cancel"));
            }
            vec![outcome::<u64>(engine, &saga).await]
        }
        "fork" => {
            let (source, fork) = (saga_id("source", round), saga_id("fork", round));
            start(engine, "forkable", &source, &round).await;
            let source_outcome = outcome::<u64>(engine, &source).await;
            // The fix the fork was made for: step 2 succeeds from now on.
            append_line(&fork_switch(&root, round), "fixed").expect("the switch");
            match engine.status(&id(&fork)) {
                Ok(_) => {}
                Err(Error::SagaNotFound(_)) => {
                    mark(&format!("{source} forking"));
                    engine.fork(&id(&source), 2, fork.clone()).await.expect("fork");
                }
                Err(e) => panic!("status of {fork}: {e}"),
            }
            vec![source_outcome, outcome::<u64>(engine, &fork).await]
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// The child process. In a normal test run [`CHILD_ENV`] is unset and this returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primitives_crash_child() {
    let Some(root) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else { return };
    let scenario = std::env::var(SCENARIO_ENV).expect("scenario");
    let round: u32 = std::env::var(ROUND_ENV).expect("round").parse().expect("round number");
    let mut builder = Engine::builder().data_dir(db_dir(&root));
    for definition in definitions().into_iter().chain(held_definitions()) {
        builder = builder.register(definition);
    }
    let engine = builder.start().await.expect("engine start");
    ENGINE.send_replace(Some(engine.clone()));
    append_line(&starts_log(&root), &Timestamp::now().0.to_string()).expect("note the start");
    println!("{READY}");
    let outcomes = tokio::time::timeout(CHILD_DEADLINE, run_scenario(&engine, &scenario, round))
        .await
        .unwrap_or_else(|_| {
            let sagas = engine.list(&hodei_core::SagaFilter::default()).expect("list the sagas");
            let stuck = sagas.iter().fold(String::new(), |mut out, r| {
                let history = engine.history(&r.id).unwrap_or_default();
                let _ = writeln!(out, "{} {:?}:\n{}", r.id, r.status, format_journal(&history));
                out
            });
            let run = std::env::var(RUN_ENV).unwrap_or_default();
            panic!("{scenario} round {round} (run {run}) did not finish within {CHILD_DEADLINE:?}:\n{stuck}")
        });
    for (saga, outcome) in outcomes {
        std::fs::write(outcome_file(&root, &saga), outcome).expect("write the outcome");
    }
    let report = engine.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    assert!(report.in_flight.is_empty(), "left in flight: {report:?}");
    println!("{DONE}");
}

// ---- The parent side ----

fn step_names(history: &[RecordedEvent]) -> HashMap<u32, String> {
    history.iter().filter_map(|r| r.event.step_start().map(|(n, name)| (n, name.to_owned()))).collect()
}

/// Whether a step leaves effect lines: the engine's own steps (a child saga's) do not.
fn leaves_effects(name: &str) -> bool {
    !name.starts_with("child ")
}

/// The step numbers whose body and compensation leave no effect line, or that a fork copied
/// from its source: the effect checks skip them.
fn silent_steps(history: &[RecordedEvent]) -> HashSet<u32> {
    let forked_at = forked_at(history);
    step_names(history)
        .into_iter()
        .filter(|(step, name)| *step < forked_at || !leaves_effects(name))
        .map(|(step, _)| step)
        .collect()
}

/// Held by the parent while a child runs and while it reads a store. The tests of this file run
/// in parallel in one process: a child spawned by one test is forked with a copy of every file
/// the process has open, another test's store lock included, and holds that lock until it
/// execs, which on a busy machine can outlast the store's drop and fail the next opener with
/// `Locked` (seen). With this, the process never forks while it has a store open.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding it changes nothing for the others.
    ALONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// [`run_child_at`] of [`CHILD_TEST`], with no store open in this process.
fn run_alone(env: &[(&str, String)], kill: KillAt) -> Option<Window> {
    let _alone = alone();
    run_child_at(CHILD_TEST, env, kill)
}

/// A store opened by the parent, with no child running (see [`ALONE`]).
struct ParentStore {
    // Declared first, dropped first: the store closes before the next child may start.
    store: SledStore,
    _alone: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for ParentStore {
    type Target = SledStore;
    fn deref(&self) -> &SledStore {
        &self.store
    }
}

/// The store of a child's directory, opened by the parent while no child runs.
fn open_store(root: &Path, when: &str) -> ParentStore {
    let alone = alone();
    let store = SledStore::open(db_dir(root)).unwrap_or_else(|e| {
        panic!(
            "open the store {when}: {e}; this process is {}, the processes holding its files: {:?}",
            std::process::id(),
            holders(&db_dir(root))
        )
    });
    ParentStore { store, _alone: alone }
}

/// The processes with a file under `dir` open, from `/proc`: who holds a lock that should be
/// free.
fn holders(dir: &Path) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return vec!["no /proc".into()] };
    let mut found = Vec::new();
    for proc in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else { continue };
        let open: Vec<PathBuf> = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|t| t.starts_with(dir))
            .collect();
        if !open.is_empty() {
            let cmdline = std::fs::read(proc.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push(format!("pid {} ({cmdline}): {open:?}", proc.file_name().to_string_lossy()));
        }
    }
    found
}

/// The step a fork runs live from (0 for a saga that is not a fork): its journal copies its
/// source's steps before it.
fn forked_at(history: &[RecordedEvent]) -> u32 {
    history
        .iter()
        .find_map(|r| match r.event {
            Event::ForkedFrom { step, .. } => Some(step),
            _ => None,
        })
        .unwrap_or(0)
}

/// The steps and compensations whose end the journals of `sagas` record, or whose result
/// reached a saga body, with how often each has run so far. None of them may run again.
fn settled(root: &Path, sagas: &[String]) -> HashMap<Key, usize> {
    let effects = read_effects(&effect_log(root));
    let counts = count_effects(&effects);
    let store = open_store(root, "between runs");
    let mut settled = HashMap::new();
    for saga in sagas {
        let history = store.history(&id(saga)).expect("history");
        let silent = silent_steps(&history);
        settle(saga, &history, &counts, |step| silent.contains(&step), &mut settled);
    }
    settle_returned(root, &effect_attempts(&effects), &mut settled);
    settled
}

fn check_settled_did_not_rerun(root: &Path, settled: &HashMap<Key, usize>, when: &str) {
    check_not_rerun(&count_effects(&read_effects(&effect_log(root))), settled, when, |saga| {
        let store = open_store(root, "reading a journal");
        format_journal(&store.history(&id(saga)).unwrap_or_default())
    });
}

/// What one saga of a finished round left.
#[derive(Clone, Debug)]
struct SagaReport {
    saga: String,
    round: u32,
    status: SagaStatus,
    history: Vec<RecordedEvent>,
    /// Its effect lines, in file order.
    effects: Vec<Effect>,
    outcome: String,
}

impl SagaReport {
    fn journal(&self) -> String {
        format_journal(&self.history)
    }

    fn events(&self) -> impl Iterator<Item = &Event> {
        self.history.iter().map(|r| &r.event)
    }

    fn count(&self, what: impl Fn(&Event) -> bool) -> usize {
        self.events().filter(|e| what(e)).count()
    }

    /// The names of the steps that ran (`Kind::Step`) or were compensated, with how often.
    fn ran(&self, kind: Kind) -> BTreeMap<String, usize> {
        let mut ran = BTreeMap::new();
        for e in self.effects.iter().filter(|e| e.kind == kind) {
            *ran.entry(e.name.clone()).or_default() += 1;
        }
        ran
    }

    /// The compensated step numbers, in the order the journal records them.
    fn compensated(&self) -> Vec<u32> {
        self.events()
            .filter_map(|e| match e {
                Event::CompensationCompleted { step } => Some(*step),
                _ => None,
            })
            .collect()
    }
}

/// Text with the round's saga ids made the same in every round.
fn without_round(text: &str, round: u32) -> String {
    text.replace(&format!("-r{round}"), "-rN")
}

/// The journal without what depends on when the kills landed (attempts, retries) or on the
/// round (ids), as a sorted list: concurrent branches journal in any order.
fn shape(report: &SagaReport) -> Vec<String> {
    let history = &report.history;
    let names = step_names(history);
    let name = |step: &u32| names.get(step).cloned().unwrap_or_else(|| format!("#{step}"));
    let mut shape: Vec<String> = history
        .iter()
        .filter_map(|r| {
            Some(match &r.event {
                Event::SagaStarted { definition, .. } => format!("started {definition}"),
                Event::StepStarted { name, .. } => format!("step {name}"),
                Event::StepStartedAt { key, name, .. } => format!("step {name} at {key}"),
                Event::StepCompleted { step, .. } => format!("completed {}", name(step)),
                Event::StepFailed { step, error, .. } => format!("failed {}: {error}", name(step)),
                Event::BodyFailed { cause } => format!("body failed: {cause}"),
                Event::CancelRequested { reason } => format!("cancel: {reason}"),
                Event::CompensationCompleted { step } => format!("compensated {}", name(step)),
                Event::CompensationFailed { step, error } => {
                    format!("compensation failed {}: {error}", name(step))
                }
                Event::SagaCompleted { .. } => "saga completed".into(),
                Event::SagaFailed { cause } => format!("saga failed: {cause}"),
                Event::SagaCompensated { cause } => format!("saga compensated: {cause}"),
                Event::SagaCompensationFailed { step, .. } => {
                    format!("saga compensation failed {}", name(step))
                }
                Event::TimerStarted { key, .. } => format!("timer {key}"),
                Event::TimerFired { key } => format!("timer fired {key}"),
                Event::SignalReceived { name, payload } => format!("signal {name} {payload:?}"),
                Event::SignalWaitStarted { key, name, timeout_at } => {
                    format!("wait {key} {name} timeout {}", timeout_at.is_some())
                }
                Event::SignalConsumed { key, .. } => format!("signal taken {key}"),
                Event::SignalWaitTimedOut { key } => format!("wait timed out {key}"),
                Event::BranchesStarted { key, name, count, mode } => {
                    format!("branches {key} {name} {count} {mode:?}")
                }
                Event::BranchFinished { key, branch, error } => format!("branch {key}.{branch} {error:?}"),
                Event::ForkedFrom { step, .. } => format!("forked from step {step}"),
                Event::Forked { step, .. } => format!("forked at step {step}"),
                Event::StepRetried { .. }
                | Event::StepAttemptFailed { .. }
                | Event::CompensationStarted { .. }
                | Event::CompensationAttemptFailed { .. } => return None,
                other => format!("{other:?}"),
            })
        })
        .map(|line| without_round(&line, report.round))
        .collect();
    shape.sort();
    shape
}

/// What every primitive promises of a finished saga, whatever the kills did.
fn check_saga(report: &SagaReport) {
    let journal = report.journal();
    let saga = &report.saga;
    assert!(report.status.is_final(), "{saga} ended {:?}; journal:\n{journal}", report.status);
    let last = report.events().filter(|e| !e.is_link()).last();
    assert!(last.is_some_and(Event::is_final), "{saga}: the journal does not end; journal:\n{journal}");

    let mut step_attempts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut comp_attempts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut ended: HashSet<(Kind, u32)> = HashSet::new();
    let silent = silent_steps(&report.history);
    for recorded in &report.history {
        match &recorded.event {
            Event::StepStarted { step, .. }
            | Event::StepStartedAt { step, .. }
            | Event::StepRetried { step, .. }
            | Event::StepCompleted { step, .. }
            | Event::StepFailed { step, .. }
            | Event::CompensationStarted { step, .. }
            | Event::CompensationCompleted { step }
            | Event::CompensationFailed { step, .. }
                if silent.contains(step) => {}
            Event::StepStarted { step, .. } | Event::StepStartedAt { step, .. } => {
                step_attempts.entry(*step).or_default().push(1)
            }
            Event::StepRetried { step, attempt } => step_attempts.entry(*step).or_default().push(*attempt),
            Event::StepCompleted { step, .. } | Event::StepFailed { step, .. } => {
                ended.insert((Kind::Step, *step));
            }
            Event::CompensationStarted { step, attempt } => {
                comp_attempts.entry(*step).or_default().push(*attempt)
            }
            Event::CompensationCompleted { step } | Event::CompensationFailed { step, .. } => {
                ended.insert((Kind::Comp, *step));
            }
            _ => {}
        }
    }
    let ran = |kind: Kind, step: u32| -> Vec<u32> {
        report.effects.iter().filter(|e| e.kind == kind && e.step == step).map(|e| e.attempt).collect()
    };
    for effect in &report.effects {
        let journaled = match effect.kind {
            Kind::Step => &step_attempts,
            Kind::Comp => &comp_attempts,
        };
        assert!(
            journaled.contains_key(&effect.step),
            "{saga}: {effect:?} ran without being journaled; journal:\n{journal}"
        );
    }
    for (kind, attempts) in [(Kind::Step, &step_attempts), (Kind::Comp, &comp_attempts)] {
        for (step, journaled) in attempts {
            let what = format!("{saga} {kind:?} {step}");
            let finished = ended.contains(&(kind, *step));
            let ran = ran(kind, *step);
            if finished {
                assert!(!ran.is_empty(), "{what} is recorded as ended but never ran; journal:\n{journal}");
            }
            check_attempts(&what, &ran, journaled, finished, &journal);
        }
    }
    // Compensations run in reverse step order, and only once the body has stopped.
    let compensated = report.compensated();
    assert!(compensated.windows(2).all(|w| w[0] > w[1]), "{saga}: compensation order; journal:\n{journal}");
    if let Some(first) = report.effects.iter().position(|e| e.kind == Kind::Comp) {
        assert!(
            report.effects[first..].iter().all(|e| e.kind == Kind::Comp),
            "{saga}: a step ran after compensation began: {:?}",
            report.effects
        );
    }
}

/// A finished round: each role's report.
type Round = BTreeMap<&'static str, SagaReport>;

fn report_round(root: &Path, scenario: &str, round: u32) -> Round {
    let effects = read_effects(&effect_log(root));
    let store = open_store(root, "after the round");
    roles(scenario)
        .iter()
        .map(|role| {
            let saga = saga_id(role, round);
            let record = store.record(&id(&saga)).expect("record").unwrap_or_else(|| {
                let journals = roles(scenario).iter().map(|role| saga_id(role, round)).fold(
                    String::new(),
                    |mut out, other| {
                        let history = store.history(&id(&other)).unwrap_or_default();
                        let _ = writeln!(out, "{other}:\n{}", format_journal(&history));
                        out
                    },
                );
                panic!("{saga} has no record; journals:\n{journals}")
            });
            let outcome = std::fs::read_to_string(outcome_file(root, &saga))
                .unwrap_or_else(|e| panic!("the outcome of {saga}: {e}"));
            let outcome = without_round(&outcome, round);
            let report = SagaReport {
                round,
                history: store.history(&id(&saga)).expect("history"),
                effects: effects.iter().filter(|e| e.saga == saga).cloned().collect(),
                status: record.status,
                saga,
                outcome,
            };
            check_saga(&report);
            (*role, report)
        })
        .collect()
}

/// A scenario run once without kills, then through kills round after round.
struct Exercised {
    reference: Round,
    rounds: Vec<Round>,
    /// When each crash run's engine was ready, in ms since the epoch.
    starts: Vec<u64>,
    /// The crash runs' directory, kept for the scenario's own checks.
    dir: tempfile::TempDir,
}

impl Exercised {
    /// How many rounds had a restart between the first events `from` and `to` of role `role`:
    /// a kill landed in that window and the primitive came through it.
    fn restarted_between(
        &self,
        role: &str,
        from: impl Fn(&Event) -> bool,
        to: impl Fn(&Event) -> bool,
    ) -> usize {
        self.rounds
            .iter()
            .filter(|round| {
                let report = &round[role];
                let (from, to) = (timestamp_of(report, &from), timestamp_of(report, &to));
                self.starts.iter().any(|s| from.0 < *s && *s < to.0)
            })
            .count()
    }
}

fn child_env(root: &Path, scenario: &str, round: u32) -> Vec<(&'static str, String)> {
    vec![
        (CHILD_ENV, root.display().to_string()),
        (SCENARIO_ENV, scenario.to_owned()),
        (ROUND_ENV, round.to_string()),
    ]
}

/// Runs `scenario`'s reference, then `rounds` rounds, each run killed after 0 to `max_lines`
/// lines or, every other run, at a line of one of the saga-body `windows` ([`Kills::new`]);
/// the first run of round 0 after `first_kill` lines, if given: a window the random kills might
/// miss. More rounds follow until a kill landed in each of `windows`, and [`MIN_BODY_KILLS`] in
/// the saga bodies. Checks each round against the reference: same outcome, same journal shape,
/// the same steps run and compensated (by name), nothing settled re-run.
fn exercise(
    scenario: &str,
    rounds: u32,
    max_lines: u64,
    first_kill: Option<u64>,
    windows: &[Window],
) -> Exercised {
    // Each scenario draws its own kill points from the one seed.
    print!("{scenario}: ");
    let seed =
        seed(SEED_ENV) ^ scenario.bytes().fold(0_u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let began = Instant::now();

    let reference_dir = tempfile::tempdir().expect("temp dir");
    let run = run_alone(&child_env(reference_dir.path(), scenario, 0), KillAt::after(u64::MAX));
    assert_eq!(run, None, "{scenario}: the reference run was killed");
    let reference = report_round(reference_dir.path(), scenario, 0);

    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let aims: Vec<Window> = windows.iter().copied().filter(|w| w.in_body()).collect();
    let mut kills = Kills::new(seed, max_lines, &aims, MAX_RUNS_PER_ROUND);
    if let Some(line) = first_kill {
        kills.next_at(KillAt::after(line));
    }
    let mut done = Vec::new();
    let mut round = 0;
    let enough = |kills: &Kills| kills.hit_all(windows) && kills.in_body() >= MIN_BODY_KILLS;
    while round < rounds || (!enough(&kills) && round < rounds * MAX_ROUNDS_FACTOR) {
        let sagas: Vec<String> = roles(scenario).iter().map(|role| saga_id(role, round)).collect();
        kills.run_round(
            &format!("{scenario} round {round}"),
            || settled(root, &sagas),
            |kill| run_alone(&child_env(root, scenario, round), kill),
            |settled, when| check_settled_did_not_rerun(root, settled, when),
        );
        let finished = report_round(root, scenario, round);
        for (role, report) in &finished {
            let expected = &reference[role];
            let saga = &report.saga;
            assert_eq!(
                report.outcome,
                expected.outcome,
                "{saga}: the outcome; journal:\n{}",
                report.journal()
            );
            assert_eq!(report.status, expected.status, "{saga}: the status");
            assert_eq!(
                shape(report),
                shape(expected),
                "{saga}: the journal's shape; journal:\n{}\nreference:\n{}",
                report.journal(),
                expected.journal()
            );
            // By name, counted once: an attempt a kill cut off may run again, nothing else.
            let ran = |r: &SagaReport, kind| r.ran(kind).into_keys().collect::<Vec<_>>();
            assert_eq!(ran(report, Kind::Step), ran(expected, Kind::Step), "{saga}: the steps that ran");
            assert_eq!(ran(report, Kind::Comp), ran(expected, Kind::Comp), "{saga}: the compensations");
        }
        done.push(finished);
        round += 1;
    }
    // Later rounds must not have run anything of an earlier one.
    let effects = read_effects(&effect_log(root));
    for report in done.iter().flat_map(|round| round.values()) {
        let lines = effects.iter().filter(|e| e.saga == report.saga).count();
        assert_eq!(lines, report.effects.len(), "{} ran after its round", report.saga);
    }
    let reruns = effects.len() - count_effects(&effects).len();
    println!(
        "{scenario}: {} kills in {} child runs over {round} rounds, {} effects ({reruns} re-run attempts) in {:.1?}\n{scenario}: {kills}",
        kills.total(),
        kills.runs(),
        effects.len(),
        began.elapsed()
    );
    assert!(kills.total() >= round / 2, "{scenario}: only {} kills in {round} rounds", kills.total());
    kills.assert_hit(scenario, windows);
    assert!(kills.in_body() >= MIN_BODY_KILLS, "{scenario}: {kills}");
    let starts = read_lines(&starts_log(root)).iter().map(|l| l.parse().expect("a start time")).collect();
    Exercised { reference, rounds: done, starts, dir }
}

fn timestamp_of(report: &SagaReport, what: impl Fn(&Event) -> bool) -> Timestamp {
    let found = report.history.iter().find(|r| what(&r.event));
    found.unwrap_or_else(|| panic!("{}: event missing; journal:\n{}", report.saga, report.journal())).at
}

/// Completed steps and compensations by name, each exactly once.
fn completed_once(report: &SagaReport) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let names = step_names(&report.history);
    let mut completed = BTreeMap::new();
    let mut compensated = BTreeMap::new();
    for event in report.events() {
        match event {
            Event::StepCompleted { step, .. } => *completed.entry(names[step].clone()).or_default() += 1,
            Event::CompensationCompleted { step } => {
                *compensated.entry(names[step].clone()).or_default() += 1
            }
            _ => {}
        }
    }
    (completed, compensated)
}

fn names(list: &[&str]) -> BTreeMap<String, usize> {
    list.iter().map(|n| (n.to_string(), 1)).collect()
}

#[test]
fn timer_fires_at_its_original_due_time_across_kills() {
    // Round 0 is killed while its timer is set (after `before` and its return, then the mark).
    let exercised = exercise("timer", 6, 6, Some(3), &[Window::BetweenSteps, Window::AfterTimer]);
    assert_eq!(exercised.reference["timer"].outcome, "Completed(11)");
    let starts = &exercised.starts;
    let timer_ms = TIMER.as_millis() as u64;
    let mut lateness = Vec::new();
    for round in &exercised.rounds {
        let report = &round["timer"];
        let journal = report.journal();
        let dues: Vec<Timestamp> = report
            .events()
            .filter_map(|e| match e {
                Event::TimerStarted { due, .. } => Some(*due),
                _ => None,
            })
            .collect();
        assert_eq!(dues.len(), 1, "{}: a restart set the timer again; journal:\n{journal}", report.saga);
        assert_eq!(report.count(|e| matches!(e, Event::TimerFired { .. })), 1, "{journal}");
        let due = dues[0];
        let set = timestamp_of(report, |e| matches!(e, Event::TimerStarted { .. }));
        // Due a timer length after it was set: its due time is taken just before the write, so
        // the two differ by scheduling only, and a due time from anything but the set time
        // (a restart, say) would be off by a timer length or more.
        let length = due.0.abs_diff(set.0 + timer_ms);
        assert!(length < timer_ms, "due {due:?}, set at {set:?}; journal:\n{journal}");
        let fired = timestamp_of(report, |e| matches!(e, Event::TimerFired { .. }));
        assert!(
            fired >= due,
            "{}: fired at {fired:?} before its due time {due:?}; journal:\n{journal}",
            report.saga
        );
        // The run that fired it started before it fired; if that restart came after the due
        // time, the timer is due at once. A timer restarted from zero would fire a whole timer
        // length after that restart: the bound is that length, not a guess at how late a busy
        // machine may run a due timer.
        let restart =
            starts.iter().copied().filter(|s| *s <= fired.0).max().expect("a start before the timer fired");
        let late = fired.0 - due.0.max(restart);
        assert!(
            late < timer_ms,
            "{}: fired {late} ms after max(due {}, restart {restart}); journal:\n{journal}",
            report.saga,
            due.0
        );
        let after = report.history.iter().find(|r| matches!(r.event.step_start(), Some((_, "after"))));
        assert!(
            after.is_some_and(|r| r.at >= fired),
            "the step after the timer began before it fired:\n{journal}"
        );
        lateness.push(late);
    }
    let restarted_while_set = exercised.restarted_between(
        "timer",
        |e| matches!(e, Event::TimerStarted { .. }),
        |e| matches!(e, Event::TimerFired { .. }),
    );
    println!(
        "timer: fired {lateness:?} ms after max(due, restart); {restarted_while_set} rounds restarted while it was set"
    );
    assert!(restarted_while_set > 0, "no kill landed while a timer was set");
}

#[test]
fn signal_is_taken_exactly_once_across_kills() {
    // Round 0 (before the wait) is killed with its signal journaled but not yet taken.
    let exercised = exercise("signal", 6, 7, Some(3), &[Window::BetweenSteps, Window::AfterSignal]);
    let payload = approval();
    let expected = format!("Completed({:?})", format!("{payload:?} applied {} after 1", "alice#42".len()));
    for round in std::iter::once(&exercised.reference).chain(&exercised.rounds) {
        let report = &round["signal"];
        let journal = report.journal();
        assert_eq!(report.outcome, expected, "{journal}");
        let received: Vec<u64> = report
            .history
            .iter()
            .filter(|r| matches!(r.event, Event::SignalReceived { .. }))
            .map(|r| r.seq)
            .collect();
        assert_eq!(
            received.len(),
            1,
            "{}: the signal was journaled {} times:\n{journal}",
            report.saga,
            received.len()
        );
        let consumed: Vec<u64> = report
            .events()
            .filter_map(|e| match e {
                Event::SignalConsumed { signal, .. } => Some(*signal),
                _ => None,
            })
            .collect();
        assert_eq!(consumed, received, "{}: the wait took another signal, or twice:\n{journal}", report.saga);
        let wait = report.history.iter().find(|r| matches!(r.event, Event::SignalWaitStarted { .. }));
        let wait = wait.unwrap_or_else(|| panic!("no wait:\n{journal}")).seq;
        let round_number: u32 = report.saga.rsplit('r').next().and_then(|r| r.parse().ok()).expect("round");
        match signal_at(round_number) {
            SignalAt::BeforeWait => assert!(received[0] < wait, "sent before the wait:\n{journal}"),
            SignalAt::DuringWait => assert!(received[0] > wait, "sent during the wait:\n{journal}"),
        }
        let (completed, _) = completed_once(report);
        assert_eq!(completed, names(&["request", "apply"]), "the payload applied once:\n{journal}");
    }
    let sent = read_lines(&sent_log(exercised.dir.path()));
    // At most once each: a kill may land between `signal` returning and this note, and the
    // journal (one `SignalReceived`, checked above) is what counts.
    let distinct: HashSet<&String> = sent.iter().collect();
    assert_eq!(distinct.len(), sent.len(), "a signal was sent again after it was journaled: {sent:?}");
    let kept = exercised.restarted_between(
        "signal",
        |e| matches!(e, Event::SignalReceived { .. }),
        |e| matches!(e, Event::SignalConsumed { .. }),
    );
    println!("signal: {kept} rounds restarted between a signal's arrival and its taking");
    assert!(kept > 0, "no kill landed while a signal waited to be taken");
}

/// The branch each step number of a group belongs to, from its key `group.branch.op`.
fn branch_of(key: &str, group: &str) -> Option<u32> {
    key.strip_prefix(group)?.strip_prefix('.')?.split('.').next()?.parse().ok()
}

#[test]
fn fan_out_and_matrix_survive_kills() {
    let exercised =
        exercise("fanout", 3, 40, None, &[Window::BetweenSteps, Window::AfterBranch, Window::AfterGroup]);
    let reference = &exercised.reference;
    assert_eq!(reference["fan-ok"].outcome, "Completed([55, 155, 255, 355])");
    assert_eq!(reference["fan-fail"].outcome, format!("Compensated {{ cause: {:?} }}", failure("b3-s0")));
    assert_eq!(reference["matrix"].outcome, "Completed([2, 102, 202, 302, 402])");
    let all_steps: Vec<String> =
        (0..FANOUT_BRANCHES).flat_map(|b| [format!("b{b}-s0"), format!("b{b}-s1")]).collect();
    for round in std::iter::once(reference).chain(&exercised.rounds) {
        let ok = &round["fan-ok"];
        let (completed, compensated) = completed_once(ok);
        assert_eq!(completed, all_steps.iter().map(|s| (s.clone(), 1)).collect(), "{}", ok.journal());
        assert!(compensated.is_empty() && ok.ran(Kind::Comp).is_empty(), "{}", ok.journal());

        // Every step that started, in every branch, is compensated once; b3-s1 never started.
        let fail = &round["fan-fail"];
        let journal = fail.journal();
        let started: Vec<String> = all_steps.iter().filter(|s| *s != "b3-s1").cloned().collect();
        let (completed, compensated) = completed_once(fail);
        assert_eq!(
            completed,
            started.iter().filter(|s| *s != "b3-s0").map(|s| (s.clone(), 1)).collect(),
            "{journal}"
        );
        assert_eq!(compensated, started.iter().map(|s| (s.clone(), 1)).collect(), "{journal}");
        assert!(!step_names(&fail.history).values().any(|n| n == "b3-s1"), "b3-s1 started:\n{journal}");
        assert!(!fail.ran(Kind::Comp).contains_key("b3-s1"), "b3-s1 was compensated:\n{journal}");
        assert_eq!(fail.ran(Kind::Comp).len(), started.len(), "{journal}");

        // At most `MATRIX_LIMIT` branches of the matrix ran at once: a branch runs from its
        // first step's start to its end.
        let matrix = &round["matrix"];
        let journal = matrix.journal();
        let group = matrix
            .events()
            .find_map(|e| match e {
                Event::BranchesStarted { key, .. } => Some(key.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no group:\n{journal}"));
        let (mut running, mut seen, mut most) = (HashSet::new(), HashSet::new(), 0);
        for event in matrix.events() {
            match event {
                Event::StepStartedAt { key, .. } => {
                    let branch = branch_of(key, &group).expect("a branch step");
                    if seen.insert(branch) {
                        running.insert(branch);
                    }
                }
                Event::BranchFinished { branch, .. } => {
                    running.remove(branch);
                }
                _ => {}
            }
            most = most.max(running.len());
        }
        assert!(most <= MATRIX_LIMIT, "{most} matrix branches ran at once:\n{journal}");
        assert_eq!(seen.len(), MATRIX_PARAMS as usize, "{journal}");
    }
}

#[test]
fn child_saga_is_compensated_with_its_parent_across_kills() {
    let exercised = exercise("child", 6, 14, None, &[Window::BetweenSteps]);
    assert_eq!(
        exercised.reference["parent"].outcome,
        format!("Compensated {{ cause: {:?} }}", failure("p-fail"))
    );
    for round in std::iter::once(&exercised.reference).chain(&exercised.rounds) {
        let (parent, kid) = (&round["parent"], &round["parent/kid"]);
        assert_eq!(parent.status, SagaStatus::Compensated, "{}", parent.journal());
        assert_eq!(kid.status, SagaStatus::Compensated, "{}", kid.journal());
        let (completed, compensated) = completed_once(parent);
        assert_eq!(completed, names(&["p0", "child kid"]), "{}", parent.journal());
        assert_eq!(compensated, names(&["p0", "child kid", "p-fail"]), "{}", parent.journal());
        // The kid completed once, then was reopened and compensated once.
        let (completed, compensated) = completed_once(kid);
        assert_eq!(completed, names(&["k0", "k1"]), "{}", kid.journal());
        assert_eq!(compensated, names(&["k0", "k1"]), "{}", kid.journal());
        assert_eq!(kid.count(|e| matches!(e, Event::SagaStarted { .. })), 1, "{}", kid.journal());
        assert_eq!(kid.count(|e| matches!(e, Event::SagaCompleted { .. })), 1, "{}", kid.journal());
        let completed_at = kid.history.iter().position(|r| matches!(r.event, Event::SagaCompleted { .. }));
        let cancelled_at = kid.history.iter().position(|r| matches!(r.event, Event::CancelRequested { .. }));
        assert!(completed_at < cancelled_at, "reopened after it completed:\n{}", kid.journal());
        // The kid's compensations ran while the parent compensated its `child kid` step.
        let kid_undone = timestamp_of(kid, |e| matches!(e, Event::SagaCompensated { .. }));
        let parent_undone = timestamp_of(parent, |e| matches!(e, Event::SagaCompensated { .. }));
        assert!(kid_undone <= parent_undone, "the parent finished before its child");
    }
    let while_kid_ran = exercised.restarted_between(
        "parent/kid",
        |e| matches!(e, Event::SagaStarted { .. }),
        |e| matches!(e, Event::SagaCompleted { .. }),
    );
    let while_compensating = exercised.restarted_between(
        "parent",
        |e| matches!(e, Event::BodyFailed { .. }),
        |e| matches!(e, Event::SagaCompensated { .. }),
    );
    println!(
        "child: restarts while the kid ran in {while_kid_ran} rounds, while compensating in {while_compensating}"
    );
    assert!(while_kid_ran + while_compensating > 0, "no kill landed while the child saga mattered");
}

#[test]
fn cancel_during_a_crash_window_takes_effect_after_restart() {
    // Round 0 is killed right after its cancel is journaled (`c0` and its return, `c1` and its
    // return, then the two marks).
    let exercised = exercise("cancel", 6, 8, Some(6), &[Window::BetweenSteps, Window::Unjournaled]);
    let cause = format!("cancelled: {CANCEL_REASON}");
    assert_eq!(exercised.reference["cancel"].outcome, format!("Compensated {{ cause: {cause:?} }}"));
    for round in std::iter::once(&exercised.reference).chain(&exercised.rounds) {
        let report = &round["cancel"];
        let journal = report.journal();
        assert_eq!(report.count(|e| matches!(e, Event::CancelRequested { .. })), 1, "{journal}");
        assert_eq!(
            report.count(|e| matches!(e, Event::TimerFired { .. })),
            0,
            "the timer ran out:\n{journal}"
        );
        let (completed, compensated) = completed_once(report);
        assert_eq!(completed, names(&["c0", "c1"]), "{journal}");
        assert_eq!(compensated, names(&["c0", "c1"]), "{journal}");
        assert!(!report.ran(Kind::Step).contains_key("c2"), "c2 ran:\n{journal}");
    }
    let in_window = exercised.restarted_between(
        "cancel",
        |e| matches!(e, Event::CancelRequested { .. }),
        |e| matches!(e, Event::SagaCompensated { .. }),
    );
    println!("cancel: {in_window} rounds restarted between the cancel and the end");
    assert!(in_window > 0, "no kill landed between a cancel and its compensation");
}

#[test]
fn fork_runs_live_from_its_step_across_kills() {
    // Round 0 is killed in the fork's step 2 (after the source's 3 steps, the returns of the
    // first two, 3 compensations, and the mark before the fork).
    let exercised = exercise("fork", 5, 14, Some(10), &[Window::BetweenSteps, Window::Unjournaled]);
    assert_eq!(
        exercised.reference["source"].outcome,
        format!("Compensated {{ cause: {:?} }}", failure("s2"))
    );
    assert_eq!(exercised.reference["fork"].outcome, "Completed(8)");
    for round in std::iter::once(&exercised.reference).chain(&exercised.rounds) {
        let (source, fork) = (&round["source"], &round["fork"]);
        let journal = fork.journal();
        assert_eq!(
            fork.history.get(1).map(|r| &r.event),
            Some(&Event::ForkedFrom { source: id(&source.saga), step: 2 }),
            "{journal}"
        );
        let links: Vec<&Event> = source.events().filter(|e| e.is_link()).collect();
        assert_eq!(links, [&Event::Forked { fork: id(&fork.saga), step: 2 }], "{}", source.journal());
        let end = source.history.iter().position(|r| r.event.is_final()).expect("the source ended");
        assert!(source.history[end + 1..].iter().all(|r| r.event.is_link()), "{}", source.journal());
        // Steps 0 and 1 were reused, never run in the fork; 2 and 3 ran there once.
        assert_eq!(fork.ran(Kind::Step).into_keys().collect::<Vec<_>>(), ["s2", "s3"], "{journal}");
        assert!(fork.ran(Kind::Comp).is_empty(), "{journal}");
        let (completed, _) = completed_once(fork);
        assert_eq!(completed, names(&["s0", "s1", "s2", "s3"]), "{journal}");
        let (_, undone) = completed_once(source);
        assert_eq!(undone, names(&["s0", "s1", "s2"]), "{}", source.journal());
    }
    let during = exercised.restarted_between(
        "fork",
        |e| matches!(e, Event::ForkedFrom { .. }),
        |e| matches!(e, Event::SagaCompleted { .. }),
    );
    println!("fork: {during} rounds restarted while the fork ran");
    assert!(during > 0, "no kill landed while a fork ran");
}

// ---- Regression tests for the hodei-core bugs the crash tests above found ----
//
// Deterministic: the child process waits until the journal shows the attempt a restart is to
// cut off, then offers the parent its only kill point. Bodies held at [`GATE`] wait until the
// last run opens it.

/// Opened by the last run of a reproduction, once it has done what it tests.
static GATE: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::Sender::new(false));
/// Set in the child of a reproduction: which run this is, from 1; the last one is not killed.
const RUN_ENV: &str = "HODEI_PRIMITIVES_CRASH_RUN";
const LAST_RUN_ENV: &str = "HODEI_PRIMITIVES_CRASH_LAST_RUN";

async fn gate() -> Result<(), StepError> {
    let mut open = GATE.subscribe();
    open.wait_for(|open| *open).await.map(|_| ()).map_err(|e| StepError::terminal(e.to_string()))
}

/// `held-kid` holds its step (or that step's compensation) at the gate; `held-parent` runs it
/// as a child, then fails at `refuse` if its input says so; `held-undo` holds the compensation
/// of its step at the gate, and sleeps long enough to be cancelled.
fn held_definitions() -> Vec<SagaDefinition> {
    vec![
        SagaDefinition::new("held-kid", 1, |ctx: SagaContext, hold_compensation: bool| async move {
            ctx.step("held")
                .retry(policy())
                .compensate(move |_: CompensationContext<(), u64>| async move {
                    if hold_compensation { gate().await } else { Ok(()) }
                })
                .run(move |_: StepContext, ()| async move {
                    if !hold_compensation {
                        gate().await?;
                    }
                    Ok::<u64, StepError>(7)
                })
                .await
        }),
        SagaDefinition::new("held-parent", 1, |ctx: SagaContext, fail: bool| async move {
            let run = SagaRun::new("held-kid", format!("{}-kid", ctx.id()), &fail)
                .map_err(|e| StepError::terminal(e.to_string()))?;
            let kid: u64 = ctx.child(run).await?;
            if fail {
                ctx.step("refuse")
                    .run(|_, ()| async { Err::<(), _>(StepError::terminal("refused")) })
                    .await?;
            }
            Ok(kid)
        }),
        SagaDefinition::new("held-undo", 1, |ctx: SagaContext, (): ()| async move {
            ctx.step("undoable")
                .retry(policy())
                .compensate(|_: CompensationContext<(), ()>| gate())
                .run(|_, ()| async { Ok::<(), StepError>(()) })
                .await?;
            ctx.sleep(CANCEL_TIMER).await;
            Ok(())
        }),
    ]
}

/// Whether `event` starts attempt `attempt` of step `step` (`compensation`: of its compensation).
fn starts_attempt(event: &Event, step: u32, attempt: u32, compensation: bool) -> bool {
    match *event {
        Event::StepStarted { step: s, .. } | Event::StepStartedAt { step: s, .. } => {
            !compensation && s == step && attempt == 1
        }
        Event::StepRetried { step: s, attempt: a } => !compensation && s == step && a == attempt,
        Event::CompensationStarted { step: s, attempt: a } => compensation && s == step && a == attempt,
        _ => false,
    }
}

/// One run of a reproduction in the child. Returns the saga's outcome on the last run.
async fn run_reproduction(engine: &Engine, scenario: &str, run: u32, last: bool) -> Option<String> {
    let (saga, definition, input) = match scenario {
        "restart-child-run" => ("restart-child-run", "held-parent", false),
        "restart-child-undo" => ("restart-child-undo", "held-parent", true),
        "restart-cancel" => ("restart-cancel", "held-undo", false),
        other => panic!("unknown reproduction {other}"),
    };
    let sid = id(saga);
    match definition {
        "held-undo" => start(engine, definition, saga, &()).await,
        _ => start(engine, definition, saga, &input).await,
    };
    match scenario {
        // Each restart cuts off attempt `run` of the parent's `child held-kid` step (step 0),
        // or of its compensation.
        "restart-child-run" | "restart-child-undo" if !last => {
            let compensation = scenario == "restart-child-undo";
            journaled(engine, &sid, |e| starts_attempt(e, 0, run, compensation)).await;
            flushed(engine).await;
            mark(&format!("{saga} attempt {run}"));
        }
        "restart-cancel" if run == 1 => {
            journaled(engine, &sid, |e| matches!(e, Event::TimerStarted { .. })).await;
            engine.cancel(&sid, CANCEL_REASON).await.expect("cancel");
            journaled(engine, &sid, |e| starts_attempt(e, 0, 1, true)).await;
            flushed(engine).await;
            mark(&format!("{saga} compensating"));
        }
        // Resumed, compensating at the gate: in flight, and cancelled already.
        "restart-cancel" => engine.cancel(&sid, CANCEL_REASON).await.expect("cancel again"),
        _ => {}
    }
    if !last {
        panic!("run {run} of {scenario} was to be killed at its kill point");
    }
    GATE.send_replace(true);
    let (_, outcome) = match definition {
        "held-undo" => outcome::<()>(engine, saga).await,
        _ => outcome::<u64>(engine, saga).await,
    };
    Some(outcome)
}

/// Runs reproduction `scenario` through `kills` killed runs and a last one; returns the saga's
/// outcome and journal.
fn reproduce(scenario: &str, kills: u32) -> (String, Vec<RecordedEvent>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    for run in 1..=kills + 1 {
        let last = run == kills + 1;
        let mut env = child_env(root, scenario, 0);
        env.push((RUN_ENV, run.to_string()));
        env.push((LAST_RUN_ENV, last.to_string()));
        // Killed at the reproduction's mark, or finished.
        let expected = if last { None } else { Some(Window::Outside) };
        let kill = KillAt::after(if last { u64::MAX } else { 1 });
        assert_eq!(run_alone(&env, kill), expected, "run {run}");
    }
    let outcome = std::fs::read_to_string(outcome_file(root, scenario)).expect("the outcome");
    let history = open_store(root, "after the last run").history(&id(scenario)).expect("history");
    (outcome, history)
}

/// Regression test for a hodei-core bug these tests found (fixed in 43d1832): a parent's
/// child-saga step counted every restart while its child ran as one of its attempts, under the
/// default policy of 3 that `ctx.child` gave no way to change. After three restarts the parent
/// failed ("interrupted by a restart in attempt 3, its last") and compensated, though its child
/// is durable and completes: without the restarts it ends `Completed(7)`.
#[test]
fn child_step_outlives_restarts_while_its_child_runs() {
    let (outcome, history) = reproduce("restart-child-run", 3);
    assert_eq!(outcome, "Completed(7)", "journal:\n{}", format_journal(&history));
}

/// Regression test for a hodei-core bug these tests found (fixed in 43d1832): the same for the
/// compensation of a child-saga step: each restart while the child compensated used up one of
/// the 3 default attempts of the parent's `compensate_child`, and after three the parent ended
/// `CompensationFailed` (the crash test above also saw it so after two, when the restarted
/// parent asked for its child before recovery had resumed it and got "the engine stopped before
/// saga ... finished"). Without restarts: `Compensated`.
#[test]
fn child_compensation_outlives_restarts() {
    let (outcome, history) = reproduce("restart-child-undo", 3);
    assert_eq!(outcome, "Compensated { cause: \"refused\" }", "journal:\n{}", format_journal(&history));
}

/// Regression test for a hodei-core bug these tests found (fixed in 43d1832): a saga resumed
/// after a restart forgot the cancel its journal holds (its control's cancel started empty), so
/// `Engine::cancel` on it journaled a second `CancelRequested`. The child-saga crash test saw
/// one more per restart during a child's compensation, since the parent's `compensate_child`
/// cancels the child again.
#[test]
fn cancel_after_a_restart_is_journaled_once() {
    let (outcome, history) = reproduce("restart-cancel", 1);
    assert_eq!(outcome, format!("Compensated {{ cause: {:?} }}", format!("cancelled: {CANCEL_REASON}")));
    let cancels = history.iter().filter(|r| matches!(r.event, Event::CancelRequested { .. })).count();
    assert_eq!(cancels, 1, "journal:\n{}", format_journal(&history));
}
