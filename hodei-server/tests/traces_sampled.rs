//! Sampling: a saga's trace is exported whole or not at all. A sampler that keeps about half of
//! the sagas, forty sagas that each run a step, a job on a worker and a child saga; for each,
//! the collector holds either every span of its trace or none, and a saga left out told its
//! job and its child that it is not sampled.

#[path = "support/otlp_collector.rs"]
mod otlp_collector;
mod support;

use std::collections::HashMap;
use std::sync::Arc;

use hodei_core::telemetry::{Otlp, TelemetryError};
use hodei_core::trace::TraceContext;
use hodei_core::{
    Engine, MemoryStore, Outcome, RetryPolicy, SagaContext, SagaDefinition, SagaId, SagaRun, StepError,
};
use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, MemorySecrets, RemoteJobs};
use hodei_server::logstore::LogStream;
use support::{Setup, WORKER, within};
use tracing_subscriber::layer::SubscriberExt as _;

const SAGAS: usize = 40;

/// The spans of one saga's trace when it is sampled, sorted: the parent's start and run, its
/// steps `one`, `build` (with the job and the agent's run of it) and the step that runs the
/// child, each with its attempt; the child's start and run, and its step `inner` and attempt.
const WHOLE: [&str; 14] = [
    "attempt",
    "attempt",
    "attempt",
    "attempt",
    "job",
    "job.run",
    "saga",
    "saga",
    "saga.start",
    "saga.start",
    "step",
    "step",
    "step",
    "step",
];

fn journaled(engine: &Engine, id: &str) -> TraceContext {
    let history = engine.history(&SagaId::new(id).unwrap()).unwrap();
    let contexts: Vec<_> = history.iter().filter_map(|r| r.event.trace_context()).collect();
    assert_eq!(contexts.len(), 1, "one journaled trace context for `{id}`: {history:?}");
    contexts[0].clone()
}

#[test]
fn a_sample_ratio_outside_zero_to_one_is_refused() {
    for ratio in [-0.1, 1.5, f64::NAN] {
        let refused = Otlp::builder("hodei-sampling-test").sample_ratio(ratio).build();
        assert!(matches!(refused, Err(TelemetryError::SampleRatio(_))), "{ratio}: {refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sagas_trace_is_exported_whole_or_not_at_all() {
    let (received, port) = otlp_collector::start(None);
    let otlp = Otlp::builder("hodei-sampling-test")
        .endpoint(format!("http://127.0.0.1:{port}"))
        .sample_ratio(0.5)
        .build()
        .unwrap();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otlp.layer())).unwrap();

    let mut setup = Setup::new().await;
    let dispatcher =
        JobDispatcher::new(setup.hub.clone(), Arc::new(MemorySecrets::new())).retry(RetryPolicy::none());
    let job = Job::command(WORKER, ["/bin/sh", "-c", "echo \"$TRACEPARENT\""]).env("PATH", "/usr/bin:/bin");
    let child = SagaDefinition::new("child", 1, |ctx: SagaContext, (): ()| async move {
        ctx.step("inner").run(|_, ()| async { Ok::<_, StepError>(()) }).await
    });
    let parent = SagaDefinition::new("parent", 1, move |ctx: SagaContext, n: u32| {
        let (dispatcher, job) = (dispatcher.clone(), job.clone());
        async move {
            ctx.step("one").run(|_, ()| async { Ok::<_, StepError>(()) }).await?;
            let _: JobOutcome = ctx.run_job_on(&dispatcher, "build", job).await?;
            ctx.child::<()>(SagaRun::new("child", format!("child-{n}"), &()).unwrap()).await
        }
    });
    let engine =
        Engine::builder().store(MemoryStore::new()).register(parent).register(child).start().await.unwrap();
    for n in 0..SAGAS as u32 {
        let handle = engine.start(SagaRun::new("parent", format!("parent-{n}"), &n).unwrap()).await.unwrap();
        let outcome = within(handle.outcome::<()>()).await.unwrap();
        assert_eq!(outcome, Outcome::Completed(()));
    }
    otlp.flush().await.unwrap();

    let mut by_trace: HashMap<[u8; 16], Vec<String>> = HashMap::new();
    for span in received.0.lock().unwrap().iter() {
        by_trace.entry(span.trace_id.as_slice().try_into().unwrap()).or_default().push(span.name.clone());
    }
    let (mut whole, mut absent) = (0, 0);
    for n in 0..SAGAS {
        let context = journaled(&engine, &format!("parent-{n}"));
        let child = journaled(&engine, &format!("child-{n}"));
        assert_eq!(child.trace_id(), context.trace_id(), "a child saga is in its parent's trace");
        assert_eq!(child.sampled(), context.sampled(), "a child saga follows its parent's sampling");
        let mut names = by_trace.remove(&context.trace_id()).unwrap_or_default();
        names.sort();
        let stdout = setup.stored(&format!("parent-{n}/1#1"), LogStream::Stdout).await;
        let traceparent = String::from_utf8(stdout).unwrap();
        let flags = if context.sampled() { "01" } else { "00" };
        assert!(
            traceparent.starts_with(&format!("00-{}-", context.trace_id_hex()))
                && traceparent.trim_end().ends_with(flags),
            "parent-{n}: the job saw `{traceparent}`, its saga {context:?}"
        );
        if context.sampled() {
            assert_eq!(names, WHOLE, "parent-{n} was sampled");
            whole += 1;
        } else {
            assert!(names.is_empty(), "parent-{n} was not sampled, yet spans of it arrived: {names:?}");
            absent += 1;
        }
    }
    // At a ratio of one half, forty sagas all on one side has odds of 2 in 10^12.
    assert!(whole > 0 && absent > 0, "{whole} sagas sampled, {absent} not");
    assert!(by_trace.is_empty(), "spans in traces of no saga: {by_trace:?}");
    setup.stop_agent().await;
}
