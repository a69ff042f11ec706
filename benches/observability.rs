//! What observability costs the engine: step throughput with OpenTelemetry export and
//! Prometheus metrics both on, against both off, in one process and one run.
//!
//! "On" is what a user turns on: the OTLP exporter (`hodei::telemetry::Otlp`) as a layer of the
//! global subscriber, sending every span over gRPC to a collector on loopback (one in this
//! process, counting what it receives), and `Metrics` as the engine's observer. "Off" is the
//! same process with export switched off (`Otlp::set_export(false)`: the layer lets every span
//! pass by) and an engine with no observer. The timed part of an "on" run ends when the
//! collector has answered for every span (a flush), so export work still queued is paid for.
//!
//! Run: `cargo bench --bench observability --features otel`. Knobs: `HODEI_BENCH_SCALE`
//! multiplies the saga count, `HODEI_BENCH_ROUNDS` (default 5) the rounds. Each round runs off,
//! metrics only, export only, both, then the same backwards, and takes the ratios within the
//! round: the split says which of the two costs what.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{STEPS, Table, knob, median, noop_saga, noop_sagas, rate, scaled, thousands};
use hodei::Engine;
use hodei::server::metrics::{Metrics, Sources};
use hodei::telemetry::Otlp;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tracing_subscriber::layer::SubscriberExt as _;

const CONCURRENCY: usize = 256;

/// Counts the spans it is sent; keeps none.
#[derive(Default, Clone)]
struct Collector(Arc<AtomicUsize>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let resources = request.into_inner().resource_spans;
        let spans: usize = resources.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.fetch_add(spans, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A collector on 127.0.0.1, on a thread and runtime of its own, as a sidecar would be.
fn start_collector() -> (Collector, String) {
    let collector = Collector::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the collector");
    listener.set_nonblocking(true).expect("a non-blocking listener");
    let addr = listener.local_addr().expect("the collector's address");
    let service = TraceServiceServer::new(collector.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("serving OTLP");
        });
    });
    (collector, format!("http://{addr}"))
}

struct Run {
    steps_per_second: f64,
    spans_per_saga: usize,
}

async fn run_with(otlp: &Otlp, collector: &Collector, export: bool, observed: bool, sagas: usize) -> Run {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let metrics = Metrics::new();
    let mut builder = Engine::builder().data_dir(dir.path()).register(noop_saga("noop"));
    if observed {
        builder = builder.observer(Arc::new(metrics.clone()));
    }
    let engine = builder.start().await.expect("starting the engine");
    otlp.set_export(export);
    let before = collector.0.load(Ordering::Relaxed);
    // Warm sled's trees and the exporter's connection before the clock starts.
    noop_sagas(&engine, "noop", "warm", CONCURRENCY, CONCURRENCY).await;
    let started = Instant::now();
    noop_sagas(&engine, "noop", "timed", CONCURRENCY, sagas).await;
    if export {
        otlp.flush().await.expect("flushing spans to the collector");
    }
    let elapsed = started.elapsed();
    if observed {
        // The metrics saw every run: the warm-up's and the timed ones.
        let text = metrics.encode(Sources { engine: &engine, scheduler: None, hub: None });
        let finished = format!(
            "hodei_sagas_finished_total{{definition=\"noop\",outcome=\"completed\"}} {}",
            sagas + CONCURRENCY
        );
        assert!(text.lines().any(|line| line == finished), "expected `{finished}` in:\n{text}");
    }
    // A driver's last span ends after its saga's outcome is delivered: once the engine has
    // stopped every driver and the exporter has flushed, every span of the run has arrived.
    engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
    otlp.flush().await.expect("a flush after the run");
    let spans = collector.0.load(Ordering::Relaxed) - before;
    let runs = sagas + CONCURRENCY;
    if export {
        // Every saga exported the same spans: none was dropped (the queue holds a round).
        assert_eq!(spans % runs, 0, "{spans} spans for {runs} sagas: some were dropped");
        assert!(spans / runs >= 2 + 2 * STEPS as usize, "{spans} spans for {runs} sagas");
    } else {
        assert_eq!(spans, 0, "export was off, yet spans arrived");
    }
    Run { steps_per_second: rate(sagas * STEPS as usize, elapsed), spans_per_saga: spans / runs }
}

fn main() {
    let rt = common::runtime();
    let (collector, endpoint) = start_collector();
    let sagas = scaled(4_000);
    let otlp = Otlp::builder("hodei-bench")
        .endpoint(endpoint)
        // A whole round's spans fit: a full queue would drop spans, and their export cost.
        .max_queue_size(((sagas + CONCURRENCY) * 32).max(2_048))
        .build()
        .expect("building the OTLP exporter");
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otlp.layer()))
        .expect("installing the subscriber");
    let rounds = knob("HODEI_BENCH_ROUNDS", 5).max(1);
    rt.block_on(async {
        println!("## hodei observability overhead (sled, durability on)");
        let table = Table::new(
            &format!(
                "Step throughput, {CONCURRENCY} concurrent sagas of 10 no-op steps, against both off (median of {rounds} rounds)"
            ),
            &["round", "off: steps/s", "metrics only", "OTLP export only", "both on: steps/s", "spans per saga", "both / off"],
        );
        let (mut metrics_ratios, mut export_ratios, mut both_ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            // off, metrics, export, both, both, export, metrics, off: each pair's mean is
            // centred on the same moment, so a drift of the machine shifts all alike.
            let rate = |export: bool, observed: bool| run_with(&otlp, &collector, export, observed, sagas);
            let off_a = rate(false, false).await;
            let metrics_a = rate(false, true).await;
            let export_a = rate(true, false).await;
            let both_a = rate(true, true).await;
            let both_b = rate(true, true).await;
            let export_b = rate(true, false).await;
            let metrics_b = rate(false, true).await;
            let off_b = rate(false, false).await;
            let mean = |a: &Run, b: &Run| (a.steps_per_second + b.steps_per_second) / 2.0;
            let off = mean(&off_a, &off_b);
            let (metrics, export, both) = (mean(&metrics_a, &metrics_b), mean(&export_a, &export_b), mean(&both_a, &both_b));
            metrics_ratios.push(metrics / off);
            export_ratios.push(export / off);
            both_ratios.push(both / off);
            table.row(&[
                round.to_string(),
                thousands(off),
                format!("{} ({:.3})", thousands(metrics), metrics / off),
                format!("{} ({:.3})", thousands(export), export / off),
                thousands(both),
                both_a.spans_per_saga.to_string(),
                format!("{:.3}", both / off),
            ]);
        }
        let (metrics, export, both) = (median(metrics_ratios), median(export_ratios), median(both_ratios));
        println!(
            "\nmedian against off: metrics {metrics:.3}, OTLP export {export:.3}, both {both:.3} (cost {:.1} %; target: at most 5 %)",
            100.0 * (1.0 - both)
        );
        otlp.flush().await.expect("a last flush");
    });
}
