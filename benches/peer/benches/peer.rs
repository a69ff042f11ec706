//! hodei against duroxide, a peer durable-execution library for Rust, on the same workload:
//! sagas (orchestrations) of 10 no-op steps (activities) with 100-byte outputs, in a closed loop
//! at several concurrencies, each engine on a fresh file-backed store in a temporary directory.
//!
//! Run: `cargo bench --manifest-path benches/peer/Cargo.toml`. Each concurrency runs
//! `HODEI_BENCH_ROUNDS` rounds (default 3), each a fresh store for both engines, in alternating
//! order (hodei first in even rounds); the table gives the medians and the median of the
//! rounds' ratios. Knobs: `HODEI_BENCH_SCALE` multiplies the saga counts; `DUROXIDE_ORCH_CONCURRENCY`, `DUROXIDE_WORKER_CONCURRENCY` and
//! `DUROXIDE_POLL_MS` override duroxide's runtime settings below.
//!
//! duroxide's configuration, chosen to be fair to it:
//! - its SQLite provider on a file (`SqliteProvider::new`), which sets WAL journaling with
//!   `synchronous` at NORMAL (it asks for "WAL", which SQLite reads as NORMAL): a commit is not
//!   fsynced until a checkpoint, a weaker promise than hodei's fsync before every step runs. The
//!   difference favours duroxide;
//! - `dispatcher_min_poll_interval` 10 ms, what its provider guide recommends for local SQLite
//!   (the runtime default is 100 ms, tuned for remote databases): its dispatchers poll, and a
//!   shorter idle sleep shortens every hop of a closed loop;
//! - 16 orchestration and 32 activity dispatchers: each dispatcher holds one work item at a
//!   time and spends most of it waiting on SQLite, so more of them help duroxide up to its
//!   5-connection pool. Of 1/1, 2/2 (its default), 4/8 (its documentation's example), 8/16
//!   and 16/32 on this 2-core machine, 16/32 was best or level at every concurrency;
//! - completion is awaited with `Client::wait_for_orchestration`, its API for that (it polls
//!   the status with a 5 ms to 100 ms backoff).

#[allow(dead_code)]
#[path = "../../common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Table, closed_loop, knob, median, noop_saga, noop_sagas, rate, scaled, sled_engine, thousands};
use duroxide::providers::sqlite::SqliteProvider;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{ObservabilityConfig, Runtime, RuntimeOptions};
use duroxide::{ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus};

/// Counts warnings instead of printing them: duroxide logs one for every SQLite "database is
/// locked" retry, thousands a run, which would bury the table. Installed before duroxide's
/// runtime starts, so its own subscriber finds the global slot taken and stands down.
struct WarningCounter;

impl tracing::Subscriber for WarningCounter {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        WARNINGS.fetch_add(1, Ordering::Relaxed);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

static WARNINGS: AtomicUsize = AtomicUsize::new(0);

fn warnings() -> usize {
    WARNINGS.load(Ordering::Relaxed)
}

fn main() {
    tracing::subscriber::set_global_default(WarningCounter).expect("installing the warning counter");
    let rt = common::runtime();
    rt.block_on(async {
        println!("## hodei vs duroxide: sagas of {} no-op steps, closed loop", common::STEPS);
        let settings = DuroxideSettings::from_env();
        let rounds = knob("HODEI_BENCH_ROUNDS", 3).max(1);
        let table = Table::new(
            &format!(
                "Completed sagas per second, median of {rounds} rounds (duroxide: SQLite file, {} orchestration / {} activity dispatchers, {} ms poll)",
                settings.orchestrations,
                settings.activities,
                settings.poll.as_millis()
            ),
            &[
                "concurrency",
                "hodei sagas/s",
                "duroxide sagas/s",
                "hodei / duroxide",
                "target",
                "duroxide failed / warnings",
            ],
        );
        for (concurrency, hodei_sagas, duroxide_sagas) in [(1, 100, 20), (16, 800, 100), (64, 2_000, 200)] {
            let (mut ours, mut theirs, mut ratios, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
            let warned = warnings();
            for round in 0..rounds {
                let hodei_rate = async || hodei(concurrency, scaled(hodei_sagas)).await;
                let duroxide_run = async || duroxide(&settings, concurrency, scaled(duroxide_sagas)).await;
                let (hodei_rate, duroxide_run) = if round % 2 == 0 {
                    let h = hodei_rate().await;
                    (h, duroxide_run().await)
                } else {
                    let d = duroxide_run().await;
                    (hodei_rate().await, d)
                };
                ours.push(hodei_rate);
                theirs.push(duroxide_run.per_second);
                ratios.push(hodei_rate / duroxide_run.per_second);
                failed += duroxide_run.failed;
            }
            table.row(&[
                concurrency.to_string(),
                thousands(median(ours)),
                format!("{:.1}", median(theirs)),
                format!("{:.0}x", median(ratios)),
                ">= 10x".into(),
                format!("{failed} / {}", warnings() - warned),
            ]);
        }
    });
}

async fn hodei(concurrency: usize, sagas: usize) -> f64 {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let engine = sled_engine(dir.path(), [noop_saga("noop")]).await;
    noop_sagas(&engine, "noop", "warm", concurrency, concurrency.max(10)).await;
    let elapsed = noop_sagas(&engine, "noop", "timed", concurrency, sagas).await;
    engine.shutdown(Duration::from_secs(5)).await.expect("shutting hodei down");
    rate(sagas, elapsed)
}

struct DuroxideSettings {
    orchestrations: usize,
    activities: usize,
    poll: Duration,
}

impl DuroxideSettings {
    fn from_env() -> Self {
        Self {
            orchestrations: knob("DUROXIDE_ORCH_CONCURRENCY", 16),
            activities: knob("DUROXIDE_WORKER_CONCURRENCY", 32),
            poll: Duration::from_millis(knob("DUROXIDE_POLL_MS", 10) as u64),
        }
    }
}

struct DuroxideRun {
    /// Completed orchestrations per second; failed ones take time and are not counted.
    per_second: f64,
    failed: usize,
}

/// Runs duroxide's closed loop. Its SQLite provider fails some orchestrations under load
/// ("database is locked"); those are counted rather than fatal, so that the figure reflects
/// what duroxide gets done.
async fn duroxide(settings: &DuroxideSettings, concurrency: usize, sagas: usize) -> DuroxideRun {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let db = dir.path().join("duroxide.db");
    std::fs::File::create(&db).expect("creating the SQLite file");
    let url = format!("sqlite:{}", db.display());
    let store = Arc::new(SqliteProvider::new(&url, None).await.expect("opening duroxide's SQLite store"));

    let activities = ActivityRegistry::builder()
        .register(
            "noop",
            |_: ActivityContext, _input: String| async move { Ok("x".repeat(common::OUTPUT_BYTES)) },
        )
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register("noop", |ctx: OrchestrationContext, input: String| async move {
            for _ in 0..common::STEPS {
                ctx.schedule_activity("noop", input.clone()).await?;
            }
            Ok(input)
        })
        .build();
    let options = RuntimeOptions {
        dispatcher_min_poll_interval: settings.poll,
        orchestration_concurrency: settings.orchestrations,
        worker_concurrency: settings.activities,
        observability: ObservabilityConfig { log_level: "warn".into(), ..Default::default() },
        ..Default::default()
    };
    let runtime = Runtime::start_with_options(store.clone(), activities, orchestrations, options).await;
    let client = Arc::new(Client::new(store));

    let failed = Arc::new(AtomicUsize::new(0));
    let run = |prefix: &'static str, count: usize| {
        let (client, failed) = (client.clone(), failed.clone());
        closed_loop(concurrency, count, move |n| {
            let (client, failed) = (client.clone(), failed.clone());
            async move {
                let id = format!("{prefix}-{n}");
                client.start_orchestration(&id, "noop", "7").await.expect("starting an orchestration");
                match client.wait_for_orchestration(&id, Duration::from_secs(600)).await {
                    Ok(OrchestrationStatus::Completed { output, .. }) if output == "7" => {}
                    Ok(OrchestrationStatus::Failed { .. }) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("orchestration {id} ended with {other:?}"),
                }
            }
        })
    };
    run("warm", concurrency.max(10)).await;
    failed.store(0, Ordering::Relaxed);
    let elapsed = run("timed", sagas).await;
    runtime.shutdown(None).await;
    let failed = failed.load(Ordering::Relaxed);
    DuroxideRun { per_second: rate(sagas - failed, elapsed), failed }
}
