//! A worker with a valid certificate that sends what no agent would (issue 21): each message
//! is refused with a typed error and its session ended (or, for metrics, dropped and
//! counted), nothing of it reaches another job, and an honest worker's job beside it finishes
//! with exactly its own output. The hostile worker is a tonic client speaking the protocol by
//! hand over mutual TLS; the honest one is the real agent, running a real process.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use hodei_agent::connect::ConnectError;
use hodei_agent::protocol::v1::{self, agent_message};
use hodei_server::hub::{HubConfig, HubError};
use hodei_server::logstore::LogStream;
use support::raw_worker::{RawSession, RawWorker};
use support::{Setup, WORKER, shell, within};
use tokio::task::JoinHandle;
use tonic::Code;

const HOSTILE: &str = "w-hostile";
const VICTIM_JOB: &str = "saga-victim/0#1";
const HOSTILE_JOB: &str = "saga-hostile/0#1";
const MAX_BATCH: u64 = 4 * 1024;
const MAX_HELD: u64 = 16 * 1024;
const MAX_SAMPLES: u32 = 3;

/// The honest worker's job, between its first line stored and its end.
struct Victim {
    run: JoinHandle<Result<v1::JobResult, HubError>>,
    /// A FIFO the job reads before its last line: the test lets it finish by writing to it.
    gate: PathBuf,
    _dir: tempfile::TempDir,
}

/// A hub; the real agent as [`WORKER`], running the victim's job; and the hostile worker,
/// registered and not yet connected.
async fn scene() -> (Setup, Victim, RawWorker) {
    let config = HubConfig::default()
        .heartbeat(Duration::from_secs(5), Duration::from_secs(15))
        .log_batches(MAX_BATCH, Duration::from_millis(10))
        .max_held_bytes(MAX_HELD)
        // A window no test outlasts: the rate is the count.
        .metrics_limit(MAX_SAMPLES, Duration::from_secs(24 * 3600))
        .worker_wait(Duration::from_secs(2));
    let mut setup = Setup::hub(config).await;
    setup.start_agent().await;
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let made = std::process::Command::new("mkfifo").arg(&gate).status().unwrap();
    assert!(made.success());
    let spec = shell(VICTIM_JOB, &format!("echo ready; read line < '{}'; echo done", gate.display()));
    let hub = setup.hub.clone();
    let run = tokio::spawn(async move { hub.run_job(WORKER, spec).await });
    setup.wait_for_stdout(VICTIM_JOB, b"ready\n").await;
    let hostile = RawWorker::register(&setup, HOSTILE).await;
    (setup, Victim { run, gate, _dir: dir }, hostile)
}

impl Victim {
    /// Lets the job finish, and checks that it did with exactly its own output and result.
    async fn finishes_untouched(self, setup: &Setup) {
        let gate = self.gate.clone();
        within(tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n"))).await.unwrap().unwrap();
        let result = within(self.run).await.unwrap().unwrap();
        assert_eq!(result.job_id, VICTIM_JOB);
        assert_eq!(result.outcome, Some(v1::job_result::Outcome::ExitCode(0)));
        assert_eq!(setup.stored(VICTIM_JOB, LogStream::Stdout).await, b"ready\ndone\n");
        assert_eq!(setup.stored(VICTIM_JOB, LogStream::Stderr).await, b"");
        let stored = setup.hub.stored_result(VICTIM_JOB).await.unwrap().unwrap();
        assert_eq!(stored.outcome, result.outcome);
    }
}

/// Asks the hub to run a job on the hostile worker, and returns the session it arrived on.
async fn hostile_job(
    setup: &Setup,
    hostile: &RawWorker,
) -> (RawSession, JoinHandle<Result<v1::JobResult, HubError>>) {
    let mut session = hostile.open().await;
    let hub = setup.hub.clone();
    let run = tokio::spawn(async move { hub.run_job(HOSTILE, shell(HOSTILE_JOB, "true")).await });
    assert_eq!(session.assigned().await.job_id, HOSTILE_JOB);
    (session, run)
}

/// Checks that the hostile worker's job failed with its lost session, having stored `stdout`.
async fn hostile_job_lost(setup: &Setup, run: JoinHandle<Result<v1::JobResult, HubError>>, stdout: &[u8]) {
    let lost = within(run).await.unwrap().unwrap_err();
    assert!(
        matches!(&lost, HubError::WorkerLost { worker_id, job_id } if worker_id == HOSTILE && job_id == HOSTILE_JOB),
        "{lost:?}"
    );
    assert_eq!(setup.stored(HOSTILE_JOB, LogStream::Stdout).await, stdout);
}

/// Waits until the hub has let the hostile worker's session go.
async fn hostile_gone(setup: &Setup) {
    within(setup.hub.watch_workers().wait_for(|workers| !workers.contains_key(HOSTILE))).await.unwrap();
}

fn assert_refused(status: &tonic::Status, code: Code, message: &str) {
    assert_eq!((status.code(), status.message()), (code, message), "{status:?}");
}

fn not_assigned(what: &str, job_id: &str) -> String {
    format!("worker `{HOSTILE}` sent {what} for job `{job_id}`, which is not assigned to it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_for_another_workers_job_ends_the_session_and_is_not_stored() {
    let (setup, victim, hostile) = scene().await;
    let session = hostile.open().await;
    // Where the victim's stdout ends: the batch would continue it seamlessly.
    session.log(VICTIM_JOB, LogStream::Stdout, b"ready\n".len() as u64, b"injected\n").await;
    assert_refused(
        &session.refusal().await,
        Code::PermissionDenied,
        &not_assigned("a log batch", VICTIM_JOB),
    );
    hostile_gone(&setup).await;
    victim.finishes_untouched(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_another_workers_job_ends_the_session_and_is_not_stored() {
    let (setup, victim, hostile) = scene().await;
    let session = hostile.open().await;
    let forged = v1::JobResult {
        job_id: VICTIM_JOB.to_owned(),
        outcome: Some(v1::job_result::Outcome::ExitCode(99)),
        ..v1::JobResult::default()
    };
    session.send(agent_message::Kind::Result(forged)).await;
    assert_refused(&session.refusal().await, Code::PermissionDenied, &not_assigned("a result", VICTIM_JOB));
    hostile_gone(&setup).await;
    assert_eq!(setup.hub.stored_result(VICTIM_JOB).await.unwrap(), None);
    victim.finishes_untouched(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_another_workers_job_ends_the_session() {
    let (setup, victim, hostile) = scene().await;
    let session = hostile.open().await;
    session
        .send(agent_message::Kind::Accepted(v1::JobAccepted { job_id: VICTIM_JOB.to_owned(), pid: 1 }))
        .await;
    assert_refused(
        &session.refusal().await,
        Code::PermissionDenied,
        &not_assigned("an acceptance", VICTIM_JOB),
    );
    hostile_gone(&setup).await;
    let running = setup.hub.running_jobs();
    assert_eq!(running.keys().collect::<Vec<_>>(), [WORKER]);
    assert!(running[WORKER].contains(VICTIM_JOB));
    victim.finishes_untouched(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_another_workers_job_or_an_unknown_one_in_hello_is_refused() {
    let (setup, victim, hostile) = scene().await;
    for claimed in [VICTIM_JOB, "saga-nowhere/0#1"] {
        let refused = match hostile.open_claiming(&[claimed]).await {
            Err(ConnectError::Refused(status)) => status,
            other => panic!("expected a refusal, got {:?}", other.map(|_| "a session")),
        };
        assert_refused(&refused, Code::PermissionDenied, &not_assigned("a claim in its Hello", claimed));
    }
    assert!(!setup.hub.connected_workers().contains_key(HOSTILE));
    assert!(!setup.logs.exists("saga-nowhere/0#1").await.unwrap());
    victim.finishes_untouched(&setup).await;
}

/// The hostile worker's job writes `abc`, stored and acknowledged, then `XYZ` at `offset`:
/// checks that the session ends with `code` and `message`, having stored only `abc`.
async fn second_batch_at(offset: u64, code: Code, message: &str) {
    let (setup, victim, hostile) = scene().await;
    let (mut session, run) = hostile_job(&setup, &hostile).await;
    session.log(HOSTILE_JOB, LogStream::Stdout, 0, b"abc").await;
    session.acknowledged(HOSTILE_JOB, 3).await;
    session.log(HOSTILE_JOB, LogStream::Stdout, offset, b"XYZ").await;
    assert_refused(&session.refusal().await, code, message);
    hostile_job_lost(&setup, run, b"abc").await;
    victim.finishes_untouched(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewound_offset_ends_the_session_and_nothing_of_it_is_stored() {
    let expected = format!(
        "worker `{HOSTILE}` sent stdout of job `{HOSTILE_JOB}` from offset 1, back from the 3 it had reached"
    );
    second_batch_at(1, Code::InvalidArgument, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_past_what_was_sent_ends_the_session_and_nothing_of_it_is_stored() {
    let expected = format!(
        "storing the log of job `{HOSTILE_JOB}`: stdout of job `{HOSTILE_JOB}`: a batch at offset 10 leaves a gap; resend from offset 3"
    );
    second_batch_at(10, Code::Aborted, &expected).await;
}

/// The hostile worker's job sends one batch of `len` bytes: checks that the session ends with
/// `message`, having stored nothing.
async fn one_batch_of(len: usize, message: &str) {
    let (setup, victim, hostile) = scene().await;
    let (session, run) = hostile_job(&setup, &hostile).await;
    assert_eq!(session.0.welcome.log_batch_max_bytes, MAX_BATCH);
    session.log(HOSTILE_JOB, LogStream::Stdout, 0, &vec![b'x'; len]).await;
    assert_refused(&session.refusal().await, Code::ResourceExhausted, message);
    hostile_job_lost(&setup, run, b"").await;
    victim.finishes_untouched(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_announced_size_ends_the_session_unstored() {
    let expected = format!(
        "worker `{HOSTILE}` sent a log batch of {} bytes for job `{HOSTILE_JOB}`, over the limit of {MAX_BATCH}",
        MAX_BATCH + 1
    );
    one_batch_of(MAX_BATCH as usize + 1, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_decoding_limit_ends_the_session_undecoded() {
    // The batch limit is small, so the decoding limit is gRPC's 4 MiB.
    let limit = 4 * 1024 * 1024;
    let expected = format!("worker `{HOSTILE}` sent a message over the session's limit of {limit} bytes");
    one_batch_of(limit + 1, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_flood_is_dropped_and_counted_and_reaches_no_other_job() {
    let (setup, victim, hostile) = scene().await;
    let mut samples = setup.hub.subscribe_metrics();
    let (mut session, run) = hostile_job(&setup, &hostile).await;
    // Marked so that the honest agent's samples (real times) cannot be taken for them.
    let forged =
        |job_id: &str| v1::MetricsSample { job_id: job_id.to_owned(), at_unix_ms: -1, ..Default::default() };
    for _ in 0..10 {
        session.send(agent_message::Kind::Metrics(forged(HOSTILE_JOB))).await;
    }
    for _ in 0..5 {
        session.send(agent_message::Kind::Metrics(forged(VICTIM_JOB))).await;
    }
    session.round_trip().await;

    // The session goes on: samples are a live view, dropped rather than fatal.
    assert!(setup.hub.connected_workers().contains_key(HOSTILE));
    assert_eq!(setup.hub.dropped_metric_samples(HOSTILE), 10 - u64::from(MAX_SAMPLES) + 5);
    let mut taken = Vec::new();
    while let Ok(sample) = samples.try_recv() {
        if sample.at_unix_ms == -1 {
            taken.push(sample.job_id);
        }
    }
    assert_eq!(taken, vec![HOSTILE_JOB.to_owned(); MAX_SAMPLES as usize]);
    assert_ne!(setup.hub.job_metrics(VICTIM_JOB).map(|sample| sample.at_unix_ms), Some(-1));

    drop(session);
    hostile_job_lost(&setup, run, b"").await;
    victim.finishes_untouched(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_small_batches_holds_no_more_than_the_stated_bound() {
    let (setup, victim, hostile) = scene().await;
    let (session, run) = hostile_job(&setup, &hostile).await;
    let RawSession(session) = session;
    let bound = setup.hub.held_log_bytes(HOSTILE).unwrap().bound;
    assert_eq!(bound, 2 * (2 * MAX_HELD + MAX_BATCH));
    // Far more than the bound, in batches well under the size limit.
    let batch = [b'f'; 1024];
    let total = 1024 * batch.len() as u64;
    assert!(total > 10 * bound);

    let (sender, mut receiver) = (session.sender, session.receiver);
    // The hub's acknowledgements are read as they come, as an agent would: a hub that cannot
    // send them would stop reading, which is no test of its bound.
    let drained = tokio::spawn(async move {
        loop {
            let message = receiver.message().await.unwrap().expect("the session goes on");
            if let Some(v1::hub_message::Kind::LogAck(ack)) = message.kind
                && ack.stream() == v1::OutputStream::Stdout
                && ack.stored == total
            {
                return receiver;
            }
        }
    });
    for offset in (0..total).step_by(batch.len()) {
        let batch = v1::LogBatch {
            job_id: HOSTILE_JOB.to_owned(),
            stream: v1::OutputStream::Stdout.into(),
            offset,
            data: batch.to_vec().into(),
        };
        within(sender.send(v1::AgentMessage { kind: Some(agent_message::Kind::Log(batch)) })).await.unwrap();
    }
    let receiver = within(drained).await.unwrap();

    let held = setup.hub.held_log_bytes(HOSTILE).unwrap();
    assert!(held.peak > 0 && held.peak < held.bound, "{held:?}");
    let stored = setup.stored(HOSTILE_JOB, LogStream::Stdout).await;
    assert_eq!(stored.len() as u64, total);
    assert!(stored.iter().all(|b| *b == b'f'));

    drop((sender, receiver));
    hostile_job_lost(&setup, run, &stored).await;
    victim.finishes_untouched(&setup).await;
}
