//! The durable primitives of issue 7, each against its baseline in the same run, on sled with
//! durability on (what they cost is journal writes and fsyncs):
//!
//! - **Fan-out/join**: one saga whose body runs `ctx.all` over 1,000 branches of one no-op step
//!   each, against one saga running the same 1,000 no-op steps one after another. The branches'
//!   step starts are journaled concurrently and share group commits; the sequence pays one
//!   durable write per step. Reported: both times and the speed-up.
//! - **Timer**: one saga of N `ctx.sleep(Duration::ZERO)`, against one saga of N no-op steps.
//!   A zero sleep is still a journaled timer (`SagaShared::sleep_until`): `TimerStarted` is
//!   written and flushed before the wait, the wait then finds its due time passed and returns
//!   without a round trip through the scheduler, and `TimerFired` is staged for the next
//!   write. So this is the bookkeeping of a durable timer (one durable write and one staged
//!   event, like a step's start and completion) without any time spent waiting. Reported:
//!   the cost per operation of each and their ratio.
//! - **Sleep**: one saga of N `ctx.sleep(1 ms)`, against one saga whose body takes as many
//!   `tokio::time::sleep(1 ms)` naps, unjournaled. Here every timer goes through the engine's
//!   scheduler (`timers.rs`): journaled, indexed, woken by the scheduler task, then staged as
//!   fired. Reported: the time per sleep of each and their ratio, what durability adds to a
//!   short wait. How late timers wake when 10,000 are due at once is `benches/timers.rs`.
//!
//! Run: `cargo bench --bench primitives`. Knobs: `HODEI_BENCH_SCALE` multiplies the branch
//! and operation counts (1,000 each, 200 sleeps; a fraction shrinks them, at least 1 each), `HODEI_BENCH_ROUNDS` (default 5) sets the rounds, and
//! `HODEI_BENCH_ONLY=fanout,timer,sleep` runs only the named parts. Each round opens a fresh engine
//! and runs both sides on it twice, in the order a, b, b, a, and its ratio is taken within
//! the round, so that load from other tenants of the machine hits both sides alike. The
//! medians of the rounds are reported; the ratios are the headline.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::{Table, knob, median, scaled, sled_engine, thousands};
use hodei::{Branch, Engine, Outcome, SagaContext, SagaDefinition, SagaRun, StepError};

fn main() {
    let rt = common::runtime();
    rt.block_on(async {
        println!("## hodei durable primitives (sled, durability on)");
        let rounds = knob("HODEI_BENCH_ROUNDS", 5).max(1);
        if common::selected("fanout") {
            fanout(rounds).await;
        }
        if common::selected("timer") {
            timer(rounds).await;
        }
        if common::selected("sleep") {
            sleep(rounds).await;
        }
    });
}

/// The unit of work on both sides of every figure: a step that does nothing, so that what is
/// measured is the engine's journaling.
async fn noop_step(ctx: &SagaContext) -> Result<(), StepError> {
    ctx.step("noop").run(|_, (): ()| async { Ok::<_, StepError>(()) }).await
}

/// `count` no-op steps as the branches of one `ctx.all`, then the join.
fn fanout_saga() -> SagaDefinition {
    SagaDefinition::new("fanout", 1, |ctx: SagaContext, count: usize| async move {
        let branches =
            (0..count).map(|_| Branch::new(|ctx: SagaContext| async move { noop_step(&ctx).await }));
        let joined = ctx.all("fanout", branches.collect()).await?;
        Ok(joined.len())
    })
}

/// The same `count` no-op steps, one after another.
fn sequence_saga() -> SagaDefinition {
    SagaDefinition::new("sequence", 1, |ctx: SagaContext, count: usize| async move {
        for _ in 0..count {
            noop_step(&ctx).await?;
        }
        Ok(count)
    })
}

/// `count` durable timers whose due time has already come.
fn zero_timers_saga() -> SagaDefinition {
    SagaDefinition::new("zero-timers", 1, |ctx: SagaContext, count: usize| async move {
        for _ in 0..count {
            ctx.sleep(Duration::ZERO).await;
        }
        Ok(count)
    })
}

/// The nap of the sleep figure: short enough that a run stays brief, long enough that no
/// sleep is due before the engine's scheduler sees it.
const NAP: Duration = Duration::from_millis(1);

/// `count` durable timers of `NAP` each, one after another.
fn durable_naps_saga() -> SagaDefinition {
    SagaDefinition::new("durable-naps", 1, |ctx: SagaContext, count: usize| async move {
        for _ in 0..count {
            ctx.sleep(NAP).await;
        }
        Ok(count)
    })
}

/// The same naps as tokio sleeps the journal never hears of: the floor of waiting `NAP`.
fn bare_naps_saga() -> SagaDefinition {
    SagaDefinition::new("bare-naps", 1, |_ctx: SagaContext, count: usize| async move {
        for _ in 0..count {
            tokio::time::sleep(NAP).await;
        }
        Ok(count)
    })
}

/// Runs one saga of `definition` over `count` operations to completion and returns its wall
/// time, from the start call to the outcome. A saga that did not complete all of them is a
/// failed benchmark, not a figure.
async fn timed_saga(engine: &Engine, definition: &str, id: String, count: usize) -> Duration {
    let started = Instant::now();
    let run = SagaRun::new(definition, id, &count).expect("a valid saga run");
    let handle = engine.start(run).await.expect("starting a saga");
    match handle.outcome::<usize>().await.expect("awaiting a saga") {
        Outcome::Completed(done) if done == count => started.elapsed(),
        other => panic!("saga {} ended with {other:?}", handle.id()),
    }
}

/// Round medians of two sides measured on the same engines, and of their ratio.
struct Paired {
    a: f64,
    b: f64,
    a_over_b: f64,
}

impl Paired {
    /// A table row: the figure's name, each side shown by `show` (of its seconds), and `ratio`.
    fn row(&self, table: &Table, figure: &str, show: impl Fn(f64) -> String, ratio: String) {
        table.row(&[figure.into(), show(self.a), show(self.b), ratio]);
    }
}

/// `rounds` rounds, each on a fresh sled engine in a temporary directory holding both
/// definitions: a warm-up saga of each side (so the timed runs find sled's trees and caches
/// warm), then timed sagas in the order a, b, b, a, each side's round time being the mean of
/// its two, so that neither side gains from going first into a fresher journal. Returns the
/// medians of each side's seconds and of the per-round ratio a / b.
async fn paired(rounds: usize, definitions: [SagaDefinition; 2], count: usize) -> Paired {
    let [a_name, b_name] = [definitions[0].name().to_owned(), definitions[1].name().to_owned()];
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let engine = sled_engine(dir.path(), definitions.clone()).await;
        let run = async |side: &str, id: String| timed_saga(&engine, side, id, count).await.as_secs_f64();
        run(&a_name, format!("warm-a-{round}")).await;
        run(&b_name, format!("warm-b-{round}")).await;
        let a1 = run(&a_name, format!("a1-{round}")).await;
        let b1 = run(&b_name, format!("b1-{round}")).await;
        let b2 = run(&b_name, format!("b2-{round}")).await;
        let a2 = run(&a_name, format!("a2-{round}")).await;
        engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
        let (ta, tb) = ((a1 + a2) / 2.0, (b1 + b2) / 2.0);
        a.push(ta);
        b.push(tb);
        ratios.push(ta / tb);
    }
    Paired { a: median(a), b: median(b), a_over_b: median(ratios) }
}

/// A table of `paired` figures: both sides and their ratio, each the median of the rounds.
fn paired_table(title: &str, rounds: usize, [a, b, ratio]: [&str; 3]) -> Table {
    let ratio = format!("{ratio} (median of the rounds' ratios)");
    Table::new(&format!("{title} (median of {rounds} rounds)"), &["figure", a, b, &ratio])
}

fn millis(secs: f64) -> String {
    format!("{:.1} ms", secs * 1e3)
}

fn micros(secs: f64) -> String {
    format!("{:.0} µs", secs * 1e6)
}

async fn fanout(rounds: usize) {
    let count = scaled(1_000);
    let figures = paired(rounds, [fanout_saga(), sequence_saga()], count).await;
    let title = format!(
        "Fan-out: one saga, {} no-op steps as `ctx.all` branches then the join, against the same steps in sequence",
        thousands(count as f64)
    );
    let table = paired_table(&title, rounds, ["fan-out + join", "sequence", "speed-up (sequence / fan-out)"]);
    figures.row(&table, "saga wall time", millis, format!("{:.1}x", 1.0 / figures.a_over_b));
    figures.row(&table, "steps per second", |secs| thousands(count as f64 / secs), String::new());
}

async fn timer(rounds: usize) {
    let count = scaled(1_000);
    let title = format!(
        "Timer: one saga of {} `ctx.sleep(Duration::ZERO)` (journaled timers, already due) against one of as many no-op steps",
        thousands(count as f64)
    );
    let headers = ["durable timer", "no-op step", "timer / step"];
    per_operation(rounds, [zero_timers_saga(), sequence_saga()], count, &title, headers).await;
}

async fn sleep(rounds: usize) {
    let count = scaled(200);
    let title = format!(
        "Sleep: one saga of {} `ctx.sleep(1 ms)` (journaled, woken by the scheduler) against as many unjournaled `tokio::time::sleep(1 ms)`",
        thousands(count as f64)
    );
    let headers = ["durable sleep", "tokio sleep", "durable / tokio"];
    per_operation(rounds, [durable_naps_saga(), bare_naps_saga()], count, &title, headers).await;
}

/// A `paired` figure read per operation: the cost of one of `count` on each side, their
/// ratio, and the saga wall times.
async fn per_operation(
    rounds: usize,
    definitions: [SagaDefinition; 2],
    count: usize,
    title: &str,
    headers: [&str; 3],
) {
    let figures = paired(rounds, definitions, count).await;
    let table = paired_table(title, rounds, headers);
    let per_op = |secs: f64| micros(secs / count as f64);
    figures.row(&table, "per operation", per_op, format!("{:.2}x", figures.a_over_b));
    figures.row(&table, "saga wall time", millis, String::new());
}
