//! Shared by the local-provider and scheduler tests: a saga definition that runs its input's
//! jobs, and ways to wait for and read what they did.

// Each test crate uses its own part of this.
#![allow(dead_code)]

use std::time::Duration;

#[path = "../../../hodei-server/tests/support/agent_binary.rs"]
pub mod agent_binary;

use hodei_core::{Engine, MemoryStore, Outcome, SagaContext, SagaDefinition, SagaHandle, SagaRun, StepError};
use hodei_server::hub::HubConfig;
use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, RemoteJobs};
use hodei_server::logstore::{LogStore, LogStream};

/// A guard against a hang, never a means of synchronisation.
pub const LIMIT: Duration = Duration::from_secs(60);

pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .unwrap_or_else(|_| panic!("hung: did not finish within {LIMIT:?}"))
}

/// Short log batch delays, so that jobs' output is stored promptly.
pub fn fast_hub() -> HubConfig {
    HubConfig::default().log_batches(64 * 1024, Duration::from_millis(10))
}

/// One saga definition, `pipeline`: runs its input's jobs in order.
pub fn pipeline(dispatcher: JobDispatcher) -> SagaDefinition {
    SagaDefinition::new("pipeline", 1, move |ctx: SagaContext, jobs: Vec<(String, Job)>| {
        let dispatcher = dispatcher.clone();
        async move {
            let mut outcomes = Vec::new();
            for (name, job) in jobs {
                outcomes.push(ctx.run_job_on(&dispatcher, &name, job).await?);
            }
            Ok::<Vec<JobOutcome>, StepError>(outcomes)
        }
    })
}

/// An engine over a memory store, running `pipeline` sagas with `dispatcher`.
pub async fn engine(dispatcher: JobDispatcher) -> Engine {
    Engine::builder().store(MemoryStore::new()).register(pipeline(dispatcher)).start().await.unwrap()
}

/// Starts a `pipeline` saga `id` running `jobs`.
pub async fn start(engine: &Engine, id: &str, jobs: Vec<(&str, Job)>) -> SagaHandle {
    let jobs: Vec<(String, Job)> = jobs.into_iter().map(|(name, job)| (name.to_owned(), job)).collect();
    engine.start(SagaRun::new("pipeline", id, &jobs).unwrap()).await.unwrap()
}

pub async fn outcome(handle: SagaHandle) -> Outcome<Vec<JobOutcome>> {
    within(handle.outcome::<Vec<JobOutcome>>()).await.unwrap()
}

pub fn completed(outcome: Outcome<Vec<JobOutcome>>) -> Vec<JobOutcome> {
    match outcome {
        Outcome::Completed(outcomes) => outcomes,
        other => panic!("not completed: {other:?}"),
    }
}

/// Why the saga failed, with nothing to compensate.
pub fn failure(outcome: Outcome<Vec<JobOutcome>>) -> String {
    match outcome {
        Outcome::Failed { cause } => cause,
        other => panic!("did not fail: {other:?}"),
    }
}

/// Everything stored for `stream` of `job`, as text.
pub async fn stored(logs: &LogStore, job: &str, stream: LogStream) -> String {
    let mut out = Vec::new();
    loop {
        let chunk = logs.read(job, stream, out.len() as u64, 1 << 20).await.unwrap();
        if chunk.bytes.is_empty() {
            return String::from_utf8(out).unwrap();
        }
        out.extend_from_slice(&chunk.bytes);
    }
}

/// Waits until `job`'s stored stdout contains `needle`, following the store (no polling).
pub async fn wait_for_stdout(logs: &LogStore, job: &str, needle: &str) {
    let mut follower = logs.follow(job, LogStream::Stdout, 0).await.unwrap();
    let mut seen = String::new();
    within(async {
        while !seen.contains(needle) {
            let chunk = follower.next().await.expect("the log is still open").unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk.bytes));
        }
    })
    .await;
}

/// Runs its input's jobs as parallel branches, each job a step of its own branch.
pub fn matrix(dispatcher: hodei_server::jobs::JobDispatcher) -> SagaDefinition {
    use hodei_server::jobs::{JobOutcome, RemoteJobs};
    SagaDefinition::new("matrix", 1, move |ctx: SagaContext, jobs: Vec<(String, Job)>| {
        let dispatcher = dispatcher.clone();
        async move {
            let branches = jobs
                .into_iter()
                .map(|(name, job)| {
                    let dispatcher = dispatcher.clone();
                    hodei_core::Branch::new(move |ctx: SagaContext| async move {
                        ctx.run_job_on(&dispatcher, &name, job).await
                    })
                })
                .collect();
            ctx.all("jobs", branches).await.map(|outcomes: Vec<JobOutcome>| outcomes)
        }
    })
}
