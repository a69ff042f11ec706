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
#![cfg(unix)]

mod pipeline;
#[path = "../../hodei-core/tests/support/seed.rs"]
mod seed;

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
/// flight through every restart of a round, the others take a moment.
fn job(root: &Path, name: &str) -> Job {
    let markers = root.join("markers");
    let work = match name {
        "lint" => format!("read go < '{}'", root.join("gate").display()),
        _ => "sleep 0.3".to_owned(),
    };
    Job::pooled_script(
        ["/bin/sh"],
        format!(
            "echo \"start {name} $$\" >> '{m}'; echo started; {work}; echo \"end {name} $$\" >> '{m}'; echo finished",
            m = markers.display()
        ),
    )
    .env("PATH", "/usr/bin:/bin")
}

fn runs(root: &Path) -> [(SagaRun, &'static str); 2] {
    let suites: Vec<(String, Job)> = SUITES.iter().map(|name| (name.to_string(), job(root, name))).collect();
    let lint = vec![("lint".to_string(), job(root, "lint"))];
    [
        (SagaRun::new("matrix", "tests", &suites).unwrap(), "tests"),
        (SagaRun::new("pipeline", "lint", &lint).unwrap(), "lint"),
    ]
}

/// The child: a control plane and engine over `root`, started (or resumed) sagas followed to
/// their end. Every journal event is reported, so that the parent kills at random points, and
/// every named window of the hub is a kill point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_crash_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(KillPoints)).unwrap();
    let root = PathBuf::from(root);
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
        let journal = hodei_core::Timeline(&engine.history(handle.id()).unwrap()).to_string();
        let Outcome::Completed(jobs) = outcome else { panic!("{outcome:?}\n{journal}") };
        outcomes.push((handle.id().clone(), jobs));
    }
    check_logs(&root, &control, &engine).await;
    for (saga, jobs) in outcomes {
        println!("{OUTCOME} {saga}: {}", summary(control.logs(), &jobs).await);
    }
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
}

/// Runs the child over `root`, killed where `kill` says unless it finishes first. Every kill
/// point it is not killed at is answered as soon as it is read.
fn run_child(root: &Path, kill: KillAt) -> RunEnd {
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
    let _ = finished.send(());
    assert!(!guard.join().unwrap(), "a run hung: neither ended nor reached its kill point in {RUN_LIMIT:?}");
    if end.killed.is_none() {
        assert!(status.success() && done, "the child exited with {status}");
    }
    end
}

/// Each job's command started and ended exactly once, and never ran twice at once.
fn check_markers(root: &Path) {
    let text = std::fs::read_to_string(root.join("markers")).unwrap_or_default();
    let mut running: BTreeMap<String, String> = BTreeMap::new();
    let mut started: BTreeMap<String, u32> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        let (what, name, pid) = (words.next().unwrap(), words.next().unwrap(), words.next().unwrap());
        match what {
            "start" => {
                assert!(!running.contains_key(name), "two copies of `{name}` at once:\n{text}");
                running.insert(name.to_owned(), pid.to_owned());
                *started.entry(name.to_owned()).or_default() += 1;
            }
            _ => assert_eq!(running.remove(name).as_deref(), Some(pid), "`{name}` ended unstarted:\n{text}"),
        }
    }
    assert!(running.is_empty(), "jobs never ended: {running:?}");
    for name in SUITES.iter().chain(["lint"].iter()) {
        assert_eq!(started.get(*name), Some(&1), "`{name}` started once:\n{text}");
    }
}

/// Every step's job has a complete, closed log and an exit code 0 result, under one job id:
/// its stdout exactly what the job printed, no byte lost or doubled, and no stderr. An earlier
/// attempt of it, if one has a log, reads `Lost` and holds no output (the command ran once,
/// under the job id that ran).
async fn check_logs(root: &Path, control: &ControlPlane, engine: &Engine) {
    for (_, id) in runs(root) {
        let saga = SagaId::new(id).unwrap();
        let history = engine.history(&saga).unwrap();
        let mut by_step: BTreeMap<u32, Vec<_>> = BTreeMap::new();
        for job in saga_jobs(control.hub(), &saga, &history).await.unwrap() {
            by_step.entry(job.step).or_default().push(job);
        }
        let expected = if id == "tests" { SUITES.len() } else { 1 };
        assert_eq!(by_step.len(), expected, "{id}: {by_step:#?}");
        for (step, jobs) in by_step {
            let outcome =
                |job: &hodei_server::jobs::SagaJob| job.result.as_ref().and_then(|r| r.outcome.clone());
            let (lost, ran): (Vec<_>, Vec<_>) =
                jobs.iter().partition(|job| matches!(outcome(job), Some(v1::job_result::Outcome::Lost(_))));
            assert_eq!(ran.len(), 1, "{id} step {step}: one job ran: {jobs:#?}");
            assert_eq!(outcome(ran[0]), Some(v1::job_result::Outcome::ExitCode(0)), "{jobs:#?}");
            let logs = control.logs();
            let stdout = stored(logs, &ran[0].job_id, LogStream::Stdout).await;
            assert_eq!(stdout, "started\nfinished\n", "{}", ran[0].job_id);
            let stderr = stored(logs, &ran[0].job_id, LogStream::Stderr).await;
            assert_eq!(stderr, "", "{}", ran[0].job_id);
            for job in lost {
                for stream in LogStream::ALL {
                    let output = stored(logs, &job.job_id, stream).await;
                    assert_eq!(output, "", "{id} step {step}: lost attempt {} has {stream:?}", job.job_id);
                }
            }
        }
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_while_jobs_run_never_starts_a_job_twice() {
    let started = Instant::now();
    let seed = seed::seed(SEED_ENV);
    let mut rng = seed::XorShift(seed | 1);
    // The outcome every round must end with: a run without kills, alongside the rounds (its
    // jobs mostly wait; it has a directory, workers and ports of its own).
    let reference = tokio::task::spawn_blocking(|| {
        let dir = round_dir();
        open_gate(dir.path());
        let end = run_child(dir.path(), KillAt::Never);
        check_markers(dir.path());
        end
    });
    let mut outcomes = Vec::new();
    let (mut rounds, mut aims) = (0, 0);
    let mut kills: BTreeMap<Window, u32> = BTreeMap::new();
    let mut after_events: BTreeMap<String, u32> = BTreeMap::new();
    let hit_all = |kills: &BTreeMap<Window, u32>, after_events: &BTreeMap<String, u32>| {
        Window::NAMED.iter().all(|w| kills.contains_key(w)) && after_events.len() >= MIN_EVENT_KINDS
    };
    // More rounds while a named window has had no kill, or journal kills have landed after too
    // few kinds of event, up to a bound; the assertions at the end fail the suite if that
    // bound was reached first.
    while (kills.values().sum::<u32>() < MIN_KILLS || !hit_all(&kills, &after_events)) && rounds < MAX_ROUNDS
    {
        let dir = round_dir();
        let root = dir.path().to_path_buf();
        for run in 0.. {
            // Every other run aims at a named window, the aims going through them in turn: each
            // is a few points in a round, where random kills would rarely land. The others are
            // killed after a random number of journal events. Most points and events come
            // before the matrix has ended, in a round's first runs; so every other round starts
            // with an aimed run, which then cannot miss (the first four such runs aim at each
            // window once), and the others with a random one. A round sees many restarts
            // either way: a run to be killed is killed at the latest when only lint is left.
            let kill = match run {
                n if n >= KILLS_PER_ROUND => KillAt::Never,
                n if n % 2 == rounds % 2 => {
                    let window = Window::NAMED[aims % Window::NAMED.len()];
                    aims += 1;
                    KillAt::Point(window, 1 + rng.below(aim_spread(window)))
                }
                n => {
                    let max = if n == 0 { MAX_EVENTS_PER_RUN } else { MAX_EVENTS_PER_RESUMED_RUN };
                    let after = rng.below(max + 1);
                    match after_events.len() < MIN_EVENT_KINDS {
                        true => KillAt::NewKindAfter(after, after_events.keys().cloned().collect()),
                        false => KillAt::Events(after),
                    }
                }
            };
            if let KillAt::Never = kill {
                open_gate(&root);
            }
            let root_for_child = root.clone();
            let run_started = Instant::now();
            let kill_for_child = kill.clone();
            let end = tokio::task::spawn_blocking(move || run_child(&root_for_child, kill_for_child))
                .await
                .unwrap();
            let Some((window, what)) = end.killed else {
                outcomes.push((rounds, end.outcomes));
                println!("round {rounds} run {run} ({:.0?}): finished", run_started.elapsed());
                break;
            };
            *kills.entry(window).or_default() += 1;
            if window == Window::JournalEvent {
                *after_events.entry(what.clone()).or_default() += 1;
            }
            println!(
                "round {rounds} run {run} ({:.0?}): {kill}, killed at {} {what} (points passed {:?}); kills: {}",
                run_started.elapsed(),
                window.tag(),
                end.points,
                counts(&kills)
            );
        }
        check_markers(&root);
        let left = processes_under(&root);
        assert!(left.is_empty(), "round {rounds} (seed {seed}) left processes behind: {left:?}");
        rounds += 1;
    }
    let reference = reference.await.unwrap();
    println!("reference run: kill points passed {:?}", reference.points);
    assert_eq!(reference.outcomes.len(), 2, "{reference:?}");
    for (round, outcome) in outcomes {
        assert_eq!(outcome, reference.outcomes, "round {round}: the outcome differs from the no-crash run");
    }
    let total: u32 = kills.values().sum();
    println!(
        "seed {seed}: {total} kills over {rounds} rounds in {:.1?}; by window: {}; journal kills after: {after_events:?}",
        started.elapsed(),
        counts(&kills)
    );
    assert!(
        after_events.len() >= MIN_EVENT_KINDS,
        "journal kills landed after only {after_events:?} in {rounds} rounds (seed {seed})"
    );
    let missed: Vec<&str> =
        Window::NAMED.iter().filter(|w| !kills.contains_key(w)).map(|w| w.tag()).collect();
    assert!(missed.is_empty(), "no kill landed in {missed:?} in {rounds} rounds (seed {seed})");
}
