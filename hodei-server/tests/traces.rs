//! OpenTelemetry traces across the wire: an OTLP/gRPC collector in the test receives the spans
//! of a saga whose step runs a job on a worker (the agent's run loop in-process, over mutual TLS
//! on loopback), and of a saga whose engine is dropped mid-saga and reopened on its journal.

#[path = "support/otlp_collector.rs"]
mod otlp_collector;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hodei_core::telemetry::Otlp;
use hodei_core::{
    Engine, MemoryStore, Outcome, RetryPolicy, SagaContext, SagaDefinition, SagaId, SagaRun, SledStore,
    StepError,
};
use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, MemorySecrets, RemoteJobs};
use hodei_server::logstore::LogStream;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use otlp_collector::Received;
use support::sagas::{journaled, signal_wait};
use support::{Setup, WORKER, within};
use tracing_subscriber::layer::SubscriberExt as _;

/// The collector and the exporter pointed at it: one per process, as OpenTelemetry's tracer
/// provider and the global subscriber are. The collector runs on a runtime of its own, so it
/// outlives each test's.
struct Harness {
    received: Received,
    otlp: Otlp,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let (received, port) = otlp_collector::start(None);
        let otlp =
            Otlp::builder("hodei-traces-test").endpoint(format!("http://127.0.0.1:{port}")).build().unwrap();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otlp.layer())).unwrap();
        Harness { received, otlp }
    })
}

impl Harness {
    /// Every span of trace `trace_id` received once everything ended so far is exported: the
    /// flush returns when the collector has answered.
    async fn trace(&self, trace_id: &[u8; 16]) -> Vec<Span> {
        self.otlp.flush().await.unwrap();
        self.received.0.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    /// Every span received that names saga `id`, in whatever trace.
    fn of_saga(&self, id: &str) -> Vec<Span> {
        let spans = self.received.0.lock().unwrap();
        spans.iter().filter(|s| attribute(s, "hodei.saga.id").as_deref() == Some(id)).cloned().collect()
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(n) => n.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one span named `name`.
fn only<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let named: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(named.len(), 1, "spans named `{name}`: {:?}", names(spans));
    named[0]
}

fn names(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// The trace id a saga's journal holds.
fn journaled_trace(engine: &Engine, id: &str) -> [u8; 16] {
    let history = engine.history(&SagaId::new(id).unwrap()).unwrap();
    let contexts: Vec<_> = history.iter().filter_map(|r| r.event.trace_context()).collect();
    assert_eq!(contexts.len(), 1, "one journaled trace context: {history:?}");
    contexts[0].trace_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sagas_trace_runs_from_its_start_through_the_job_to_the_agents_run_and_the_process() {
    let harness = harness();
    let mut setup = Setup::new().await;
    let dispatcher =
        JobDispatcher::new(setup.hub.clone(), Arc::new(MemorySecrets::new())).retry(RetryPolicy::none());
    let job = Job::command(WORKER, ["/bin/sh", "-c", "echo \"traceparent=$TRACEPARENT\""])
        .env("PATH", "/usr/bin:/bin");
    let definition = SagaDefinition::new("pipeline", 4, move |ctx: SagaContext, (): ()| {
        let (dispatcher, job) = (dispatcher.clone(), job.clone());
        async move { ctx.run_job_on(&dispatcher, "build", job).await }
    });
    let engine = Engine::builder().store(MemoryStore::new()).register(definition).start().await.unwrap();
    let handle = engine.start(SagaRun::new("pipeline", "traced-1", &()).unwrap()).await.unwrap();
    let outcome = within(handle.outcome::<JobOutcome>()).await.unwrap();
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");

    let trace_id = journaled_trace(&engine, "traced-1");
    let spans = harness.trace(&trace_id).await;
    let start = only(&spans, "saga.start");
    let saga = only(&spans, "saga");
    let step = only(&spans, "step");
    let attempt = only(&spans, "attempt");
    let job = only(&spans, "job");
    let run = only(&spans, "job.run");
    // The parent chain, each span the child of the one before.
    assert!(start.parent_span_id.is_empty(), "the start roots the trace");
    for (child, parent) in [(saga, start), (step, saga), (attempt, step), (job, attempt), (run, job)] {
        assert_eq!(
            child.parent_span_id, parent.span_id,
            "`{}` is not the child of `{}`",
            child.name, parent.name
        );
    }
    // Every span that names the saga is in this one trace.
    let of_saga = harness.of_saga("traced-1");
    assert!(of_saga.iter().all(|s| s.trace_id == trace_id), "{:?}", names(&of_saga));
    // The attributes.
    let expect = |span: &Span, key: &str, value: &str| {
        assert_eq!(attribute(span, key).as_deref(), Some(value), "`{}`'s {key}", span.name);
    };
    for span in [start, saga] {
        expect(span, "hodei.saga.id", "traced-1");
        expect(span, "hodei.saga.definition", "pipeline");
        expect(span, "hodei.saga.version", "4");
    }
    expect(saga, "hodei.saga.resumed", "false");
    expect(step, "hodei.step.name", "build");
    expect(step, "hodei.step.index", "0");
    expect(step, "hodei.outcome", "ok");
    expect(attempt, "hodei.attempt", "1");
    expect(attempt, "hodei.outcome", "ok");
    expect(job, "hodei.job.id", "traced-1/0#1");
    expect(job, "hodei.job.name", "build");
    expect(job, "hodei.worker.id", WORKER);
    expect(job, "hodei.outcome", "ok");
    expect(job, "process.exit.code", "0");
    expect(run, "hodei.job.id", "traced-1/0#1");
    expect(run, "hodei.worker.id", WORKER);
    expect(run, "hodei.outcome", "ok");
    expect(run, "process.exit.code", "0");
    assert!(
        run.start_time_unix_nano >= job.start_time_unix_nano
            && run.end_time_unix_nano <= job.end_time_unix_nano
    );
    // The job's process was told its place: the agent's run.
    let stdout = setup.stored("traced-1/0#1", LogStream::Stdout).await;
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        format!("traceparent=00-{}-{}-01\n", hex(&trace_id), hex(&run.span_id))
    );
    setup.stop_agent().await;
}

/// A step, a wait for the signal `go`, a step.
fn gated() -> SagaDefinition {
    SagaDefinition::new("gated", 1, |ctx: SagaContext, (): ()| async move {
        ctx.step("one").run(|_, ()| async { Ok::<_, StepError>(1u32) }).await?;
        let _: () = ctx.wait_signal("go").await?;
        ctx.step("two").run(|_, ()| async { Ok::<_, StepError>(2u32) }).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_resumed_on_its_journal_continues_its_trace_and_replayed_steps_have_no_second_span() {
    let harness = harness();
    let dir = tempfile::tempdir().unwrap();
    let open = || async {
        let store = SledStore::open(dir.path().join("journal")).unwrap();
        Engine::builder().store(store).register(gated()).start().await.unwrap()
    };
    let engine = open().await;
    engine.start(SagaRun::new("gated", "resumed-1", &()).unwrap()).await.unwrap();
    within(journaled(&engine, "resumed-1", signal_wait)).await;
    // The control plane goes away with the saga waiting after step one.
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(engine);

    let engine = open().await;
    let id = SagaId::new("resumed-1").unwrap();
    engine.signal(&id, "go", &()).await.unwrap();
    let outcome = within(engine.handle(&id).unwrap().outcome::<u32>()).await.unwrap();
    assert_eq!(outcome, Outcome::Completed(2));

    let trace_id = journaled_trace(&engine, "resumed-1");
    let spans = harness.trace(&trace_id).await;
    let start = only(&spans, "saga.start");
    let runs: Vec<&Span> = spans.iter().filter(|s| s.name == "saga").collect();
    assert_eq!(runs.len(), 2, "one `saga` span per run of the driver: {:?}", names(&spans));
    assert!(runs.iter().all(|run| run.parent_span_id == start.span_id));
    let resumed: HashMap<_, _> =
        runs.iter().map(|run| (attribute(run, "hodei.saga.resumed").unwrap(), run.span_id.clone())).collect();
    assert_eq!(resumed.len(), 2, "a first run and a resumed one");
    // Each step has one span in all, under the run that did its work.
    let steps: Vec<&Span> = spans.iter().filter(|s| s.name == "step").collect();
    let step = |name: &str| {
        let named: Vec<&&Span> =
            steps.iter().filter(|s| attribute(s, "hodei.step.name").as_deref() == Some(name)).collect();
        assert_eq!(named.len(), 1, "step `{name}`: {} spans", named.len());
        named[0].parent_span_id.clone()
    };
    assert_eq!(step("one"), resumed["false"]);
    assert_eq!(step("two"), resumed["true"]);
    let of_saga = harness.of_saga("resumed-1");
    assert!(of_saga.iter().all(|s| s.trace_id == trace_id), "{:?}", names(&of_saga));
    assert_eq!(of_saga.iter().filter(|s| s.name == "step").count(), 2, "{:?}", names(&of_saga));
}
