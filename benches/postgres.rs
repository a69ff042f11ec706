//! Hodei on PostgreSQL against raw inserts of the same rows on the same server.
//!
//! Run: `eval "$(bash .ci/postgres)"; cargo bench --bench postgres --features postgres`.
//! Needs `HODEI_TEST_POSTGRES_URL` (skips with a message without it). Knobs:
//! `HODEI_BENCH_SCALE` multiplies the saga count (default 2,000 sagas of 10 steps, at least 1),
//! `HODEI_BENCH_ROUNDS` (default 3) sets the rounds; each round's ratio is taken within it.
//!
//! The baseline is what a journal on PostgreSQL must at least do to keep hodei's promises, with
//! the same commit policy as `PostgresStore`: per step two rows (a 16-byte start, then the
//! 100-byte output), each awaited until a group commit covers it, 256 writers at once, one
//! writer connection committing everything queued in one transaction of one `INSERT`.

#[allow(dead_code)]
mod common;
#[path = "common/postgres_admin.rs"]
mod postgres_admin;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{STEPS, Table, knob, median, noop_saga, noop_sagas, rate, scaled, thousands};
use hodei::{Engine, PostgresOptions, PostgresStore};
use postgres_admin::Admin;
use tokio::sync::{Notify, oneshot};

const CONCURRENCY: usize = 256;

fn main() {
    let Ok(url) = std::env::var("HODEI_TEST_POSTGRES_URL") else {
        println!("skipped: HODEI_TEST_POSTGRES_URL is not set (eval \"$(bash .ci/postgres)\" starts one)");
        return;
    };
    let rt = common::runtime();
    rt.block_on(async move {
        println!("## hodei on PostgreSQL");
        let rounds = knob("HODEI_BENCH_ROUNDS", 3).max(1);
        let sagas = scaled(2_000);
        let table = Table::new(
            &format!(
                "Step throughput on PostgreSQL: {CONCURRENCY} concurrent sagas of {STEPS} no-op steps, spread over 1, 2 and 3 engines on one database (median of {rounds} rounds)"
            ),
            &[
                "hodei, 1 engine: steps/s",
                "2 engines",
                "3 engines",
                "raw inserts, start and end durable /s",
                "1 engine / raw",
                "2 / 1 engine",
                "3 / 1 engine",
            ],
        );
        // Per round: steps/s on 1, 2 and 3 engines, then raw inserts; the ratios within it.
        let (mut rates, mut raws, mut ratios) = ([vec![], vec![], vec![]], vec![], [vec![], vec![], vec![]]);
        for round in 0..rounds {
            let schema = format!("hodei_bench_{}_{round}", std::process::id());
            let admin = Admin::connect(&url).await;
            let mut engines = [0.0; 3];
            for (n, rate) in engines.iter_mut().enumerate() {
                let schema = format!("{schema}_{}", n + 1);
                *rate = hodei_steps(&url, &schema, n + 1, sagas).await;
                admin.drop_schemas(&[&schema]).await;
            }
            let raw = raw_steps(&url, &format!("{schema}_raw"), sagas * STEPS as usize).await;
            admin.drop_schemas(&[&format!("{schema}_raw")]).await;
            for (all, rate) in rates.iter_mut().zip(engines) {
                all.push(rate);
            }
            raws.push(raw);
            for (all, ratio) in ratios.iter_mut().zip([engines[0] / raw, engines[1] / engines[0], engines[2] / engines[0]]) {
                all.push(ratio);
            }
        }
        let [one, two, three] = rates.map(median);
        let [per_raw, two_per_one, three_per_one] = ratios.map(median);
        table.row(&[
            thousands(one),
            thousands(two),
            thousands(three),
            thousands(median(raws)),
            format!("{:.0} %", 100.0 * per_raw),
            format!("{two_per_one:.2}"),
            format!("{three_per_one:.2}"),
        ]);
        idle_load(&url).await;
    });
}

/// What idle engines cost the database: transactions committed per second on it while three
/// engines with nothing to do beat (a 1 s lease here, so a beat every 200 ms; the default 10 s
/// lease beats every 2 s), against what the design issues per beat: a renewal, a claim, and a
/// look at the posted requests (a clean-up and a read), 4 statements, each prepared once per
/// connection and then only run: 1 transaction each in the server's count.
async fn idle_load(url: &str) {
    const ENGINES: usize = 3;
    let lease = Duration::from_secs(1);
    let schema = format!("hodei_bench_idle_{}", std::process::id());
    let admin = Admin::connect(url).await;
    let mut engines = Vec::with_capacity(ENGINES);
    for _ in 0..ENGINES {
        let options = PostgresOptions::default().schema(schema.as_str()).lease(lease);
        let store = PostgresStore::connect_with(url, options).await.expect("connecting the store");
        engines.push(
            Engine::builder().store(store).register(noop_saga("noop")).start().await.expect("starting"),
        );
    }
    let commits = || async {
        let sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()";
        // The statistics of the current transaction are frozen: a new snapshot per read.
        admin.0.batch_execute("SELECT pg_stat_clear_snapshot()").await.expect("clearing the snapshot");
        admin.0.query_one(sql, &[]).await.expect("reading the commit count").get::<_, i64>(0)
    };
    let window = Duration::from_secs(5);
    let before = commits().await;
    tokio::time::sleep(window).await;
    let after = commits().await;
    for engine in engines {
        engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
    }
    admin.drop_schemas(&[&schema]).await;
    // Two of the counted transactions are this function's own reads.
    let per_second = (after - before - 2) as f64 / window.as_secs_f64();
    let beats_per_second = ENGINES as f64 / (lease.as_secs_f64() / 5.0);
    let table = Table::new(
        &format!(
            "Idle load: {ENGINES} engines with nothing to do, a {lease:?} lease (a beat every {:?})",
            lease / 5
        ),
        &["transactions/s on the database", "per engine per beat", "by design per beat", "measured / design"],
    );
    let per_beat = per_second / beats_per_second;
    table.row(&[
        format!("{per_second:.1}"),
        format!("{per_beat:.2}"),
        "4".into(),
        format!("{:.2}", per_beat / 4.0),
    ]);
}

/// Steps/s of `sagas` no-op sagas spread over `engines` engines on one schema (each with its
/// own store, as separate processes would have), `CONCURRENCY` at once in all.
async fn hodei_steps(url: &str, schema: &str, engines: usize, sagas: usize) -> f64 {
    let mut started = Vec::with_capacity(engines);
    for _ in 0..engines {
        let store = PostgresStore::connect_with(url, PostgresOptions::default().schema(schema))
            .await
            .expect("connecting the store");
        let engine =
            Engine::builder().store(store).register(noop_saga("noop")).start().await.expect("starting");
        started.push(engine);
    }
    let share = |total: usize, n: usize| total / engines + usize::from(n < total % engines);
    let prefixes: Vec<(String, String)> =
        (0..engines).map(|n| (format!("warm-{n}"), format!("timed-{n}"))).collect();
    let warm = started.iter().zip(&prefixes).enumerate().map(|(n, (engine, (warm, _)))| {
        noop_sagas(engine, "noop", warm, share(CONCURRENCY, n), share(CONCURRENCY.max(10), n))
    });
    futures_util::future::join_all(warm).await;
    let begun = std::time::Instant::now();
    let timed = started.iter().zip(&prefixes).enumerate().map(|(n, (engine, (_, timed)))| {
        noop_sagas(engine, "noop", timed, share(CONCURRENCY, n), share(sagas, n))
    });
    futures_util::future::join_all(timed).await;
    let elapsed = begun.elapsed();
    for engine in started {
        engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
    }
    rate(sagas * STEPS as usize, elapsed)
}

/// Rows waiting for the next raw group commit, and who waits for them.
#[derive(Default)]
struct RawQueue {
    ids: Vec<String>,
    seqs: Vec<i64>,
    bodies: Vec<Vec<u8>>,
    waiters: Vec<oneshot::Sender<()>>,
}

/// Durable steps per second of raw inserts: the baseline described in the header.
async fn raw_steps(url: &str, schema: &str, steps: usize) -> f64 {
    let admin = Admin::connect(url).await;
    admin
        .0
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.raw_events (saga_id text COLLATE \"C\", seq bigint, body bytea, PRIMARY KEY (saga_id, seq))"
        ))
        .await
        .expect("creating the raw table");
    let queue = Arc::new(Mutex::new(RawQueue::default()));
    let wake = Arc::new(Notify::new());
    let done = Arc::new(Notify::new());
    let writer = tokio::spawn({
        let (queue, wake, done, url, schema) =
            (queue.clone(), wake.clone(), done.clone(), url.to_string(), schema.to_string());
        async move {
            let conn = Admin::connect(&url).await;
            let insert = conn
                .0
                .prepare(&format!(
                    "INSERT INTO {schema}.raw_events SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[])"
                ))
                .await
                .expect("preparing");
            loop {
                let batch = std::mem::take(&mut *queue.lock().expect("raw queue"));
                if batch.waiters.is_empty() {
                    tokio::select! {
                        () = wake.notified() => continue,
                        () = done.notified() => return,
                    }
                }
                conn.0.batch_execute("BEGIN").await.expect("begin");
                conn.0.execute(&insert, &[&batch.ids, &batch.seqs, &batch.bodies]).await.expect("raw insert");
                conn.0.batch_execute("COMMIT").await.expect("commit");
                for waiter in batch.waiters {
                    let _ = waiter.send(());
                }
            }
        }
    });
    let write = {
        let (queue, wake) = (queue.clone(), wake.clone());
        move |saga: usize, seq: i64, body: Vec<u8>| {
            let (tx, rx) = oneshot::channel();
            {
                let mut q = queue.lock().expect("raw queue");
                q.ids.push(format!("saga-{saga}"));
                q.seqs.push(seq);
                q.bodies.push(body);
                q.waiters.push(tx);
            }
            wake.notify_one();
            rx
        }
    };
    let step = move |n: usize| {
        let write = write.clone();
        async move {
            let (saga, seq) = (n / STEPS as usize, 2 * (n % STEPS as usize) as i64);
            write(saga, seq, vec![n as u8; 16]).await.expect("the raw writer stopped");
            write(saga, seq + 1, vec![n as u8; common::OUTPUT_BYTES]).await.expect("the raw writer stopped");
        }
    };
    let per_second = common::raw_steps_per_second(CONCURRENCY, steps, step).await;
    done.notify_one();
    writer.await.expect("the raw writer panicked");
    per_second
}
