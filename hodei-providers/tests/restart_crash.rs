//! A control plane SIGKILLed again and again while jobs run on child-process workers, the
//! set-up of the README's "Restarts" row: a matrix of three jobs (two at a time) and a lone job
//! in a second saga, each job writing a start and an end marker outside Hodei. After every
//! restart each step re-attaches to its own job: no job's command ever starts twice, no two
//! copies run at once, every job's log ends complete and closed with its result, holding
//! exactly what the job printed, and each saga's outcome equals that of a run without kills.
//!
//! Kills land after a random number of journal events, or aimed at the hub's fragile windows,
//! which the child turns into exact kill points (it prints a line at the hub's debug event and
//! waits for the parent's word to go on): right after a job is assigned; after the hub
//! acknowledged a result and before the step's completion is journaled; when a log sync starts
//! (batches written, not yet durable); and when it has ended, before the batches are
//! acknowledged. Every named window must have had a kill. The kill schedule is drawn from a
//! seed, random unless `HODEI_RESTART_CRASH_SEED` replays one; it is printed either way.
//!
//! Each job holds a lock of its own name while it runs, which the kernel lets go when its last
//! process dies: a copy that finds it taken marks an overlap, even beside a copy that was killed
//! before it could mark its end.
//!
//! `HODEI_SOAK=<duration>` (`30m`, `90s`, or seconds) turns it into a soak (see `soak`): rounds
//! until the time is up, which also kill agents and jobs.
#![cfg(unix)]

mod pipeline;
#[path = "../../hodei-core/tests/support/seed.rs"]
mod seed;
mod soak;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hodei_agent::protocol::v1;
use hodei_core::{Engine, EngineEventKind, Outcome, SagaId, SagaRun, SledStore};
use hodei_providers::LocalProvider;
use hodei_server::jobs::{Job, JobOutcome, MemorySecrets, saga_jobs};
use hodei_server::logstore::{LogStore, LogStream};
use hodei_server::{ControlPlane, ProviderPolicy};
use pipeline::{fast_hub, matrix, stored};
use soak::{Extra, Target};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

const CHILD_ENV: &str = "HODEI_RESTART_CRASH_CHILD";
/// Replays a kill schedule: the seed a run printed.
const SEED_ENV: &str = "HODEI_RESTART_CRASH_SEED";
const CHILD_TEST: &str = "restart_crash_child";
const EVENT: &str = "hodei-restart-crash: event";
/// A kill point in the hub: the child waits for a line on stdin after printing it.
const POINT: &str = "hodei-restart-crash: point";
/// A saga's outcome, as far as it must equal the no-crash run's.
const OUTCOME: &str = "hodei-restart-crash: outcome";
const DONE: &str = "hodei-restart-crash: done";
/// Every saga but `lint` has ended: nothing more happens until lint's gate opens.
const ONLY_LINT: &str = "hodei-restart-crash: only lint left";
/// The bytes of job output `check_logs` compared with what the jobs printed.
const VERIFIED: &str = "hodei-restart-crash: verified";
/// Kills over all rounds, at the least.
const MIN_KILLS: u32 = 50;
/// Rounds at the most, to hit every named window.
const MAX_ROUNDS: u32 = 16;
/// Kinds of journal event that random kills must have landed right after, at the least.
const MIN_EVENT_KINDS: usize = 4;
/// A round's first run, if not aimed, is killed after 0 to this many journal events...
const MAX_EVENTS_PER_RUN: u64 = 12;
/// ...and its later runs after 0 to this many: a resumed run has few events left, and a round
/// should see many restarts before only lint is left.
const MAX_EVENTS_PER_RESUMED_RUN: u64 = 3;
/// Each round kills this many runs, then lets one finish: more restarts than the job
/// dispatcher's default five attempts, which a restart must not use up.
const KILLS_PER_ROUND: u32 = 7;
/// See `run_child`.
const RUN_LIMIT: Duration = Duration::from_secs(120);
const SUITES: [&str; 3] = ["unit", "integration", "docs"];
/// What a job that runs to its end prints.
const FULL_OUTPUT: &str = "started\nfinished\n";
/// The file in a round's directory that describes it ([`Round`]).
const ROUND_FILE: &str = "round";

/// What a round starts, and what its kills other than the control plane's imply: written into
/// its directory by the parent before each run, read by the child. The suite without a soak
/// starts the matrix and lint, and kills nothing but the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Round {
    /// The sagas started, by id (`tests`, `deploy`, `lint`), lint last.
    sagas: Vec<String>,
    /// Agents killed so far: each may have lost the one job it held, which the step then ran
    /// again on a new worker.
    agent_kills: u32,
    /// Whether lint's own process group was killed: its step, and so its saga, then failed.
    lint_killed: bool,
}

impl Round {
    fn standard() -> Self {
        Round { sagas: vec!["tests".to_owned(), "lint".to_owned()], agent_kills: 0, lint_killed: false }
    }

    fn read(root: &Path) -> Self {
        let Ok(text) = std::fs::read_to_string(root.join(ROUND_FILE)) else { return Round::standard() };
        let mut round = Round { sagas: Vec::new(), agent_kills: 0, lint_killed: false };
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("sagas", ids)) => round.sagas = ids.split(' ').map(str::to_owned).collect(),
                Some(("agent-kills", n)) => round.agent_kills = n.parse().unwrap(),
                Some(("lint-killed", killed)) => round.lint_killed = killed == "true",
                _ => panic!("bad line in the round file: {line:?}"),
            }
        }
        round
    }

    fn write(&self, root: &Path) {
        let text = format!(
            "sagas {}\nagent-kills {}\nlint-killed {}\n",
            self.sagas.join(" "),
            self.agent_kills,
            self.lint_killed
        );
        std::fs::write(root.join(ROUND_FILE), text).unwrap();
    }

    /// The names of saga `id`'s jobs, as `saga_jobs` lists them (a rollback job as its step's
    /// name with ` rollback`).
    fn jobs(id: &str) -> Vec<&'static str> {
        match id {
            "tests" => SUITES.to_vec(),
            "deploy" => vec!["deploy", "smoke", "deploy rollback"],
            _ => vec!["lint"],
        }
    }

    /// The names the jobs' commands mark their start and end with.
    fn commands(&self) -> Vec<&'static str> {
        let marker = |job: &'static str| if job == "deploy rollback" { "undeploy" } else { job };
        let mut names: Vec<_> = self.sagas.iter().flat_map(|id| Round::jobs(id)).map(marker).collect();
        names.sort_unstable();
        names
    }

    /// How the run of job `name` that its step took ends, and what it printed: every job exits
    /// 0 after printing [`FULL_OUTPUT`], but the smoke test, which then exits 3, and a killed
    /// lint, which printed its first line.
    fn end_of(&self, name: &str) -> (v1::job_result::Outcome, &'static str) {
        match name {
            "smoke" => (v1::job_result::Outcome::ExitCode(3), FULL_OUTPUT),
            "lint" if self.lint_killed => (v1::job_result::Outcome::Signal(9), "started\n"),
            _ => (v1::job_result::Outcome::ExitCode(0), FULL_OUTPUT),
        }
    }

    /// Whether saga `id` ends completed; the others end as the no-kill run's do (deploy is
    /// compensated), or failed by the kill of lint's process.
    fn completes(&self, id: &str) -> bool {
        id == "tests" || (id == "lint" && !self.lint_killed)
    }
}

/// Where a kill landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Window {
    /// After a random number of journal events.
    JournalEvent,
    /// Right after the hub sent a job's `Assign`.
    Dispatch,
    /// Right after the hub sent `ResultAck` for a stored result, before the step had it (so
    /// before its completion is journaled).
    ResultAcknowledged,
    /// Log batches written, their sync about to start.
    LogSyncStarted,
    /// A log sync ended, its batches not yet acknowledged.
    LogSynced,
    /// Nothing left to do but wait for lint's gate.
    OnlyLintLeft,
}

impl Window {
    /// The windows in the hub that every run of the suite must kill in.
    const NAMED: [Window; 4] =
        [Window::Dispatch, Window::ResultAcknowledged, Window::LogSyncStarted, Window::LogSynced];
    const ALL: [Window; 6] = [
        Window::JournalEvent,
        Window::Dispatch,
        Window::ResultAcknowledged,
        Window::LogSyncStarted,
        Window::LogSynced,
        Window::OnlyLintLeft,
    ];

    fn tag(self) -> &'static str {
        match self {
            Window::JournalEvent => "journal-event",
            Window::Dispatch => "dispatch",
            Window::ResultAcknowledged => "result-acknowledged",
            Window::LogSyncStarted => "log-sync-started",
            Window::LogSynced => "log-synced",
            Window::OnlyLintLeft => "only-lint-left",
        }
    }

    /// The message of the hub's debug event at the window, for the named ones.
    fn hub_message(self) -> Option<&'static str> {
        match self {
            Window::Dispatch => Some("job assigned"),
            Window::ResultAcknowledged => Some("job result acknowledged"),
            Window::LogSyncStarted => Some("log sync started"),
            Window::LogSynced => Some("log synced"),
            Window::JournalEvent | Window::OnlyLintLeft => None,
        }
    }

    /// The window of a kill-point line's tag.
    fn of_tag(tag: &str) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.tag() == tag)
    }
}

/// Aimed kills land at one of the first this many kill points of their window in a run.
fn aim_spread(window: Window) -> u64 {
    match window {
        // Each job's output is a few batches, and most runs write some.
        Window::LogSyncStarted | Window::LogSynced => 3,
        _ => 2,
    }
}

/// In the child: the hub's debug events at the named windows become kill points. Only the
/// hub's debug callsites are enabled (the others among them are ignored); every other callsite
/// is never enabled, so the rest of the tree logs nothing and costs nothing.
#[derive(Debug)]
struct KillPoints;

impl KillPoints {
    fn wanted(metadata: &Metadata<'_>) -> bool {
        metadata.is_event()
            && *metadata.level() == Level::DEBUG
            && metadata.target().starts_with("hodei_server::hub")
    }
}

impl<S: Subscriber> Layer<S> for KillPoints {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if Self::wanted(metadata) { Interest::always() } else { Interest::never() }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        Self::wanted(metadata)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::DEBUG)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let window = Window::NAMED.into_iter().find(|w| w.hub_message() == Some(fields.message.as_str()));
        if let Some(window) = window {
            kill_point(window, &fields.rest);
        }
    }
}

/// An event's message, and its other fields as text.
#[derive(Debug, Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

/// One kill point at a time: a point's line is answered before the next one is printed, so
/// that an answer cannot let another thread's point go on in its place, and a kill lands
/// exactly at the point it was aimed at. The hub's events fire on the runtime's threads; they
/// wait here only until the parent, which reads every line as it comes, answers.
static KILL_POINT: Mutex<()> = Mutex::new(());

/// Prints a kill point of `window` and waits until the parent says go on (any line; EOF or an
/// error means the parent is gone, and the child goes on): the parent may kill it here.
fn kill_point(window: Window, what: &str) {
    let _one_at_a_time = KILL_POINT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    println!("{POINT} [{}]{what}", window.tag());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// A job that marks its start and end; `lint` waits at its gate in between, so that it is in
/// flight through every restart of a round, the others take a moment; `smoke` then exits 3.
/// Each takes a lock of its own name first, which the kernel lets go when its last process
/// dies, however it dies: a copy that finds it held marks an overlap, so that two copies at
/// once are seen even when the first was killed before it could mark its end.
fn job(root: &Path, name: &str) -> Job {
    let markers = root.join("markers");
    let (work, exit) = match name {
        "lint" => (format!("read go < '{}'", root.join("gate").display()), ""),
        "smoke" => ("sleep 0.1".to_owned(), "; exit 3"),
        _ => ("sleep 0.3".to_owned(), ""),
    };
    Job::pooled_script(
        ["/bin/sh"],
        format!(
            "exec 9>> '{lock}'; flock -n 9 || echo \"overlap {name} $$\" >> '{m}'; \
             echo \"start {name} $$\" >> '{m}'; echo started; {work}; echo \"end {name} $$\" >> '{m}'; echo finished{exit}",
            lock = root.join(format!("lock-{name}")).display(),
            m = markers.display()
        ),
    )
    .env("PATH", "/usr/bin:/bin")
}

/// The sagas of the round in `root`, by id.
fn runs(root: &Path) -> Vec<(SagaRun, String)> {
    let jobs = |names: &[&str]| -> Vec<(String, Job)> {
        names.iter().map(|name| (name.to_string(), job(root, name))).collect()
    };
    let run = |id: &str| match id {
        "tests" => SagaRun::new("matrix", id, &jobs(&SUITES)),
        "deploy" => {
            SagaRun::new("deploy", id, &(job(root, "deploy"), job(root, "undeploy"), job(root, "smoke")))
        }
        _ => SagaRun::new("pipeline", id, &jobs(&["lint"])),
    };
    Round::read(root).sagas.into_iter().map(|id| (run(&id).unwrap(), id)).collect()
}

/// The child: a control plane and engine over `root`, started (or resumed) sagas followed to
/// their end. Every journal event is reported, so that the parent kills at random points, and
/// every named window of the hub is a kill point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_crash_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(KillPoints)).unwrap();
    let root = PathBuf::from(root);
    let round = Round::read(&root);
    let store = Arc::new(SledStore::open(root.join("journal")).unwrap());
    let provider = LocalProvider::child_process(root.join("workers"), pipeline::agent_binary::agent_binary())
        .kill_on_drop(false);
    let control = ControlPlane::builder(root.join("data"))
        .hub_config(fast_hub())
        .provider(Arc::new(provider), ProviderPolicy::new().max_workers(2))
        .start()
        .await
        .unwrap();
    control.reap_orphans(store.as_ref()).await.unwrap();
    let dispatcher = control.dispatcher(Arc::new(MemorySecrets::new()));
    let engine = Engine::builder()
        .store(store.clone())
        .register(matrix(dispatcher.clone()))
        .register(soak::deploy(dispatcher.clone()))
        .register(pipeline::pipeline(dispatcher))
        .start()
        .await
        .unwrap();
    let mut events = engine.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let EngineEventKind::Journaled(recorded) = event.kind {
                let kind = format!("{:?}", recorded.event);
                println!("{EVENT} {}", kind.split([' ', '{', '(']).next().unwrap_or_default());
            }
        }
    });
    let mut handles = Vec::new();
    for (run, _) in runs(&root) {
        handles.push(engine.start(run).await.unwrap());
    }
    let mut outcomes = Vec::new();
    for (index, handle) in handles.iter().enumerate() {
        if index == handles.len() - 1 {
            println!("{ONLY_LINT}");
        }
        let outcome = handle.outcome::<Vec<JobOutcome>>().await.unwrap();
        let line = match outcome {
            Outcome::Completed(jobs) if round.completes(handle.id().as_str()) => {
                summary(control.logs(), &jobs).await
            }
            outcome if !round.completes(handle.id().as_str()) => {
                soak::without_attempts(&format!("{outcome:?}"))
            }
            outcome => {
                let journal = hodei_core::Timeline(&engine.history(handle.id()).unwrap()).to_string();
                panic!("{outcome:?}\n{journal}")
            }
        };
        outcomes.push((handle.id().clone(), line));
    }
    let verified = check_logs(&root, &round, &control, &engine).await;
    for (saga, line) in outcomes {
        println!("{OUTCOME} {saga}: {line}");
    }
    println!("{VERIFIED} {verified}");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    control.shutdown().await.unwrap();
    println!("{DONE}");
}

/// What of a saga's job outcomes must not depend on kills: each job's step (its id without the
/// attempt), exit code, byte counts and stored output; not its timings or resource figures.
async fn summary(logs: &LogStore, jobs: &[JobOutcome]) -> String {
    let mut out = String::new();
    for job in jobs {
        let step = job.job_id.rsplit_once('#').map_or(job.job_id.as_str(), |(step, _)| step);
        let stdout = stored(logs, &job.job_id, LogStream::Stdout).await;
        let stderr = stored(logs, &job.job_id, LogStream::Stderr).await;
        let _ = write!(
            out,
            "[{step} exit {} stdout {} {stdout:?} stderr {} {stderr:?}]",
            job.exit_code, job.stdout_bytes, job.stderr_bytes
        );
    }
    out
}

/// Where a run of the child is killed: after this many journal events, or at the k-th (from 1)
/// kill point of a named window; either way at "only lint left" if it comes first. `Never`:
/// the run is let finish.
#[derive(Clone, Debug)]
enum KillAt {
    Events(u64),
    /// After at least this many journal events, at the first of a kind not in the list: while
    /// random kills have landed after too few kinds of event, they are steered to new ones
    /// (left to chance, one seed in CI hit three kinds in sixteen rounds).
    NewKindAfter(u64, Vec<String>),
    Point(Window, u64),
    Never,
}

impl std::fmt::Display for KillAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KillAt::Events(n) => write!(f, "after {n} journal events"),
            KillAt::NewKindAfter(n, _) => write!(f, "after {n} journal events, at a kind not hit yet"),
            KillAt::Point(window, k) => write!(f, "at {} #{k}", window.tag()),
            KillAt::Never => write!(f, "never"),
        }
    }
}

/// How a run of the child ended.
#[derive(Debug, Default)]
struct RunEnd {
    /// Where it was killed, with what the line said (`None`: it finished).
    killed: Option<(Window, String)>,
    /// The kill points of each named window it passed, the one it was killed at included.
    points: BTreeMap<Window, u32>,
    /// The sagas' outcomes, one line each, if it finished.
    outcomes: Vec<String>,
    /// The bytes of output its check compared, if it finished.
    verified: u64,
    /// The agent or job killed while it ran ([`Extra`]): what, in which window, which process.
    struck: Option<(Target, Window, String)>,
}

/// Runs the child over `root`, killed where `kill` says unless it finishes first. Every kill
/// point it is not killed at is answered as soon as it is read; at the first one from `extra`'s
/// on (its window's k-th), before answering, an agent or a job is killed if one is there to.
fn run_child(root: &Path, kill: KillAt, extra: Option<Extra>) -> RunEnd {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut go_on = child.stdin.take();
    // A hang guard, never a means of synchronisation: a run that neither ends nor reaches its
    // kill point in this time is killed and fails the test.
    let pid = child.id();
    let (finished, hung) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        let timed_out = hung.recv_timeout(RUN_LIMIT).is_err();
        if timed_out {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        timed_out
    });
    let (mut events, mut done, mut end) = (0, false, RunEnd::default());
    // Read to the end even after the kill: a child that finished first must not die of a
    // closed pipe, and its done line decides how it ended.
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        done |= line.contains(DONE);
        if let Some((_, outcome)) = line.split_once(OUTCOME) {
            end.outcomes.push(outcome.trim().to_owned());
        }
        let point = line.split_once(POINT).map(|(_, rest)| {
            let (tag, what) = rest.trim_start().strip_prefix('[').and_then(|r| r.split_once(']')).unwrap();
            (Window::of_tag(tag).unwrap_or_else(|| panic!("unknown window in {line:?}")), what.trim())
        });
        if let Some((window, _)) = point {
            *end.points.entry(window).or_default() += 1;
        }
        if let Some(verified) = line.split_once(VERIFIED).map(|(_, n)| n.trim().parse().unwrap()) {
            end.verified = verified;
        }
        // An agent or job is killed at a kill point from the aimed one on, or at the latest when
        // only lint is left (then lint is running, and it is the last chance before the kill).
        let only_lint = line.contains(ONLY_LINT).then_some(Window::OnlyLintLeft);
        if let (Some(extra), Some(window)) = (&extra, point.map(|(window, _)| window).or(only_lint))
            && end.struck.is_none()
            && end.killed.is_none()
            && (only_lint.is_some() || end.points.get(&extra.window).copied().unwrap_or(0) >= extra.k)
            && let Some(what) = soak::strike(root, extra)
        {
            end.struck = Some((extra.target, window, what));
        }
        let kill_here = match (&kill, &point) {
            (KillAt::Never, _) => None,
            // A run to be killed that has nothing left to do but wait for lint is killed there.
            _ if line.contains(ONLY_LINT) => Some((Window::OnlyLintLeft, String::new())),
            (KillAt::Events(after), None) => line.split_once(EVENT).and_then(|(_, event)| {
                events += 1;
                (events > *after).then(|| (Window::JournalEvent, event.trim().to_owned()))
            }),
            (KillAt::NewKindAfter(after, hit), None) => line.split_once(EVENT).and_then(|(_, event)| {
                events += 1;
                let kind = event.trim();
                (events > *after && !hit.iter().any(|h| h == kind))
                    .then(|| (Window::JournalEvent, kind.to_owned()))
            }),
            (KillAt::Point(aim, k), Some((window, what))) => {
                (window == aim && end.points[window] == *k as u32).then(|| (*aim, (*what).to_owned()))
            }
            _ => None,
        };
        match kill_here {
            Some(killed) if end.killed.is_none() && !done => {
                child.kill().unwrap();
                end.killed = Some(killed);
                go_on = None;
            }
            _ => {
                if point.is_some()
                    && let Some(stdin) = go_on.as_mut()
                {
                    // A child that has finished or died no longer reads; not an error here.
                    let _ = stdin.write_all(b"\n").and_then(|()| stdin.flush());
                }
            }
        }
    }
    let status = child.wait().unwrap();
    if end.killed.is_some() {
        journal_let_go(root);
    }
    let _ = finished.send(());
    assert!(!guard.join().unwrap(), "a run hung: neither ended nor reached its kill point in {RUN_LIMIT:?}");
    if end.killed.is_none() {
        assert!(status.success() && done, "the child exited with {status}");
    }
    end
}

/// What the jobs' commands did in a round, from their markers.
#[derive(Debug, Default)]
struct Commands {
    /// Commands started.
    started: u32,
    /// Commands started again after a first copy: each after an agent kill lost its job.
    reruns: u32,
}

/// Waits until nothing holds the journal's lock any more. A killed child's lock goes with the
/// last process that has its lock file open: an agent it was starting, between fork and exec,
/// holds it a moment longer (seen once in a soak, on a loaded machine: the next run found the
/// journal `Locked`). Taking the lock blocks until then; it is let go at once.
fn journal_let_go(root: &Path) {
    if let Ok(lock) = std::fs::File::open(root.join("journal").join("LOCK")) {
        lock.lock().unwrap();
        lock.unlock().unwrap();
    }
}

/// Each job's command never ran twice at once, and started and ended exactly once; or, after
/// agent kills, at most once more per kill in all, a copy that an agent's death cut off never
/// marking its end; a killed lint never ended.
fn check_markers(root: &Path, round: &Round) -> Commands {
    let text = std::fs::read_to_string(root.join("markers")).unwrap_or_default();
    let mut running: BTreeMap<String, String> = BTreeMap::new();
    let mut started: BTreeMap<String, u32> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        let (what, name, pid) = (words.next().unwrap(), words.next().unwrap(), words.next().unwrap());
        match what {
            "overlap" => panic!("two copies of `{name}` at once (the lock was held):\n{text}"),
            "start" => {
                let cut = running.insert(name.to_owned(), pid.to_owned());
                assert!(cut.is_none() || round.agent_kills > 0, "two copies of `{name}` at once:\n{text}");
                *started.entry(name.to_owned()).or_default() += 1;
            }
            _ => assert_eq!(running.remove(name).as_deref(), Some(pid), "`{name}` ended unstarted:\n{text}"),
        }
    }
    if round.lint_killed {
        assert!(running.remove("lint").is_some(), "the killed lint ended:\n{text}");
    }
    assert!(running.is_empty(), "jobs never ended: {running:?}");
    let names: Vec<&str> = started.keys().map(String::as_str).collect();
    assert_eq!(names, round.commands(), "the commands started:\n{text}");
    let commands =
        Commands { started: started.values().sum(), reruns: started.values().map(|n| n - 1).sum() };
    assert!(
        commands.reruns <= round.agent_kills,
        "{} commands ran again after {} agent kills:\n{text}",
        commands.reruns,
        round.agent_kills
    );
    commands
}

/// Every step's job (and the rollback job of a compensated step) has a complete, closed log
/// and the result [`Round::end_of`] says, under one job id: its stdout exactly what the job
/// printed, no byte lost or doubled, and no stderr. An earlier attempt of it, if one has a log,
/// reads `Lost` and holds no output (the command ran once, under the job id that ran); after
/// agent kills, at most one such attempt per kill holds the start of the output, which its
/// agent sent before it died. Returns the bytes of output compared.
async fn check_logs(root: &Path, round: &Round, control: &ControlPlane, engine: &Engine) -> u64 {
    let (mut verified, mut cut_off) = (0, 0);
    for (_, id) in runs(root) {
        let saga = SagaId::new(&id).unwrap();
        let history = engine.history(&saga).unwrap();
        let mut by_job: BTreeMap<(u32, String), Vec<_>> = BTreeMap::new();
        for job in saga_jobs(control.hub(), &saga, &history).await.unwrap() {
            by_job.entry((job.step, job.name.clone())).or_default().push(job);
        }
        let mut names: Vec<&str> = by_job.keys().map(|(_, name)| name.as_str()).collect();
        names.sort_unstable();
        let mut expected = Round::jobs(&id);
        expected.sort_unstable();
        assert_eq!(names, expected, "{id}: {by_job:#?}");
        for ((step, name), jobs) in &by_job {
            let outcome =
                |job: &hodei_server::jobs::SagaJob| job.result.as_ref().and_then(|r| r.outcome.clone());
            let (lost, ran): (Vec<_>, Vec<_>) =
                jobs.iter().partition(|job| matches!(outcome(job), Some(v1::job_result::Outcome::Lost(_))));
            assert_eq!(ran.len(), 1, "{id} step {step} {name}: one job ran: {jobs:#?}");
            let (end, printed) = round.end_of(name);
            assert_eq!(outcome(ran[0]), Some(end), "{jobs:#?}");
            let logs = control.logs();
            let stdout = stored(logs, &ran[0].job_id, LogStream::Stdout).await;
            assert_eq!(stdout, printed, "{}", ran[0].job_id);
            let stderr = stored(logs, &ran[0].job_id, LogStream::Stderr).await;
            assert_eq!(stderr, "", "{}", ran[0].job_id);
            verified += stdout.len() as u64;
            for job in lost {
                for stream in LogStream::ALL {
                    let output = stored(logs, &job.job_id, stream).await;
                    let cut = stream == LogStream::Stdout && round.agent_kills > 0 && !output.is_empty();
                    assert!(
                        output.is_empty() || (cut && FULL_OUTPUT.starts_with(&output)),
                        "{id} step {step}: lost attempt {} has {stream:?} {output:?}",
                        job.job_id
                    );
                    cut_off += u32::from(cut);
                    verified += output.len() as u64;
                }
            }
        }
    }
    assert!(
        cut_off <= round.agent_kills,
        "{cut_off} lost attempts hold output after {} agent kills",
        round.agent_kills
    );
    verified
}

/// A fresh directory for a round, with lint's gate.
fn round_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    assert!(Command::new("mkfifo").arg(dir.path().join("gate")).status().unwrap().success());
    dir
}

/// Processes whose command line names a path under `root`: the agents of a round's workers.
/// After a round's last run has finished, none may be left, whatever the kills before it did.
fn processes_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&root) {
            left.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    left
}

/// Opens lint's gate in `root`, wherever its job waits (the write blocks until it reads).
fn open_gate(root: &Path) {
    let gate = root.join("gate");
    std::thread::spawn(move || std::fs::write(gate, "go\n").unwrap());
}

fn counts(kills: &BTreeMap<Window, u32>) -> String {
    Window::ALL
        .iter()
        .map(|w| format!("{} {}", w.tag(), kills.get(w).unwrap_or(&0)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the runs of rounds are killed, and where the kills landed.
#[derive(Debug)]
struct Kills {
    rng: seed::XorShift,
    /// Runs aimed at a named window so far: the next aims at the next window in turn.
    aims: usize,
    by_window: BTreeMap<Window, u32>,
    /// Kinds of journal event random kills landed right after.
    after_events: BTreeMap<String, u32>,
}

impl Kills {
    fn new(seed: u64) -> Self {
        Kills {
            rng: seed::XorShift(seed | 1),
            aims: 0,
            by_window: BTreeMap::new(),
            after_events: BTreeMap::new(),
        }
    }

    /// Where run `run` of round `round` is killed, when the round kills `killed_runs` runs.
    ///
    /// Every other run aims at a named window, the aims going through them in turn: each is a
    /// few points in a round, where random kills would rarely land. The others are killed after
    /// a random number of journal events. Most points and events come before the matrix has
    /// ended, in a round's first runs; so every other round starts with an aimed run, which then
    /// cannot miss (the first four such runs aim at each window once), and the others with a
    /// random one. A round sees many restarts either way: a run to be killed is killed at the
    /// latest when only lint is left.
    fn choose(&mut self, run: u32, round: u32, killed_runs: u32) -> KillAt {
        match run {
            n if n >= killed_runs => KillAt::Never,
            n if n % 2 == round % 2 => {
                let window = Window::NAMED[self.aims % Window::NAMED.len()];
                self.aims += 1;
                KillAt::Point(window, 1 + self.rng.below(aim_spread(window)))
            }
            n => {
                let max = if n == 0 { MAX_EVENTS_PER_RUN } else { MAX_EVENTS_PER_RESUMED_RUN };
                let after = self.rng.below(max + 1);
                match self.after_events.len() < MIN_EVENT_KINDS {
                    true => KillAt::NewKindAfter(after, self.after_events.keys().cloned().collect()),
                    false => KillAt::Events(after),
                }
            }
        }
    }

    fn landed(&mut self, window: Window, what: &str) {
        *self.by_window.entry(window).or_default() += 1;
        if window == Window::JournalEvent {
            *self.after_events.entry(what.to_owned()).or_default() += 1;
        }
    }

    fn total(&self) -> u32 {
        self.by_window.values().sum()
    }

    /// Every named window has had a kill, and random kills landed after enough kinds of event.
    fn hit_all(&self) -> bool {
        Window::NAMED.iter().all(|w| self.by_window.contains_key(w))
            && self.after_events.len() >= MIN_EVENT_KINDS
    }
}

/// How a round ended: its last run, and the agents and jobs killed on the way.
#[derive(Debug)]
struct RoundEnd {
    last: RunEnd,
    struck: Vec<(Target, Window, String)>,
}

/// Runs the child over `root` until a run finishes, killing the first `killed_runs` runs where
/// `kills` chooses, and in run `n` the agent or job `extras[n]` says (the round file follows
/// what those kills did), then checks the jobs' markers and that no process is left.
async fn play_round(
    root: &Path,
    number: u32,
    round: &mut Round,
    killed_runs: u32,
    extras: &BTreeMap<u32, Extra>,
    kills: &mut Kills,
) -> (RoundEnd, Commands) {
    let mut struck = Vec::new();
    for run in 0.. {
        let kill = kills.choose(run, number, killed_runs);
        let extra = extras.get(&run).copied().filter(|_| !matches!(kill, KillAt::Never));
        round.write(root);
        if let KillAt::Never = kill
            && !round.lint_killed
        {
            open_gate(root);
        }
        let (root_for_child, kill_for_child) = (root.to_path_buf(), kill.clone());
        let run_started = Instant::now();
        let end = tokio::task::spawn_blocking(move || run_child(&root_for_child, kill_for_child, extra))
            .await
            .unwrap();
        if let Some((target, window, what)) = &end.struck {
            match target {
                Target::Agent => round.agent_kills += 1,
                _ => round.lint_killed = true,
            }
            println!("round {number} run {run}: killed {} at {} ({what})", target.tag(), window.tag());
            struck.push(end.struck.clone().unwrap());
        }
        let Some((window, what)) = &end.killed else {
            println!("round {number} run {run} ({:.0?}): finished", run_started.elapsed());
            let commands = check_markers(root, round);
            let left = processes_under(root);
            assert!(left.is_empty(), "round {number} left processes behind: {left:?}");
            return (RoundEnd { last: end, struck }, commands);
        };
        kills.landed(*window, what);
        println!(
            "round {number} run {run} ({:.0?}): {kill}, killed at {} {what} (points passed {:?}); kills: {}",
            run_started.elapsed(),
            window.tag(),
            end.points,
            counts(&kills.by_window)
        );
    }
    unreachable!("the runs go on until one finishes")
}

/// A run of `round`'s sagas without kills, alongside the rounds (its jobs mostly wait; it has
/// a directory, workers and ports of its own): the outcome every round must end with.
fn reference(round: Round) -> tokio::task::JoinHandle<RunEnd> {
    tokio::task::spawn_blocking(move || {
        let dir = round_dir();
        round.write(dir.path());
        open_gate(dir.path());
        let end = run_child(dir.path(), KillAt::Never, None);
        check_markers(dir.path(), &round);
        end
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_while_jobs_run_never_starts_a_job_twice() {
    let started = Instant::now();
    let seed = seed::seed(SEED_ENV);
    if let Some(limit) = soak::limit() {
        return soak::soak(seed, limit).await;
    }
    let mut kills = Kills::new(seed);
    let reference = reference(Round::standard());
    let mut outcomes = Vec::new();
    let mut rounds = 0;
    // More rounds while a named window has had no kill, or journal kills have landed after too
    // few kinds of event, up to a bound; the assertions at the end fail the suite if that
    // bound was reached first.
    while (kills.total() < MIN_KILLS || !kills.hit_all()) && rounds < MAX_ROUNDS {
        let dir = round_dir();
        let mut round = Round::standard();
        let (end, _) =
            play_round(dir.path(), rounds, &mut round, KILLS_PER_ROUND, &BTreeMap::new(), &mut kills).await;
        outcomes.push((rounds, end.last.outcomes));
        rounds += 1;
    }
    let reference = reference.await.unwrap();
    println!("reference run: kill points passed {:?}", reference.points);
    assert_eq!(reference.outcomes.len(), 2, "{reference:?}");
    for (round, outcome) in outcomes {
        assert_eq!(outcome, reference.outcomes, "round {round}: the outcome differs from the no-crash run");
    }
    let after_events = &kills.after_events;
    println!(
        "seed {seed}: {} kills over {rounds} rounds in {:.1?}; by window: {}; journal kills after: {after_events:?}",
        kills.total(),
        started.elapsed(),
        counts(&kills.by_window)
    );
    assert!(
        after_events.len() >= MIN_EVENT_KINDS,
        "journal kills landed after only {after_events:?} in {rounds} rounds (seed {seed})"
    );
    let missed: Vec<&str> =
        Window::NAMED.iter().filter(|w| !kills.by_window.contains_key(w)).map(|w| w.tag()).collect();
    assert!(missed.is_empty(), "no kill landed in {missed:?} in {rounds} rounds (seed {seed})");
}
