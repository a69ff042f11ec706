//! The `hodei` binary against a real operator API: an engine on a sled directory with
//! hodei-server's `ApiServer` in front of it on loopback, and the built CLI run as a process,
//! as an operator would run it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{Engine, JournalFile, SagaDefinition, SagaId, SagaRun};
use hodei_server::api::ApiServer;
use hodei_server::logstore::{LogStore, LogStream};
use serde_json::Value;
use tempfile::TempDir;

#[path = "../../hodei-server/tests/support/browser.rs"]
mod browser;
#[path = "../../hodei-server/tests/support/sagas.rs"]
mod sagas;
use sagas::{
    final_event, flaky, gated, journaled, parked, patient, release, rollout, signal_wait, sled_engine,
    step_named,
};

/// Not a bound the CLI is held to: it turns a hang into a failure.
const HANG_GUARD: Duration = Duration::from_secs(60);

struct Api {
    dir: TempDir,
    engine: Engine,
    server: ApiServer,
    logs: Arc<LogStore>,
}

impl Api {
    async fn start() -> Self {
        Self::open(tempfile::tempdir().unwrap()).await
    }

    async fn open(dir: TempDir) -> Self {
        Self::open_with(dir, Self::sagas()).await
    }

    /// What the tests' server runs unless told otherwise.
    fn sagas() -> [SagaDefinition; 3] {
        [gated(), flaky(), patient()]
    }

    /// An engine with `definitions` on the journal in `dir`, and the server in front of it.
    async fn open_with(dir: TempDir, definitions: impl IntoIterator<Item = SagaDefinition>) -> Self {
        let engine = sled_engine(dir.path(), definitions).await;
        let logs = Arc::new(LogStore::open(dir.path()).await.unwrap());
        let server = ApiServer::builder(engine.clone(), dir.path())
            .logs(logs.clone())
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .serve()
            .await
            .unwrap();
        Self { dir, engine, server, logs }
    }

    /// Stops the server and the engine, and starts both again on the same directory.
    async fn restart(self) -> Self {
        self.reopen(Duration::from_secs(5), Self::sagas()).await
    }

    /// A deploy: the server and the engine stop, cutting short whatever steps run, and start
    /// again on the same directory with `definitions`, the code of the next build.
    async fn deploy(self, definitions: impl IntoIterator<Item = SagaDefinition>) -> Self {
        self.reopen(Duration::ZERO, definitions).await
    }

    /// Stops the server, then the engine with `grace` for the steps that run, and starts both
    /// again on the same directory with `definitions`.
    async fn reopen(self, grace: Duration, definitions: impl IntoIterator<Item = SagaDefinition>) -> Self {
        let Self { dir, engine, server, logs } = self;
        server.shutdown().await;
        engine.shutdown(grace).await.unwrap();
        drop((engine, logs));
        Self::open_with(dir, definitions).await
    }

    fn admin_token_file(&self) -> PathBuf {
        self.dir.path().join("api/admin-token")
    }

    /// The CLI with this server's address and the admin token file, and nothing from the
    /// environment of whoever runs the tests (no HODEI_*, no config file).
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hodei"));
        command
            .env_clear()
            .env("HOME", self.dir.path())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("--addr")
            .arg(self.server.local_addr().to_string())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !args.contains(&"--token") {
            command.arg("--token-file").arg(self.admin_token_file());
        }
        command
    }

    /// Runs the CLI to its end, off the runtime's threads (the server runs on them).
    async fn run(&self, args: &[&str]) -> Run {
        Run::from(self.output(self.command(args)).await)
    }

    /// Runs the CLI to its end in the directory `cwd`.
    async fn run_in(&self, cwd: &Path, args: &[&str]) -> Run {
        let mut command = self.command(args);
        command.current_dir(cwd);
        Run::from(self.output(command).await)
    }

    /// What `command` printed and how it exited, run off the runtime's threads.
    async fn output(&self, mut command: Command) -> Output {
        within(tokio::task::spawn_blocking(move || command.output().unwrap())).await.unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().unwrap()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let run = self.run(&all).await;
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", run.stdout))
    }

    /// `runs get` once the run's journal holds an event `reached` accepts (woken by the
    /// engine's events, not by polling).
    async fn until(&self, id: &str, reached: impl Fn(&hodei_core::Event) -> bool) -> Value {
        within(journaled(&self.engine, id, reached)).await;
        self.json(&["runs", "get", id]).await
    }
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Run {
            code: output.status.code().expect("the CLI exited, not killed by a signal"),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }
}

async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(HANG_GUARD, future).await.expect("hung")
}

async fn finish(child: Child) -> Run {
    within(tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())).await.unwrap().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_run_started_followed_and_approved_from_the_cli() {
    let api = Api::start().await;
    let started =
        api.json(&["runs", "start", "gated", "--id", "deploy-1", "--input", r#"{"service":"api"}"#]).await;
    assert_eq!((started["id"].as_str(), started["definition"].as_str()), (Some("deploy-1"), Some("gated")));

    // A follower from the start, which must end by itself when the run does.
    let follower = api.spawn(&["-o", "json", "runs", "events", "deploy-1", "-f"]);

    let run = api.until("deploy-1", signal_wait).await;
    assert_eq!(run["status"], "running");
    let list = api.run(&["runs", "list", "--status", "running"]).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    let rows: Vec<&str> = list.stdout.lines().collect();
    assert!(rows[0].starts_with("ID") && rows[0].contains("STATUS"), "{}", list.stdout);
    assert_eq!(rows.len(), 2, "{}", list.stdout);
    assert!(rows[1].starts_with("deploy-1  gated") && rows[1].contains("running"), "{}", list.stdout);
    let get = api.run(&["runs", "get", "deploy-1"]).await;
    assert_eq!(get.code, 0, "{}", get.stderr);
    assert!(get.stdout.contains("Waiting for\n  signal `approval`"), "{}", get.stdout);
    assert!(get.stdout.lines().any(|l| l.starts_with("0     stage  completed")), "{}", get.stdout);

    // An operator token, issued from the CLI: its secret alone on stdout.
    let issued = api.run(&["tokens", "issue", "alice", "--role", "operator"]).await;
    assert_eq!(issued.code, 0, "{}", issued.stderr);
    let alice = issued.stdout.trim();
    assert!(alice.starts_with("hodei_"), "{}", issued.stdout);
    let approve = api
        .run(&["--token", alice, "runs", "approve", "deploy-1", "--payload", r#"{"comment":"ship it"}"#])
        .await;
    assert_eq!((approve.code, approve.stdout.as_str()), (0, "approved run `deploy-1` (signal `approval`)\n"));

    let followed = finish(follower).await;
    assert_eq!(followed.code, 0, "{}", followed.stderr);
    let events: Vec<Value> = followed.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>(), "every event once, in order");
    assert_eq!(events.first().unwrap()["type"], "saga_started");
    assert_eq!(events.last().unwrap()["type"], "saga_completed");

    let run = api.json(&["runs", "get", "deploy-1"]).await;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["output"], "api on staging, released in default (ship it)");
    assert_eq!(run["signals"][0]["by"], "alice", "{run}");
    let timeline = api.run(&["runs", "events", "deploy-1"]).await;
    assert!(
        timeline.stdout.lines().any(|l| l.contains("`approval` by alice payload {\"comment\":\"ship it\"}")),
        "{}",
        timeline.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_wait_exits_with_the_runs_outcome_and_fork_and_cancel_are_journaled() {
    let api = Api::start().await;
    let waiting = api.spawn(&[
        "runs",
        "start",
        "gated",
        "--id",
        "deploy-2",
        "--input",
        r#"{"service":"web"}"#,
        "--wait",
    ]);
    api.until("deploy-2", signal_wait).await;
    let approve = api.run(&["runs", "approve", "deploy-2", "--payload", r#"{"comment":"ok"}"#]).await;
    assert_eq!(approve.code, 0, "{}", approve.stderr);
    let waited = finish(waiting).await;
    assert_eq!(waited.code, 0, "{}{}", waited.stdout, waited.stderr);
    let lines: Vec<&str> = waited.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"run `deploy-2` of gated v1: running"));
    assert!(
        lines.iter().any(|l| l.contains("step_completed") && l.contains("step 0 stage")),
        "{}",
        waited.stdout
    );
    assert!(lines.iter().any(|l| l.contains("step_started") && l.contains("release")), "{}", waited.stdout);
    assert_eq!(
        lines.last(),
        Some(&"run `deploy-2` completed: output \"web on staging, released in default (ok)\"")
    );

    let failed = api.run(&["runs", "start", "flaky", "--id", "flaky-1", "--input", "true", "--wait"]).await;
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    assert!(failed.stdout.lines().last().unwrap().starts_with("run `flaky-1` failed"), "{}", failed.stdout);

    let fork = api.json(&["runs", "fork", "flaky-1", "--id", "flaky-2"]).await;
    assert_eq!(fork["id"], "flaky-2");
    let source = api.json(&["runs", "get", "flaky-1"]).await;
    assert_eq!(source["forks"][0]["run"], "flaky-2", "{source}");
    let forked = api.json(&["runs", "get", "flaky-2"]).await;
    assert_eq!(forked["forked_from"]["run"], "flaky-1", "{forked}");

    api.run(&["runs", "start", "gated", "--id", "deploy-3", "--input", r#"{"service":"db"}"#]).await;
    api.until("deploy-3", signal_wait).await;
    let cancel = api.run(&["runs", "cancel", "deploy-3", "--reason", "not today"]).await;
    assert_eq!(cancel.code, 0, "{}", cancel.stderr);
    let run = api.until("deploy-3", final_event).await;
    assert_eq!(run["status"], "compensated");
    let request = &run["requests"][0];
    assert_eq!(
        (request["action"].as_str(), request["by"].as_str()),
        (Some("cancel"), Some("admin")),
        "{run}"
    );
    assert_eq!(request["reason"], "not today");
    // A signal to a run that ended is refused by the API: exit 5, one line.
    let late = api.run(&["runs", "approve", "deploy-3"]).await;
    assert_eq!(late.code, 5, "{late:?}");
    assert!(
        late.stderr.starts_with("error: ") && late.stderr.ends_with("(invalid_state)\n"),
        "{}",
        late.stderr
    );
}

/// Runs parked by a deploy that renamed their last step: one forked onto version 2 from its last
/// good step, one cancelled, and a fork onto a version nobody registers refused in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_runs_are_forked_onto_a_new_version_or_cancelled_from_the_cli() {
    let first = Api::open_with(tempfile::tempdir().unwrap(), [rollout(1, "release", true)]).await;
    for id in ["r1", "r2"] {
        first.engine.start(SagaRun::new("rollout", id, &"api").unwrap()).await.unwrap();
        within(journaled(&first.engine, id, step_named("release"))).await;
    }
    let api = first.deploy([rollout(1, "publish", false), rollout(2, "publish", false)]).await;
    within(parked(&api.engine, "r1")).await;
    within(parked(&api.engine, "r2")).await;

    let fork = api.json(&["runs", "fork", "r1", "--id", "r1-moved", "--version", "2"]).await;
    assert_eq!((fork["id"].as_str(), fork["version"].as_u64()), (Some("r1-moved"), Some(2)), "{fork}");
    let moved = api.until("r1-moved", final_event).await;
    assert_eq!(moved["status"], "completed", "{moved}");
    assert_eq!(moved["forked_from"], serde_json::json!({"run": "r1", "step": 1}), "{moved}");
    assert_eq!(api.json(&["runs", "get", "r1"]).await["status"], "failed");

    let refused = api.run(&["runs", "fork", "r2", "--id", "r2-moved", "--version", "9"]).await;
    assert_eq!(refused.code, 3, "{refused:?}");
    assert!(
        refused.stderr.ends_with("(not_found)\n") && refused.stderr.lines().count() == 1,
        "{}",
        refused.stderr
    );

    let cancel = api.run(&["runs", "cancel", "r2", "--reason", "withdrawn"]).await;
    assert_eq!(cancel.code, 0, "{}", cancel.stderr);
    assert!(cancel.stdout.starts_with("cancelled run `r2`: compensation_failed"), "{}", cancel.stdout);
    assert_eq!(api.json(&["runs", "get", "r2"]).await["status"], "compensation_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_map_to_their_exit_codes() {
    let api = Api::start().await;
    api.run(&["runs", "start", "gated", "--id", "deploy-4", "--input", r#"{"service":"api"}"#]).await;

    let issued = api.run(&["tokens", "issue", "vera", "--role", "viewer"]).await;
    let vera = issued.stdout.trim().to_owned();
    let read = api.run(&["--token", &vera, "runs", "list"]).await;
    assert_eq!(read.code, 0, "{}", read.stderr);
    let write = api.run(&["--token", &vera, "runs", "cancel", "deploy-4"]).await;
    assert_eq!(write.code, 4, "{write:?}");
    assert!(write.stderr.ends_with("(forbidden)\n") && write.stderr.lines().count() == 1, "{}", write.stderr);

    let temp = api.run(&["tokens", "issue", "temp", "--role", "admin"]).await.stdout.trim().to_owned();
    assert_eq!(api.run(&["--token", &temp, "definitions"]).await.code, 0);
    let revoke = api.run(&["tokens", "revoke", "temp"]).await;
    assert_eq!((revoke.code, revoke.stdout.as_str()), (0, "revoked token `temp`\n"));
    let refused = api.run(&["--token", &temp, "definitions"]).await;
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(refused.stderr.ends_with("(unauthenticated)\n"), "{}", refused.stderr);
    let tokens = api.json(&["tokens", "list"]).await;
    let temp_entry = tokens.as_array().unwrap().iter().find(|t| t["name"] == "temp").unwrap();
    assert_eq!(temp_entry["revoked"], true);

    let missing = api.run(&["runs", "get", "none-such"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
    assert!(missing.stderr.ends_with("(not_found)\n"), "{}", missing.stderr);
    let usage = api.run(&["runs", "signal", "deploy-4", "go", "--payload", "{nope"]).await;
    assert_eq!(usage.code, 2, "{usage:?}");
    let unknown = api.run(&["runs", "list", "--status", "done"]).await;
    assert_eq!(unknown.code, 2, "{unknown:?}");

    // Nobody listening: exit 5, one line, no panic.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut command = Command::new(env!("CARGO_BIN_EXE_hodei"));
    command
        .env_clear()
        .env("HOME", api.dir.path())
        .args(["--addr", &nowhere, "--token", "hodei_x", "runs", "list"]);
    let unreachable =
        Run::from(within(tokio::task::spawn_blocking(move || command.output().unwrap())).await.unwrap());
    assert_eq!(unreachable.code, 5, "{unreachable:?}");
    assert!(
        unreachable.stderr.starts_with("error: cannot connect to")
            && unreachable.stderr.ends_with("(connection)\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_log_followed_while_written_is_printed_whole_once() {
    const JOB: &str = "build-7/2#1";
    let api = Api::start().await;
    api.logs.begin(JOB).await.unwrap();
    let lines: Vec<String> = (0..2_000).map(|n| format!("line {n:05} of the build ✓\n")).collect();
    let expected: String = lines.concat();

    let follower = api.spawn(&["jobs", "logs", JOB, "-f"]);
    let logs = api.logs.clone();
    let writer = tokio::spawn(async move {
        let mut offset = 0u64;
        for batch in lines.chunks(97) {
            let batch = batch.concat();
            logs.append(JOB, LogStream::Stdout, offset, batch.as_bytes()).await.unwrap();
            offset += batch.len() as u64;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        logs.close(JOB).await.unwrap();
    });
    let followed = finish(follower).await;
    within(writer).await.unwrap();
    assert_eq!(followed.code, 0, "{}", followed.stderr);
    assert!(followed.stdout == expected, "the followed log differs from what was written");

    let read = api.run(&["jobs", "logs", JOB]).await;
    assert_eq!(read.code, 0, "{}", read.stderr);
    assert!(read.stdout == expected, "the read log differs from what was written");
    let missing = api.run(&["jobs", "logs", "none#1"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_across_a_restart_and_retry_cuts_a_backoff() {
    let api = Api::start().await;
    let started =
        api.run(&["runs", "start", "gated", "--id", "held", "--input", r#"{"service":"api"}"#]).await;
    assert_eq!(started.code, 0, "{}", started.stderr);
    api.until("held", signal_wait).await;
    let paused = api.run(&["runs", "pause", "held"]).await;
    assert_eq!(paused.code, 0, "{}", paused.stderr);

    let api = api.restart().await;
    let run = api.json(&["runs", "get", "held"]).await;
    assert_eq!(run["status"], "paused", "{run}");
    // Approved while paused: the signal waits in the inbox; the release step does not start.
    let approved = api.run(&["runs", "approve", "held", "--payload", r#"{"comment":"go"}"#]).await;
    assert_eq!(approved.code, 0, "{}", approved.stderr);
    api.until("held", |e| matches!(e, hodei_core::Event::SignalReceivedBy { .. })).await;
    let run = api.json(&["runs", "get", "held"]).await;
    assert_eq!(run["status"], "paused", "{run}");
    assert_eq!(run["steps"].as_array().unwrap().len(), 1, "{run}");
    let resumed = api.run(&["runs", "resume", "held"]).await;
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    let run = api.until("held", final_event).await;
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["output"], "api on staging, released in default (go)");
    let actions: Vec<(&str, &str)> = run["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["by"].as_str().unwrap()))
        .collect();
    assert_eq!(actions, [("pause", "admin"), ("resume", "admin")]);

    // A step waiting out an hour's backoff runs its next attempt now.
    let started = api.run(&["runs", "start", "patient", "--id", "slow", "--input", "41"]).await;
    assert_eq!(started.code, 0, "{}", started.stderr);
    api.until("slow", |e| matches!(e, hodei_core::Event::StepAttemptFailed { .. })).await;
    let retried = api.run(&["runs", "retry", "slow"]).await;
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    let run = api.until("slow", final_event).await;
    assert_eq!((run["status"].as_str(), run["output"].as_u64()), (Some("completed"), Some(42)), "{run}");
    assert_eq!(run["steps"][0]["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(run["requests"][0]["action"], "retry_now");
    // Nothing waits on a backoff now: retry is refused, exit 5 with the code.
    let again = api.run(&["runs", "retry", "slow"]).await;
    assert_eq!(again.code, 5, "{again:?}");
    assert!(again.stderr.ends_with("(invalid_state)\n"), "{}", again.stderr);
}

const WOULD_PARK: &str = "step 1: the code now calls `publish`, but the journal recorded `release` there";

/// The pre-deploy gate from the CLI: the journals of runs in flight exported from today's
/// server and replayed on a staging server running the next build (a renamed step, a patch),
/// and every run in flight checked, before the deploy and after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journals_exported_from_todays_build_are_replayed_on_the_next_one_before_a_deploy() {
    let next_build = || [gated(), rollout(1, "publish", false), release(true)];
    let today =
        Api::open_with(tempfile::tempdir().unwrap(), [gated(), rollout(1, "release", true), release(false)])
            .await;
    let engine = &today.engine;
    engine
        .start(SagaRun::new("gated", "g-1", &serde_json::json!({"service": "api"})).unwrap())
        .await
        .unwrap();
    engine.start(SagaRun::new("rollout", "r-1", &"api").unwrap()).await.unwrap();
    engine.start(SagaRun::new("release", "p-1", &"1.4.0").unwrap()).await.unwrap();
    within(journaled(engine, "g-1", signal_wait)).await;
    within(journaled(engine, "r-1", step_named("release"))).await;
    within(journaled(engine, "p-1", signal_wait)).await;

    let check = today.run(&["check"]).await;
    assert_eq!(
        (check.code, check.stdout.as_str()),
        (
            0,
            "g-1: clean; next: the wait for signal `approval`\n\
             p-1: clean; next: the wait for signal `go`\n\
             r-1: clean; next: step `release`\n\
             3 run(s) in flight checked: 3 clean, 0 not clean\n"
        ),
        "{}",
        check.stderr
    );

    // One run's journal, to the file the server names in the current directory, or to stdout.
    let work = tempfile::tempdir().unwrap();
    let export = today.run_in(work.path(), &["runs", "export", "r-1"]).await;
    let file = std::fs::read(work.path().join("r-1.journal")).unwrap();
    assert_eq!(
        (export.code, export.stdout),
        (0, format!("exported the journal of run `r-1` to r-1.journal ({} bytes)\n", file.len())),
        "{}",
        export.stderr
    );
    let r1 = SagaId::new("r-1").unwrap();
    assert_eq!(
        JournalFile::from_bytes(&file).unwrap(),
        JournalFile { saga: r1.clone(), events: engine.history(&r1).unwrap() }
    );
    let piped = today.output(today.command(&["runs", "export", "r-1", "--out", "-"])).await;
    assert_eq!((piped.status.code(), &piped.stdout), (Some(0), &file));

    // Every run in flight, to a directory.
    let journals = work.path().join("journals");
    let journals_arg = journals.display().to_string();
    let export = today.run(&["runs", "export", "--in-flight", "--dir", &journals_arg]).await;
    assert_eq!(
        (export.code, export.stdout),
        (0, format!("exported the journals of 3 run(s) in flight to {journals_arg}\n")),
        "{}",
        export.stderr
    );
    let mut files: Vec<String> = std::fs::read_dir(&journals)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["g-1.journal", "p-1.journal", "r-1.journal"]);

    // A staging server runs the next build: `release` is renamed `publish`, and a patch adds a
    // step before the wait for `go`.
    let staging = Api::open_with(tempfile::tempdir().unwrap(), next_build()).await;
    let file_of = |id: &str| journals.join(format!("{id}.journal")).display().to_string();
    let replayed = staging.run(&["runs", "replay", "--file", &file_of("r-1")]).await;
    assert_eq!(
        (replayed.code, replayed.stdout),
        (1, format!("r-1: would park: {WOULD_PARK}\n")),
        "{}",
        replayed.stderr
    );
    let replayed = staging.run(&["runs", "replay", "--file", &file_of("p-1")]).await;
    assert_eq!(
        (replayed.code, replayed.stdout.as_str()),
        (0, "p-1: clean; next: the wait for signal `go`\n  patch `verify-before-go` at key 1: old path\n"),
        "{}",
        replayed.stderr
    );
    let report = staging.json(&["runs", "replay", "--file", &file_of("g-1")]).await;
    assert_eq!(
        report["verdict"],
        serde_json::json!({"verdict": "clean", "next": "the wait for signal `approval`"})
    );
    let not_a_journal = work.path().join("notes.txt");
    std::fs::write(&not_a_journal, "not a journal").unwrap();
    let refused = staging.run(&["runs", "replay", "--file", &not_a_journal.display().to_string()]).await;
    assert_eq!(refused.code, 5, "{refused:?}");
    assert!(
        refused.stderr.ends_with("(invalid_request)\n") && refused.stderr.lines().count() == 1,
        "{}",
        refused.stderr
    );
    // On the code that wrote it, the run goes on.
    let replayed = today.run(&["runs", "replay", "r-1"]).await;
    assert_eq!((replayed.code, replayed.stdout.as_str()), (0, "r-1: clean; next: step `release`\n"));

    // The deploy anyway: `r-1` parks, as the replay said, and the check says so.
    let deployed = today.deploy(next_build()).await;
    within(parked(&deployed.engine, "r-1")).await;
    let check = deployed.run(&["check"]).await;
    assert_eq!(
        (check.code, check.stdout),
        (
            1,
            format!(
                "g-1: clean; next: the wait for signal `approval`\n\
                 p-1: clean; next: the wait for signal `go`\n\
                 r-1: would park: {WOULD_PARK}\n\
                 3 run(s) in flight checked: 2 clean, 1 not clean\n\
                 patch `verify-before-go`: 1 run(s) on the old path, 0 on the new\n"
            )
        ),
        "{}",
        check.stderr
    );
    let check = deployed.run(&["-o", "json", "check"]).await;
    let checked: Value = serde_json::from_str(&check.stdout).unwrap();
    assert_eq!(
        (check.code, &checked["clean"], &checked["not_clean"]),
        (1, &serde_json::json!(2), &serde_json::json!(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_pipeline_the_cli_starts_and_approves() {
    use fantoccini::Locator;
    let Some(driver) = browser::start_driver() else { return };
    let api = Api::start().await;
    let page = browser::browser(&driver).await;
    let base = format!("http://{}", api.server.local_addr());
    let admin = std::fs::read_to_string(api.admin_token_file()).unwrap().trim().to_owned();
    within(async {
        page.goto(&format!("{base}/#/login")).await.unwrap();
        page.wait().for_element(Locator::Css("#token")).await.unwrap().send_keys(&admin).await.unwrap();
        page.find(Locator::Css("#login button[type=submit]")).await.unwrap().click().await.unwrap();
        page.wait().for_element(Locator::Css("#runs")).await.unwrap();
        // Started from the CLI: the list shows it without a reload.
        let started =
            api.run(&["runs", "start", "gated", "--id", "cli-1", "--input", r#"{"service":"api"}"#]).await;
        assert_eq!(started.code, 0, "{}", started.stderr);
        page.wait().for_element(Locator::Css(r#"tr[data-run="cli-1"]"#)).await.unwrap();
        page.goto(&format!("{base}/#/runs/cli-1")).await.unwrap();
        page.wait().for_element(Locator::XPath("//*[@id='steps']//tr[@data-step='0']")).await.unwrap();
        // Approved from the CLI: the open page advances to the end by itself.
        api.until("cli-1", signal_wait).await;
        let approved =
            api.run(&["runs", "approve", "cli-1", "--payload", r#"{"comment":"from the terminal"}"#]).await;
        assert_eq!(approved.code, 0, "{}", approved.stderr);
        page.wait().for_element(Locator::XPath("//*[@id='steps']//tr[@data-step='1']")).await.unwrap();
        page.wait().for_element(Locator::XPath("//h1[contains(., 'completed')]")).await.unwrap();
        page.wait()
            .for_element(Locator::XPath("//*[@id='signals'][contains(., 'signal approval by admin')]"))
            .await
            .unwrap();
    })
    .await;
    page.close().await.unwrap();
}
