//! `#[saga]`/`#[step]` against the same saga written with the builder API, in one run.
//!
//! Both run sagas of ten steps on the in-memory store, so that what differs is only what the
//! macros generate; on sled the fsyncs would drown it. Rounds alternate between the two forms
//! and each form's median round is reported, so that drift on a shared machine hits both
//! alike. Target: macro time / builder time <= 1.05.
//!
//! `cargo bench --bench macros`. Knobs: `HODEI_BENCH_SAGAS` (default 5,000 times
//! `HODEI_BENCH_SCALE`, e.g. 20000 for longer rounds) sets the sagas of a round (the warm-up
//! rounds are 500 sagas times the scale); `HODEI_BENCH_ROUNDS` (default 10) sets the rounds
//! of each form.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use hodei::{Engine, MemoryStore, Outcome, SagaContext, SagaDefinition, StepContext, StepError, saga, step};

const STEPS: u32 = 10;

#[step]
async fn work(_ctx: StepContext, n: u32) -> Result<u32, StepError> {
    Ok(n + 1)
}

#[saga(name = "macro-form")]
async fn macro_form(ctx: SagaContext, n: u32) -> Result<u32, StepError> {
    let mut n = n;
    for _ in 0..STEPS {
        n = work(&ctx, n).await?;
    }
    Ok(n)
}

fn builder_form() -> SagaDefinition {
    SagaDefinition::new("builder-form", 1, |ctx: SagaContext, n: u32| async move {
        let mut n = n;
        for _ in 0..STEPS {
            n = ctx.step("work").input(n).run(|_, n: u32| async move { Ok::<_, StepError>(n + 1) }).await?;
        }
        Ok(n)
    })
}

/// Runs `sagas` sagas of one form, 64 at a time, and returns the elapsed time.
async fn round(engine: &Engine, macro_form_round: bool, round: usize, sagas: usize) -> Duration {
    let start = Instant::now();
    let mut batch = Vec::new();
    for i in 0..sagas {
        let id = format!("r{round}-{i}");
        let engine = engine.clone();
        batch.push(tokio::spawn(async move {
            let outcome = if macro_form_round {
                macro_form::start(&engine, id, &0).await.expect("start").outcome().await.expect("outcome")
            } else {
                let run = hodei::SagaRun::new("builder-form", id, &0u32).expect("run");
                engine.start(run).await.expect("start").outcome::<u32>().await.expect("outcome")
            };
            assert_eq!(outcome, Outcome::Completed(STEPS));
        }));
        if batch.len() == 64 {
            for task in batch.drain(..) {
                task.await.expect("saga task");
            }
        }
    }
    for task in batch {
        task.await.expect("saga task");
    }
    start.elapsed()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let sagas = common::knob("HODEI_BENCH_SAGAS", common::scaled(5_000)).max(1);
    let rounds = common::knob("HODEI_BENCH_ROUNDS", 10).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let engine = Engine::builder()
            .store(MemoryStore::new())
            .register(macro_form::definition())
            .register(builder_form())
            .start()
            .await
            .expect("engine");
        // Warm both paths (allocator, caches) before measuring.
        let warm = common::scaled(500);
        round(&engine, true, 0, warm).await;
        round(&engine, false, 1, warm).await;
        let (mut macro_times, mut builder_times) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let macro_first = r % 2 == 0;
            let first = round(&engine, macro_first, 2 + 2 * r, sagas).await;
            let second = round(&engine, !macro_first, 3 + 2 * r, sagas).await;
            let (m, b) = if macro_first { (first, second) } else { (second, first) };
            macro_times.push(m);
            builder_times.push(b);
        }
        let (m, b) = (median(macro_times), median(builder_times));
        let steps = (sagas * STEPS as usize) as f64;
        println!("| figure | macros | builder | ratio (target <= 1.05) |");
        println!("|---|---|---|---|");
        println!(
            "| {sagas} sagas x {STEPS} steps, in-memory store, median of {rounds} rounds | {:.1} ms ({:.0} steps/s) | {:.1} ms ({:.0} steps/s) | {:.3} |",
            m.as_secs_f64() * 1e3,
            steps / m.as_secs_f64(),
            b.as_secs_f64() * 1e3,
            steps / b.as_secs_f64(),
            m.as_secs_f64() / b.as_secs_f64()
        );
    });
}
