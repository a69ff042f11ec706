//! Durable timers at scale: how late 10,000 sagas wake when their due times come five a
//! millisecond, against 10,000 tokio tasks sleeping until the very same due times in the same
//! process (tokio's timer wheel is what the engine's scheduler itself sleeps on, so it is the
//! floor). A saga's lateness is measured from its journaled due time to the moment its body
//! sees `ctx.sleep` return; the completion written after that is part of the load that the
//! later wake-ups compete with, as in a busy engine, but not part of any one wake-up.
//!
//! Each round starts the sleepers on a fresh sled engine (durability on), all due
//! `SETUP_BUDGET` after the round began plus their share of the `SPREAD`, then runs the tokio
//! tasks the same way. Both are for 10,000 sleepers and shrink or grow with their count (the
//! budget never below `MIN_SETUP_BUDGET`), so that they stay due five a millisecond. A round
//! whose sagas were not all asleep before the first due time fails: its figure would measure
//! starting, not waking. Reported: the medians over the rounds of p50 / p99 / max lateness of
//! each side and of the per-round p99 ratio.
//!
//! Run: `cargo bench --bench timers`. Knobs: `HODEI_BENCH_SCALE` multiplies the 10,000
//! sleepers (a fraction shrinks them, at least 1), `HODEI_BENCH_ROUNDS` (default 3) sets the
//! rounds.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;
#[path = "../hodei-core/tests/support/sleepers.rs"]
#[allow(dead_code)]
mod sleepers;

use std::time::{Duration, Instant, SystemTime};

use common::{Table, knob, median, scaled};
use hodei::{Engine, EngineConfig, Outcome};
use tokio::sync::oneshot;

/// The sleepers the budget and spread below are for.
const SLEEPERS: usize = 10_000;
/// Every sleeper is due at least this long after its round began, which covers starting all
/// of them on this machine's release build (about a second for 10,000 on sled).
const SETUP_BUDGET: Duration = Duration::from_secs(4);
/// The least budget of a round with fewer sleepers: it covers starting a few hundred in a
/// debug build on a loaded machine (CI's smoke run at `HODEI_BENCH_SCALE=0.01`).
const MIN_SETUP_BUDGET: Duration = Duration::from_secs(2);
/// The due times are spread evenly over this span after the budget.
const SPREAD: Duration = Duration::from_secs(2);

/// When `sleepers` sleepers are due: sleeper `n` at `budget + spread * n / sleepers` after its
/// round began, the budget and spread scaled from those for `SLEEPERS`.
#[derive(Clone, Copy)]
struct Schedule {
    budget: Duration,
    spread: Duration,
    sleepers: usize,
}

impl Schedule {
    fn new(sleepers: usize) -> Self {
        let share = sleepers as f64 / SLEEPERS as f64;
        Self {
            budget: SETUP_BUDGET.mul_f64(share).max(MIN_SETUP_BUDGET),
            spread: SPREAD.mul_f64(share),
            sleepers,
        }
    }

    fn due_after(self, n: usize) -> Duration {
        self.budget + self.spread * n as u32 / self.sleepers as u32
    }
}

fn main() {
    let rt = common::runtime();
    rt.block_on(async {
        let sagas = scaled(10_000);
        let rounds = knob("HODEI_BENCH_ROUNDS", 3).max(1);
        println!("## hodei durable timers at scale (sled, durability on)");
        let (mut ours, mut floor, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let hodei = Percentiles::of(hodei_lateness(sagas).await);
            let tokio = Percentiles::of(tokio_lateness(sagas).await);
            println!("round {round}: hodei {hodei}; tokio {tokio}");
            ratios.push(hodei.p99 / tokio.p99.max(1e-6));
            ours.push(hodei);
            floor.push(tokio);
        }
        let table = Table::new(
            &format!(
                "Wake-up lateness of {sagas} sleepers due five a millisecond (median of {rounds} rounds)"
            ),
            &[
                "figure",
                "hodei sagas (`ctx.sleep`)",
                "tokio tasks (`sleep_until`), same due times",
                "hodei / tokio",
            ],
        );
        let row = |figure: &str, pick: fn(&Percentiles) -> f64, ratio: String| {
            let show = |side: &[Percentiles]| format!("{:.2} ms", median(side.iter().map(pick).collect()));
            table.row(&[figure.into(), show(&ours), show(&floor), ratio]);
        };
        row("p50 lateness", |p| p.p50, String::new());
        row("p99 lateness", |p| p.p99, format!("{:.1}x (median of the rounds' ratios)", median(ratios)));
        row("max lateness", |p| p.max, String::new());
    });
}

/// Starts `sagas` sleepers on a fresh sled engine and returns how late each woke.
async fn hodei_lateness(sagas: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let wakes = sleepers::wakes(sagas);
    let mut config = EngineConfig::default();
    // The due-time subscriber must not miss a `TimerStarted`.
    config.event_buffer = 8 * sagas;
    let engine = Engine::builder()
        .data_dir(dir.path())
        .config(config)
        .register(sleepers::sleeper(wakes.clone()))
        .start()
        .await
        .expect("starting the engine");
    let (asleep_tx, asleep) = oneshot::channel();
    let due_times = sleepers::collect_due_times(&engine, sagas, asleep_tx);
    let began = Instant::now();
    let schedule = Schedule::new(sagas);
    // A saga's sleep is relative to when it journals its timer, so each one subtracts the time
    // the round has already taken: all of them then share the round's schedule.
    let handles = sleepers::start_sleepers(&engine, sagas, move |n| {
        schedule.due_after(n).saturating_sub(began.elapsed())
    })
    .await;
    asleep.await.expect("the subscriber saw every TimerStarted");
    let all_asleep = began.elapsed();
    assert!(
        all_asleep < schedule.budget,
        "starting {sagas} sleepers took {all_asleep:?}, past the first due time: raise SETUP_BUDGET (or MIN_SETUP_BUDGET)"
    );
    for handle in &handles {
        match handle.outcome::<()>().await.expect("awaiting a sleeper") {
            Outcome::Completed(()) => {}
            other => panic!("sleeper {} ended with {other:?}", handle.id()),
        }
    }
    let late = sleepers::lateness(&wakes, &due_times.await.expect("collecting due times"));
    engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
    late
}

/// `tasks` tokio tasks sleeping until the same schedule as the sleepers, with nothing else to do.
async fn tokio_lateness(tasks: usize) -> Vec<Duration> {
    let began = (Instant::now(), SystemTime::now());
    let schedule = Schedule::new(tasks);
    let handles: Vec<_> = (0..tasks)
        .map(|n| {
            let due = schedule.due_after(n);
            tokio::spawn(async move {
                tokio::time::sleep_until((began.0 + due).into()).await;
                // Measured on the wall clock, as the sagas are: due times are journaled as
                // Unix milliseconds.
                SystemTime::now().duration_since(began.1 + due).unwrap_or_default()
            })
        })
        .collect();
    let mut late = Vec::with_capacity(tasks);
    for handle in handles {
        late.push(handle.await.expect("a sleeping task"));
    }
    late
}

/// Lateness percentiles in milliseconds.
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut late: Vec<Duration>) -> Self {
        late.sort();
        let at =
            |per_mille: usize| late[(late.len() * per_mille / 1000).min(late.len() - 1)].as_secs_f64() * 1e3;
        Self { p50: at(500), p99: at(990), max: at(1000) }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", self.p50, self.p99, self.max)
    }
}
