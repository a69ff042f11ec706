//! Pieces shared by the benchmark programs: the workload, the closed-loop driver, the knobs and
//! the report table. Included with `#[path]` by `benches/engine.rs` and by the peer crate in
//! `benches/peer`, so both measure hodei on exactly the same saga.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hodei::{Engine, Outcome, SagaContext, SagaDefinition, SagaRun, StepError};

/// Steps in every benchmark saga.
pub const STEPS: u32 = 10;
/// Bytes each step returns, the payload the README's figures are quoted for.
pub const OUTPUT_BYTES: usize = 100;

/// The benchmark saga: `STEPS` no-op steps, each returning `OUTPUT_BYTES` bytes, so that what is
/// measured is the engine's journaling and not the work.
pub fn noop_saga(name: &str) -> SagaDefinition {
    SagaDefinition::new(name, 1, |ctx: SagaContext, n: u32| async move {
        for i in 0..STEPS {
            ctx.step(format!("s{i}"))
                .input(n)
                .run(|_, n: u32| async move { Ok::<_, StepError>(vec![n as u8; OUTPUT_BYTES]) })
                .await?;
        }
        Ok(n)
    })
}

/// A knob read from the environment, so a quiet machine can run longer for steadier figures.
pub fn knob(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
        Err(_) => default,
    }
}

/// `HODEI_BENCH_SCALE`: a positive multiplier of the benches' counts, volumes and repetitions,
/// default 1. A fraction shrinks them: CI runs every bench at 0.01 so that none rots.
pub fn scale() -> f64 {
    match std::env::var("HODEI_BENCH_SCALE") {
        Ok(v) => match v.parse::<f64>() {
            Ok(scale) if scale.is_finite() && scale > 0.0 => scale,
            _ => panic!("HODEI_BENCH_SCALE={v} is not a positive number"),
        },
        Err(_) => 1.0,
    }
}

/// `default` times `HODEI_BENCH_SCALE`, rounded, and at least 1.
pub fn scaled(default: usize) -> usize {
    ((default as f64 * scale()).round() as usize).max(1)
}

/// Whether the part `name` is to run: all of them, unless `HODEI_BENCH_ONLY` lists some.
pub fn selected(name: &str) -> bool {
    std::env::var("HODEI_BENCH_ONLY").map_or(true, |only| only.split(',').any(|part| part.trim() == name))
}

/// The runtime every bench runs in: what an application embedding hodei would build.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime")
}

/// Runs `total` jobs from `concurrency` workers, each taking the next job number as soon as its
/// last job is done (a closed loop: the offered load is what the system under test lets
/// through). Returns the wall time of the whole run.
pub async fn closed_loop<F, Fut>(concurrency: usize, total: usize, job: F) -> Duration
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, job) = (next.clone(), job.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    job(n).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a benchmark worker panicked");
    }
    started.elapsed()
}

/// Durable steps per second of a raw baseline's `step` (job `n` is step `n`): one warm-up round
/// as long as `noop_sagas`' (on step numbers the timed run does not reuse), then `steps` steps
/// timed, from `concurrency` closed-loop workers.
pub async fn raw_steps_per_second<F, Fut>(concurrency: usize, steps: usize, step: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let warm = concurrency.max(10) * STEPS as usize;
    closed_loop(concurrency, warm, {
        let step = step.clone();
        move |n| step(steps + n)
    })
    .await;
    rate(steps, closed_loop(concurrency, steps, step).await)
}

/// Starts one `noop_saga` run of `definition` and waits for its outcome, which must be a
/// completion: a benchmark that counts failures as work would flatter the engine.
pub async fn run_noop_saga(engine: &Engine, definition: &str, id: String) {
    let run = SagaRun::new(definition, id, &7u32).expect("a valid saga run");
    let handle = engine.start(run).await.expect("starting a saga");
    match handle.outcome::<u32>().await.expect("awaiting a saga") {
        Outcome::Completed(7) => {}
        other => panic!("saga {} ended with {other:?}", handle.id()),
    }
}

/// Runs `sagas` `noop_saga` runs through `concurrency` closed-loop workers on `engine`.
pub async fn noop_sagas(
    engine: &Engine,
    definition: &'static str,
    prefix: &str,
    concurrency: usize,
    sagas: usize,
) -> Duration {
    let (engine, prefix) = (engine.clone(), Arc::<str>::from(prefix));
    closed_loop(concurrency, sagas, move |n| {
        let (engine, id) = (engine.clone(), format!("{prefix}-{n}"));
        async move { run_noop_saga(&engine, definition, id).await }
    })
    .await
}

/// Opens a hodei engine with durability on, in `dir`: the real path every figure is taken on.
pub async fn sled_engine(dir: &Path, definitions: impl IntoIterator<Item = SagaDefinition>) -> Engine {
    let builder = definitions.into_iter().fold(Engine::builder().data_dir(dir), |b, d| b.register(d));
    builder.start().await.expect("starting the engine")
}

/// Per second, from a count and a duration.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// The middle value (the upper middle of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A markdown table, printed as the bench goes so that a long run shows progress.
pub struct Table {
    columns: usize,
}

impl Table {
    pub fn new(title: &str, headers: &[&str]) -> Self {
        println!("\n### {title}\n");
        println!("| {} |", headers.join(" | "));
        println!("|{}", " --- |".repeat(headers.len()));
        Self { columns: headers.len() }
    }

    pub fn row(&self, cells: &[String]) {
        assert_eq!(cells.len(), self.columns, "a row with the wrong number of cells");
        println!("| {} |", cells.join(" | "));
    }
}
