//! A CI pipeline: checkout, build, a parallel test matrix, a staging deploy, an approval gate,
//! a production deploy and a post-deploy check, as durable steps with rollback compensations
//! for the deploys.
//!
//! ```text
//! cargo run --example ci_pipeline                        # runs up to the approval gate and exits;
//!                                                        # the pipeline waits in ./hodei-data-ci
//! cargo run --example ci_pipeline -- --approve alice     # approves it: production deploy, verify
//! cargo run --example ci_pipeline -- --auto-approve      # the whole pipeline in one run
//! cargo run --example ci_pipeline -- --fail verify --auto-approve
//!                                                        # the post-deploy check fails:
//!                                                        # the deploys are rolled back
//! HODEI_FAIL=test cargo run --example ci_pipeline        # a failing test suite: nothing to roll back
//! ```
//! `--fail` (or `HODEI_FAIL`) takes `checkout`, `build`, `test` (the `integration` suite fails),
//! `deploy-staging`, `deploy-production` or `verify`. Pipelines are numbered `ci-1`, `ci-2`, ...;
//! a new one starts only once the last has finished, so a run while one waits at the gate
//! reports it instead of starting another. `--run <id>` picks the pipeline `--approve` approves
//! (the latest by default). A data directory that lost acknowledged writes (a damaged disk) is
//! refused; `--accept-data-loss` opens it anyway, with whatever is left.

use std::process::ExitCode;
use std::time::Duration;

use hodei::{
    CompensationContext, Engine, EngineEvent, Error, Event, Outcome, RecordedEvent, SagaContext, SagaFilter,
    SagaId, SagaRecord, SagaStatus, SledOptions, SledStore, StepContext, StepError, Timeline, Timestamp,
    saga, step,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// The example's own data directory, so that its waiting pipelines never meet the quickstart's
/// engine, which does not register `ci`.
const DATA_DIR: &str = "hodei-data-ci";
/// The signal the approval gate waits for.
const APPROVE: &str = "approve";
/// How long the gate waits. The deadline is journaled when the wait begins, so restarts do not
/// extend it; past it the pipeline fails and staging is rolled back.
const APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// The test matrix, and how many suites run at once.
const SUITES: [&str; 4] = ["unit", "integration", "doc", "e2e"];
const PARALLEL_SUITES: usize = 2;
/// The suite that `--fail test` fails.
const FAILING_SUITE: &str = "integration";

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Pipeline {
    repository: String,
    branch: String,
    /// The step that fails, to show what happens then.
    fail: Option<String>,
}

/// The payload of the `approve` signal.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Approval {
    by: String,
}

fn maybe_fail(ctx: &StepContext, fail: &Option<String>) -> Result<(), StepError> {
    match fail {
        Some(step) if *step == ctx.name => Err(StepError::terminal(format!("{step}: exit status 1"))),
        _ => Ok(()),
    }
}

#[step(retry(max_attempts = 3, backoff = "200ms"))]
async fn checkout(ctx: StepContext, pipeline: Pipeline) -> Result<String, StepError> {
    maybe_fail(&ctx, &pipeline.fail)?;
    Ok(format!("{}@{}:9b1d4e0", pipeline.repository, pipeline.branch))
}

#[step(timeout = "10m")]
async fn build(ctx: StepContext, commit: String, fail: Option<String>) -> Result<String, StepError> {
    maybe_fail(&ctx, &fail)?;
    Ok(format!("target/release/app ({commit})"))
}

/// One suite of the test matrix: a step of its own branch, so each suite is journaled, retried
/// and replayed on its own.
#[step(name = "test", timeout = "20m")]
async fn run_suite(
    ctx: StepContext,
    artifact: String,
    suite: String,
    fail: Option<String>,
) -> Result<u32, StepError> {
    if suite == FAILING_SUITE && fail.as_deref() == Some(ctx.name.as_str()) {
        return Err(StepError::terminal(format!("{} ({suite} suite): exit status 1", ctx.name)));
    }
    let _ = artifact;
    Ok(match suite.as_str() {
        "unit" => 912,
        "integration" => 301,
        "doc" => 47,
        _ => 24,
    })
}

#[step(name = "deploy-staging", compensate = roll_back, timeout = "5m")]
async fn deploy_staging(
    ctx: StepContext,
    artifact: String,
    fail: Option<String>,
) -> Result<String, StepError> {
    maybe_fail(&ctx, &fail)?;
    Ok(format!("staging now runs {artifact}"))
}

#[step(name = "deploy-production", compensate = roll_back, timeout = "5m")]
async fn deploy_production(
    ctx: StepContext,
    artifact: String,
    fail: Option<String>,
) -> Result<String, StepError> {
    maybe_fail(&ctx, &fail)?;
    Ok(format!("production now runs {artifact}"))
}

/// Rolls a deploy back. Runs for a deploy that completed and, with `output` None, for one that
/// started but whose completion was never recorded.
async fn roll_back(c: CompensationContext<(String, Option<String>), String>) -> Result<(), StepError> {
    match c.output {
        Some(done) => println!("  ↩ {}: rolling back ({done})", c.name),
        None => println!("  ↩ {}: rolling back a deploy that may have half happened", c.name),
    }
    Ok(())
}

#[step(retry(max_attempts = 2, backoff = "100ms"))]
async fn verify(ctx: StepContext, fail: Option<String>) -> Result<(), StepError> {
    maybe_fail(&ctx, &fail)
}

// Version 2: the test matrix and the approval gate changed the body's operations, so runs of
// version 1 must not replay against it.
#[saga(name = "ci", version = 2)]
async fn ci(ctx: SagaContext, pipeline: Pipeline) -> Result<String, StepError> {
    let fail = pipeline.fail.clone();
    let commit = checkout(&ctx, pipeline).await?;
    let artifact = build(&ctx, commit, fail.clone()).await?;

    let suites = SUITES.iter().map(|s| s.to_string()).collect();
    let (matrix_artifact, matrix_fail) = (artifact.clone(), fail.clone());
    // Each suite's step takes the context of its own branch (this `ctx` shadows the saga's):
    // that is what journals it under the branch.
    let passed = ctx
        .matrix("tests", suites, PARALLEL_SUITES, move |ctx, suite| {
            let (artifact, fail) = (matrix_artifact.clone(), matrix_fail.clone());
            async move { run_suite(&ctx, artifact, suite, fail).await }
        })
        .await?;
    let passed: u32 = passed.iter().sum();

    deploy_staging(&ctx, artifact.clone(), fail.clone()).await?;
    let approval = ctx
        .wait_signal_timeout::<Approval>(APPROVE, APPROVAL_TIMEOUT)
        .await?
        .ok_or_else(|| StepError::terminal("nobody approved the production deploy within 24 h"))?;
    deploy_production(&ctx, artifact.clone(), fail.clone()).await?;
    verify(&ctx, fail).await?;
    Ok(format!("{passed} tests passed; {artifact} is in production, approved by {}", approval.by))
}

/// What the command line asks for.
#[derive(Debug)]
enum Mode {
    /// Start a pipeline (or follow the one in flight) up to the gate, then exit.
    ToGate,
    /// The same, approving the gate at once: the whole pipeline in one run.
    AutoApprove,
    /// Approve the pipeline waiting at the gate and follow it to its end.
    Approve { by: String, run: Option<SagaId> },
}

#[derive(Debug)]
struct Args {
    mode: Mode,
    fail: Option<String>,
    accept_data_loss: bool,
}

/// A command-line mistake: reported with exit status 2.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn parse_args() -> Result<Args, Usage> {
    let mut args = std::env::args().skip(1);
    let (mut fail, mut approve, mut run, mut auto, mut accept_data_loss) = (None, None, None, false, false);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| Usage(format!("{flag} needs a value")));
        match arg.as_str() {
            "--fail" => fail = Some(value("--fail <step>")?),
            "--approve" => approve = Some(value("--approve <name>")?),
            "--run" => {
                let id = value("--run <id>")?;
                run = Some(SagaId::new(id).map_err(|e| Usage(format!("--run: {e}")))?);
            }
            "--auto-approve" => auto = true,
            "--accept-data-loss" => accept_data_loss = true,
            other => {
                return Err(Usage(format!(
                    "unknown argument `{other}`; use --fail <step>, --auto-approve, --approve <name> [--run <id>], --accept-data-loss"
                )));
            }
        }
    }
    let fail = fail.or_else(|| std::env::var("HODEI_FAIL").ok());
    let known: Vec<&str> = ci::SHAPE.steps.iter().map(|s| s.name).collect();
    if let Some(step) = fail.as_deref().filter(|s| !known.contains(s)) {
        return Err(Usage(format!("--fail {step}: no such step; the steps are {}", known.join(", "))));
    }
    let mode = match (approve, auto) {
        (Some(_), true) => return Err(Usage("--approve and --auto-approve exclude each other".into())),
        (Some(_), false) if fail.is_some() => {
            return Err(Usage(
                "--fail applies when a pipeline starts; --approve resumes one that already has".into(),
            ));
        }
        (Some(by), false) => Mode::Approve { by, run },
        (None, _) if run.is_some() => return Err(Usage("--run only goes with --approve".into())),
        (None, true) => Mode::AutoApprove,
        (None, false) => Mode::ToGate,
    };
    Ok(Args { mode, fail, accept_data_loss })
}

/// The number of a pipeline id `ci-<n>`.
fn number(record: &SagaRecord) -> Option<u64> {
    record.id.as_str().strip_prefix("ci-")?.parse().ok()
}

/// The most recent pipeline, by number.
fn latest(engine: &Engine) -> Result<Option<SagaRecord>, Error> {
    let runs = engine.list(&SagaFilter::default().definition(ci::NAME))?;
    Ok(runs.into_iter().filter_map(|r| number(&r).map(|n| (n, r))).max_by_key(|(n, _)| *n).map(|(_, r)| r))
}

/// Where a pipeline stands at its approval gate, read from its journal.
#[derive(Debug, PartialEq)]
enum Gate {
    NotReached,
    Waiting { until: Option<Timestamp> },
    Passed,
}

fn gate(history: &[RecordedEvent]) -> Gate {
    let mut gate = Gate::NotReached;
    let mut wait_key = None;
    for recorded in history {
        match &recorded.event {
            Event::SignalWaitStarted { key, name, timeout_at } if name == APPROVE => {
                wait_key = Some(key.clone());
                gate = Gate::Waiting { until: *timeout_at };
            }
            Event::SignalConsumed { key, .. } | Event::SignalWaitTimedOut { key }
                if wait_key.as_ref() == Some(key) =>
            {
                gate = Gate::Passed;
            }
            _ => {}
        }
    }
    gate
}

/// Where a followed pipeline stopped.
enum Stand {
    AtGate { until: Option<Timestamp> },
    Finished(Outcome<String>),
    Stuck(SagaStatus),
}

/// Follows a pipeline until it finishes, cannot go on, or (with `stop_at_gate`) waits at the
/// gate. The journal is the truth; engine events only say when to read it again, so a
/// subscriber that lags behind loses nothing.
async fn follow(
    engine: &Engine,
    id: &SagaId,
    events: &mut broadcast::Receiver<EngineEvent>,
    stop_at_gate: bool,
) -> anyhow::Result<Stand> {
    loop {
        let record = engine.status(id)?;
        if record.status.is_final() {
            return Ok(Stand::Finished(engine.handle(id)?.outcome::<String>().await?));
        }
        if matches!(record.status, SagaStatus::Parked { .. } | SagaStatus::WaitingForVersion) {
            return Ok(Stand::Stuck(record.status));
        }
        if stop_at_gate && let Gate::Waiting { until } = gate(&engine.history(id)?) {
            return Ok(Stand::AtGate { until });
        }
        loop {
            match events.recv().await {
                Ok(event) if event.saga_id == *id => break,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => anyhow::bail!("the engine stopped"),
            }
        }
    }
}

fn hours(d: Duration) -> String {
    let minutes = d.as_secs() / 60;
    format!("{}h {:02}m", minutes / 60, minutes % 60)
}

/// Prints where the pipeline stands and its journal.
fn report(engine: &Engine, id: &SagaId, stand: &Stand) -> anyhow::Result<()> {
    match stand {
        Stand::AtGate { until } => {
            let left = until.map(|t| format!(" (for another {})", hours(t.remaining()))).unwrap_or_default();
            println!("\n{id} is waiting for approval to deploy to production{left}.");
            println!("approve it with: cargo run --example ci_pipeline -- --approve <your name>");
        }
        Stand::Finished(Outcome::Completed(summary)) => println!("\n{id} passed: {summary}"),
        Stand::Finished(Outcome::Compensated { cause }) => {
            println!("\n{id} failed ({cause}); every deploy was rolled back")
        }
        Stand::Finished(Outcome::Failed { cause }) => {
            println!("\n{id} failed ({cause}); nothing to roll back")
        }
        Stand::Finished(other) => println!("\n{id}: {other:?}"),
        Stand::Stuck(status) => println!("\n{id} cannot go on: {status:?}"),
    }
    println!("\ntimeline:");
    print!("{}", Timeline(&engine.history(id)?));
    Ok(())
}

/// The pipeline in flight, or a new one: a new pipeline starts only once the last has finished.
async fn current_or_new(engine: &Engine, fail: Option<String>) -> anyhow::Result<SagaId> {
    let last = latest(engine)?;
    if let Some(last) = last.as_ref().filter(|r| !r.status.is_final()) {
        let state = match gate(&engine.history(&last.id)?) {
            Gate::Waiting { .. } => "is waiting for approval",
            _ => "is still in flight",
        };
        println!("\n{} {state}: following it rather than starting a second pipeline", last.id);
        if fail.is_some() {
            println!("(--fail applies to new pipelines; {} keeps the input it started with)", last.id);
        }
        return Ok(last.id.clone());
    }
    let next = last.as_ref().and_then(number).unwrap_or(0) + 1;
    let pipeline = Pipeline { repository: "acme/shop".into(), branch: "main".into(), fail };
    let run = ci::start(engine, format!("ci-{next}"), &pipeline).await?;
    println!("\nstarted {}", run.id());
    Ok(run.id().clone())
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    println!("pipeline `{}` v{}:", ci::NAME, ci::VERSION);
    for step in ci::SHAPE.steps {
        let undo = step.compensation.map(|c| format!(" (compensated by {c})")).unwrap_or_default();
        println!("  - {}{undo}", step.name);
    }
    println!("  the `test` step runs once per suite ({}), {PARALLEL_SUITES} at a time", SUITES.join(", "));
    println!("  `deploy-production` waits for the `{APPROVE}` signal");

    let store =
        SledStore::open_with(DATA_DIR, SledOptions::default().accept_data_loss(args.accept_data_loss))?;
    let engine = Engine::builder().store(store).register(ci::definition()).start().await?;
    // Subscribed before anything starts, so that no change of the followed saga is missed.
    let mut events = engine.subscribe();
    let code = match args.mode {
        Mode::ToGate => {
            let id = current_or_new(&engine, args.fail).await?;
            let stand = follow(&engine, &id, &mut events, true).await?;
            report(&engine, &id, &stand)?;
            ExitCode::SUCCESS
        }
        Mode::AutoApprove => {
            let id = current_or_new(&engine, args.fail).await?;
            // Sent before the saga reaches the gate: the signal waits in its inbox until then.
            match engine.signal(&id, APPROVE, &Approval { by: "auto-approve".into() }).await {
                Ok(()) | Err(Error::SagaFinished(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let stand = follow(&engine, &id, &mut events, false).await?;
            report(&engine, &id, &stand)?;
            ExitCode::SUCCESS
        }
        Mode::Approve { by, run } => approve(&engine, &mut events, by, run).await?,
    };
    let left = engine.shutdown(Duration::from_secs(5)).await?;
    if !left.in_flight.is_empty() {
        let ids: Vec<&str> = left.in_flight.iter().map(SagaId::as_str).collect();
        println!("\nin flight in ./{DATA_DIR}, resumed by the next run: {}", ids.join(", "));
    }
    Ok(code)
}

async fn approve(
    engine: &Engine,
    events: &mut broadcast::Receiver<EngineEvent>,
    by: String,
    run: Option<SagaId>,
) -> anyhow::Result<ExitCode> {
    let Some(id) = run.or(latest(engine)?.map(|r| r.id)) else {
        eprintln!("\nno pipeline has run yet, so nothing waits for approval; start one with");
        eprintln!("cargo run --example ci_pipeline");
        return Ok(ExitCode::from(2));
    };
    // A saga past its gate would keep an approval in its inbox unused; a finished one is
    // refused by `signal` itself.
    if let Ok(record) = engine.status(&id)
        && !record.status.is_final()
        && gate(&engine.history(&id)?) == Gate::Passed
    {
        eprintln!("\n{id} is past its approval gate already; nothing waits for approval");
        return Ok(ExitCode::from(2));
    }
    match engine.signal(&id, APPROVE, &Approval { by: by.clone() }).await {
        Ok(()) => println!("\n{id}: approved by {by}"),
        Err(Error::SagaNotFound(id)) => {
            eprintln!("\nthere is no pipeline `{id}`, so nothing to approve");
            return Ok(ExitCode::from(2));
        }
        Err(Error::SagaFinished(id)) => {
            eprintln!("\n{id} has already finished; nothing waits for approval");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    }
    let stand = follow(engine, &id, events, false).await?;
    report(engine, &id, &stand)?;
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
