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
//!
//! Then the program runs itself again with `HODEI_BENCH_SAMPLE_RATIO=0.1`: the same, with the
//! exporter keeping one saga's trace in ten (`Otlp::sample_ratio`), as a busy fleet would run.
//! Set the variable to run only that. `HODEI_BENCH_ONLY=off,both` (any of `off`, `metrics`,
//! `export`, `both`) runs just those parts, without ratios, for a profiler. On Linux each part also says where the CPU went, per
//! step, by thread: the engine's runtime, the journal's threads (sled's and the flusher), the
//! exporter's (the batch processor and the gRPC client) and the collector's.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
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
/// The spans of one traced saga of the bench: its start, its run, and per step the step and
/// its attempt.
const SPANS_PER_SAGA: usize = 2 + 2 * STEPS as usize;

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
    let thread = std::thread::Builder::new().name("collector".into());
    let _ = thread.spawn(move || {
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
    spans: usize,
    /// CPU time per step while timed, by group of threads, in µs.
    cpu: BTreeMap<&'static str, f64>,
}

/// What each group of this process's threads has run so far, in clock ticks, from
/// `/proc/self/task` (empty elsewhere than on Linux). A thread that ended is not counted.
fn cpu_ticks() -> BTreeMap<&'static str, u64> {
    let mut groups = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return groups };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `pid (comm) state ...`: the name may hold spaces, the fields after it do not.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(user), Some(system)) = (fields.get(11), fields.get(12)) else { continue };
        let ticks = user.parse::<u64>().unwrap_or(0) + system.parse::<u64>().unwrap_or(0);
        let group = match &stat[open + 1..close] {
            "tokio-rt-worker" => "engine",
            name if name.starts_with("sled-io") || name == "hodei-flusher" => "journal",
            "OpenTelemetry.T" | "hodei-otlp" => "exporter",
            "collector" => "collector",
            _ => "other",
        };
        *groups.entry(group).or_insert(0) += ticks;
    }
    groups
}

/// CPU µs per step between two readings.
fn cpu_per_step(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
    steps: usize,
) -> BTreeMap<&'static str, f64> {
    // Linux's USER_HZ, which /proc reports in, is 100 on every architecture it runs on.
    const TICK_MICROS: f64 = 10_000.0;
    after
        .iter()
        .map(|(group, ticks)| {
            let spent = ticks.saturating_sub(before.get(group).copied().unwrap_or(0));
            (*group, spent as f64 * TICK_MICROS / steps as f64)
        })
        .collect()
}

async fn run_with(
    otlp: &Otlp,
    collector: &Collector,
    sampled: Option<f64>,
    export: bool,
    observed: bool,
    sagas: usize,
) -> Run {
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
    let ticks = cpu_ticks();
    let started = Instant::now();
    noop_sagas(&engine, "noop", "timed", CONCURRENCY, sagas).await;
    if export {
        otlp.flush().await.expect("flushing spans to the collector");
    }
    let elapsed = started.elapsed();
    let cpu = cpu_per_step(&ticks, &cpu_ticks(), sagas * STEPS as usize);
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
    match (export, sampled) {
        // Every saga exported all its spans: none was dropped (the queue holds a round).
        (true, None) => assert_eq!(spans, runs * SPANS_PER_SAGA, "{spans} spans for {runs} sagas"),
        // Each saga's trace went out whole or not at all.
        (true, Some(ratio)) => assert!(
            (spans > 0 || ratio == 0.0) && spans.is_multiple_of(SPANS_PER_SAGA),
            "{spans} spans for {runs} sagas sampled: a trace went out in part"
        ),
        (false, _) => assert_eq!(spans, 0, "export was off, yet spans arrived"),
    }
    Run { steps_per_second: rate(sagas * STEPS as usize, elapsed), spans, cpu }
}

/// `HODEI_BENCH_SAMPLE_RATIO`: the share of sagas whose traces are exported, all unless set.
fn sample_ratio() -> Option<f64> {
    let value = std::env::var("HODEI_BENCH_SAMPLE_RATIO").ok()?;
    match value.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Some(ratio),
        _ => panic!("HODEI_BENCH_SAMPLE_RATIO={value} is not a number from 0 to 1"),
    }
}

/// The groups of threads a breakdown shows, in its order.
const GROUPS: [&str; 5] = ["engine", "journal", "exporter", "collector", "other"];

/// The mean CPU µs per step of `runs`, all threads together.
fn total_cpu(runs: &[&Run]) -> f64 {
    runs.iter().map(|run| run.cpu.values().sum::<f64>()).sum::<f64>() / runs.len() as f64
}

fn breakdown(runs: &[&Run]) -> String {
    GROUPS
        .iter()
        .map(|group| {
            let mean = runs.iter().map(|run| run.cpu.get(group).copied().unwrap_or(0.0)).sum::<f64>()
                / runs.len() as f64;
            format!("{group} {mean:.1}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The parts `HODEI_BENCH_ONLY` names (`off`, `metrics`, `export`, `both`), each on its own
/// for `rounds` runs: for a profiler (`valgrind --tool=callgrind`, `perf record`) to see one
/// configuration at a time. No ratios: those need the parts side by side.
async fn profile_parts(
    otlp: &Otlp,
    collector: &Collector,
    sampled: Option<f64>,
    sagas: usize,
    rounds: usize,
) {
    let parts =
        [("off", false, false), ("metrics", false, true), ("export", true, false), ("both", true, true)];
    for (name, export, observed) in parts.into_iter().filter(|(name, ..)| common::selected(name)) {
        for _ in 0..rounds {
            let run = run_with(otlp, collector, sampled, export, observed, sagas).await;
            println!(
                "{name}: {} steps/s, CPU µs per step: {}",
                thousands(run.steps_per_second),
                breakdown(&[&run])
            );
        }
    }
}

fn main() {
    let sampled = sample_ratio();
    let rt = common::runtime();
    let (collector, endpoint) = start_collector();
    let sagas = scaled(4_000);
    let builder = Otlp::builder("hodei-bench")
        .endpoint(endpoint)
        // A whole round's spans fit: a full queue would drop spans, and their export cost.
        .max_queue_size(((sagas + CONCURRENCY) * 32).max(2_048));
    let builder = match sampled {
        Some(ratio) => builder.sample_ratio(ratio),
        None => builder,
    };
    let otlp = builder.build().expect("building the OTLP exporter");
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otlp.layer()))
        .expect("installing the subscriber");
    let rounds = knob("HODEI_BENCH_ROUNDS", 5).max(1);
    let exported = match sampled {
        Some(ratio) => format!("the traces of {:.0} % of the sagas exported", 100.0 * ratio),
        None => "every span exported".to_owned(),
    };
    if std::env::var_os("HODEI_BENCH_ONLY").is_some() {
        rt.block_on(profile_parts(&otlp, &collector, sampled, sagas, rounds));
        return;
    }
    rt.block_on(async {
        println!("## hodei observability overhead (sled, durability on; {exported})");
        let table = Table::new(
            &format!(
                "Step throughput, {CONCURRENCY} concurrent sagas of 10 no-op steps, against both off (median of {rounds} rounds)"
            ),
            &["round", "off: steps/s", "metrics only", "OTLP export only", "both on: steps/s", "spans per saga", "both / off"],
        );
        let (mut metrics_ratios, mut export_ratios, mut both_ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut cpu = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            // off, metrics, export, both, both, export, metrics, off: each pair's mean is
            // centred on the same moment, so a drift of the machine shifts all alike.
            let rate =
                |export: bool, observed: bool| run_with(&otlp, &collector, sampled, export, observed, sagas);
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
                format!("{:.1}", (both_a.spans + both_b.spans) as f64 / (2 * (sagas + CONCURRENCY)) as f64),
                format!("{:.3}", both / off),
            ]);
            cpu.0.extend([off_a, off_b]);
            cpu.1.extend([both_a, both_b]);
        }
        let (metrics, export, both) = (median(metrics_ratios), median(export_ratios), median(both_ratios));
        println!(
            "\nmedian against off: metrics {metrics:.3}, OTLP export {export:.3}, both {both:.3} (cost {:.1} %; target: at most 5 %)",
            100.0 * (1.0 - both)
        );
        if cfg!(target_os = "linux") {
            let (off, on): (Vec<&Run>, Vec<&Run>) = (cpu.0.iter().collect(), cpu.1.iter().collect());
            println!("CPU µs per step, off: {}", breakdown(&off));
            println!("CPU µs per step, both on: {}", breakdown(&on));
            // The machine is saturated, so CPU per step is what throughput pays, and it swings
            // less than throughput does between runs on a shared machine.
            let (off, on) = (total_cpu(&off), total_cpu(&on));
            println!(
                "CPU per step, every thread: off {off:.1} µs, both on {on:.1} µs (cost {:.1} %)",
                100.0 * (on / off - 1.0)
            );
        }
        otlp.flush().await.expect("a last flush");
    });
    if sampled.is_none() {
        // The sampled run needs an exporter of its own, and there is one per process.
        let status = std::process::Command::new(std::env::current_exe().expect("this program's path"))
            .args(std::env::args_os().skip(1))
            .env("HODEI_BENCH_SAMPLE_RATIO", "0.1")
            .status()
            .expect("running the sampled part");
        assert!(status.success(), "the sampled part failed: {status}");
    }
}
