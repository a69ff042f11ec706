//! Remote jobs as durable saga steps: a real engine over a memory store, a real hub with a log
//! store, and the agent's run loop in-process, over mutual TLS on loopback.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hodei_agent::protocol::v1;
use hodei_core::{
    Engine, Event, MemoryStore, Outcome, RecordedEvent, RetryPolicy, SagaContext, SagaDefinition, SagaId,
    SagaRun, StepError,
};
use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, MemorySecrets, RemoteJobs};
use hodei_server::logstore::LogStream;
use support::{Setup, WORKER, within};

/// A job running `sh -c script` with a minimal PATH (jobs start with an empty environment).
fn shell(script: &str) -> Job {
    Job::command(WORKER, ["/bin/sh", "-c", script]).env("PATH", "/usr/bin:/bin")
}

/// An engine running one saga definition, `pipeline`, whose body is `jobs` in order.
async fn engine(dispatcher: JobDispatcher, jobs: Vec<(&'static str, Job)>) -> Engine {
    let definition = SagaDefinition::new("pipeline", 1, move |ctx: SagaContext, (): ()| {
        let (dispatcher, jobs) = (dispatcher.clone(), jobs.clone());
        async move {
            let mut outcomes = Vec::new();
            for (name, job) in jobs {
                outcomes.push(ctx.run_job_on(&dispatcher, name, job).await?);
            }
            Ok::<Vec<JobOutcome>, StepError>(outcomes)
        }
    });
    Engine::builder().store(MemoryStore::new()).register(definition).start().await.unwrap()
}

/// Starts `pipeline` as `id` and waits for its outcome.
async fn run(engine: &Engine, id: &str) -> (Outcome<Vec<JobOutcome>>, Vec<RecordedEvent>) {
    let handle = engine.start(SagaRun::new("pipeline", id, &()).unwrap()).await.unwrap();
    let outcome = within(handle.outcome::<Vec<JobOutcome>>()).await.unwrap();
    (outcome, engine.history(&SagaId::new(id).unwrap()).unwrap())
}

fn completed_steps(history: &[RecordedEvent]) -> Vec<String> {
    let started: Vec<(u32, String)> = history
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepStarted { step, name, .. } => Some((*step, name.clone())),
            _ => None,
        })
        .collect();
    history
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepCompleted { step, .. } => {
                started.iter().find(|(s, _)| s == step).map(|(_, name)| name.clone())
            }
            _ => None,
        })
        .collect()
}

fn dispatcher(setup: &Setup, secrets: MemorySecrets) -> JobDispatcher {
    JobDispatcher::new(setup.hub.clone(), Arc::new(secrets)).retry(RetryPolicy::none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_in_sequence_complete_and_their_logs_are_stored_under_the_step_keys() {
    let mut setup = Setup::new().await;
    let jobs = vec![("build", shell("echo built")), ("test", shell("echo tested"))];
    let engine = engine(dispatcher(&setup, MemorySecrets::new()), jobs).await;

    let (outcome, history) = run(&engine, "saga-ok").await;
    let Outcome::Completed(outcomes) = outcome else { panic!("not completed: {outcome:?}") };
    assert_eq!(
        outcomes.iter().map(|o| o.job_id.as_str()).collect::<Vec<_>>(),
        ["saga-ok/0#1", "saga-ok/1#1"]
    );
    assert!(outcomes.iter().all(|o| o.exit_code == 0), "{outcomes:?}");
    assert_eq!(outcomes[0].stdout_bytes, "built\n".len() as u64);
    assert_eq!(completed_steps(&history), ["build", "test"]);
    assert_eq!(setup.stored("saga-ok/0#1", LogStream::Stdout).await, b"built\n");
    assert_eq!(setup.stored("saga-ok/1#1", LogStream::Stdout).await, b"tested\n");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_exiting_non_zero_fails_the_saga_with_its_exit_code() {
    let mut setup = Setup::new().await;
    let jobs = vec![("build", shell("echo built")), ("test", shell("echo broken >&2; exit 3"))];
    let engine = engine(dispatcher(&setup, MemorySecrets::new()), jobs).await;

    let (outcome, history) = run(&engine, "saga-red").await;
    let Outcome::Failed { cause } = &outcome else { panic!("not failed: {outcome:?}") };
    assert!(cause.contains("job `test`") && cause.contains("exited with code 3"), "{cause}");
    assert_eq!(completed_steps(&history), ["build"]);
    assert_eq!(setup.stored("saga-red/1#1", LogStream::Stderr).await, b"broken\n");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_is_masked_in_the_log_and_never_journaled() {
    let mut setup = Setup::new().await;
    let secret = "hunter2-very-secret";
    // The runner's stdin header sets `TOKEN=<base64>` for `sh -s`; the script prints it decoded.
    let deploy = Job::script(WORKER, ["/bin/sh"], "echo \"token: $TOKEN\"\n")
        .env("PATH", "/usr/bin:/bin")
        .secret("TOKEN", "deploy-token");
    let secrets = MemorySecrets::new().insert("deploy-token", secret);
    let engine = engine(dispatcher(&setup, secrets), vec![("deploy", deploy)]).await;

    let (outcome, history) = run(&engine, "saga-secret").await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    let stored = setup.stored("saga-secret/0#1", LogStream::Stdout).await;
    assert_eq!(String::from_utf8_lossy(&stored), "token: ***\n");

    let contains = |haystack: &[u8]| haystack.windows(secret.len()).any(|w| w == secret.as_bytes());
    assert!(!contains(format!("{history:?}").as_bytes()), "the secret is in the journal");
    for event in &history {
        let payloads: Vec<&[u8]> = match &event.event {
            Event::SagaStarted { input, .. } | Event::StepStarted { input, .. } => vec![input],
            Event::StepCompleted { output, .. } => vec![output],
            _ => vec![],
        };
        assert!(payloads.iter().all(|p| !contains(p)), "the secret is in {event:?}");
    }
    // The journaled input names the secret, which is what makes a replay resolve it again.
    let named = history.iter().any(|e| {
        matches!(&e.event, Event::StepStarted { input, .. }
            if input.windows(b"deploy-token".len()).any(|w| w == b"deploy-token"))
    });
    assert!(named, "the step input holds the secret's name");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_is_lost_is_retried_as_a_new_attempt_once_it_reconnects() {
    let mut setup = Setup::new().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran-once").display().to_string();
    // The first attempt marks itself and waits; stopping the agent kills it. The second, once
    // the agent is back, finds no earlier attempt to re-attach to and succeeds under its own id.
    let script =
        "echo ready; if [ -e \"$MARKER\" ]; then echo second; exit 0; fi; touch \"$MARKER\"; sleep 30";
    let job = shell(script).env("MARKER", marker);
    // Frequent, many retries: the worker is away for a moment, and each refusal is an attempt.
    let retry = RetryPolicy::attempts(200)
        .initial_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(50));
    let dispatcher = JobDispatcher::new(setup.hub.clone(), Arc::new(MemorySecrets::new())).retry(retry);
    let engine = engine(dispatcher, vec![("wait", job)]).await;

    let handle = engine.start(SagaRun::new("pipeline", "saga-lost", &()).unwrap()).await.unwrap();
    setup.wait_for_stdout("saga-lost/0#1", b"ready\n").await;
    setup.stop_agent().await;
    setup.start_agent().await;
    let outcome = within(handle.outcome::<Vec<JobOutcome>>()).await.unwrap();
    let Outcome::Completed(outcomes) = outcome else { panic!("not completed: {outcome:?}") };
    assert_eq!(outcomes[0].job_id, "saga-lost/0#2");
    assert_eq!(setup.stored("saga-lost/0#1", LogStream::Stdout).await, b"ready\n");
    assert_eq!(setup.stored("saga-lost/0#2", LogStream::Stdout).await, b"ready\nsecond\n");
    let history = engine.history(&SagaId::new("saga-lost").unwrap()).unwrap();
    assert!(history.iter().any(|e| matches!(e.event, Event::StepRetried { .. })), "{history:?}");
    setup.stop_agent().await;
}

fn is_running(pid: i32) -> bool {
    // A zombie has no status line worth reading, and a reaped process has no /proc entry.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|status| !status.lines().any(|l| l.starts_with("State:") && l.contains("Z (zombie)")))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_saga_kills_its_remote_job_that_ignores_sigterm_and_its_grandchildren() {
    let mut setup = Setup::new().await;
    // The job ignores SIGTERM and leaves a grandchild behind; the grace period is short so
    // SIGKILL follows soon.
    let job = shell("trap '' TERM; sleep 1000 & echo \"grandchild $!\"; wait")
        .cancel_grace(Duration::from_millis(200));
    let engine = engine(dispatcher(&setup, MemorySecrets::new()), vec![("deploy", job)]).await;
    let handle = engine.start(SagaRun::new("pipeline", "saga-cancel", &()).unwrap()).await.unwrap();
    setup.wait_for_stdout("saga-cancel/0#1", b"grandchild ").await;
    let stored = String::from_utf8(setup.stored("saga-cancel/0#1", LogStream::Stdout).await).unwrap();
    let grandchild: i32 = stored.trim().strip_prefix("grandchild ").unwrap().parse().unwrap();
    assert!(is_running(grandchild));

    handle.cancel("release aborted").await.unwrap();
    let outcome = within(handle.outcome::<Vec<JobOutcome>>()).await.unwrap();
    // The job step has no compensation, so there is nothing to undo: the cancel fails the saga.
    assert!(
        matches!(&outcome, Outcome::Failed { cause } if cause == "cancelled: release aborted"),
        "{outcome:?}"
    );
    // The hub stores the job's result once the agent reports it: cancelled, with the reason.
    let result = finished_result(&setup, "saga-cancel/0#1").await;
    let Some(v1::job_result::Outcome::Cancelled(reason)) = &result.outcome else { panic!("{result:?}") };
    assert!(reason.contains("release aborted"), "{reason}");
    assert!(!is_running(grandchild), "grandchild {grandchild} outlived the cancelled job");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timeout_cancels_the_remote_job_and_the_retry_runs_a_new_attempt() {
    let mut setup = Setup::new().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran-once").display().to_string();
    // The first attempt hangs past the step's timeout; the second finds the marker and ends.
    let script =
        "if [ -e \"$MARKER\" ]; then echo second; exit 0; fi; touch \"$MARKER\"; echo first; sleep 1000";
    let job = shell(script).env("MARKER", marker).cancel_grace(Duration::from_millis(200));
    let dispatcher = JobDispatcher::new(setup.hub.clone(), Arc::new(MemorySecrets::new()))
        .retry(RetryPolicy::attempts(3).initial_backoff(Duration::from_millis(10)))
        .timeout(Duration::from_secs(1));
    let engine = engine(dispatcher, vec![("hang", job)]).await;

    let (outcome, _) = run(&engine, "saga-timeout").await;
    let Outcome::Completed(outcomes) = outcome else { panic!("not completed: {outcome:?}") };
    assert_eq!(outcomes[0].job_id, "saga-timeout/0#2");
    let first = finished_result(&setup, "saga-timeout/0#1").await;
    assert!(
        matches!(&first.outcome, Some(v1::job_result::Outcome::Cancelled(r)) if r.contains("timed out")),
        "{first:?}"
    );
    assert_eq!(setup.stored("saga-timeout/0#1", LogStream::Stdout).await, b"first\n");
    assert_eq!(setup.stored("saga-timeout/0#2", LogStream::Stdout).await, b"second\n");
    setup.stop_agent().await;
}

/// The result the hub stores for `job` once the agent reports it: the log is closed (which a
/// follower sees) only after the result is on disk.
async fn finished_result(setup: &Setup, job: &str) -> v1::JobResult {
    let mut follower = setup.logs.follow(job, LogStream::Stdout, 0).await.unwrap();
    within(async { while follower.next().await.is_some() {} }).await;
    setup.hub.stored_result(job).await.unwrap().expect("a stored result once the log is closed")
}
