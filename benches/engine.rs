//! The engine on sled with durability on, each figure against raw sled measured in the same run:
//! step throughput, recovery of sagas in flight, and bytes on disk per step.
//!
//! Run: `cargo bench --bench engine`. Knobs: `HODEI_BENCH_SCALE` multiplies every saga count
//! (a fraction shrinks them, at least 1 each), `HODEI_BENCH_RECOVERY_SAGAS` (default 10,000
//! times the scale) sets the recovery figure's saga count outright,
//! `HODEI_BENCH_ROUNDS` (default 5) sets the throughput rounds, and
//! `HODEI_BENCH_ONLY=throughput,recovery,storage` runs only the named parts.
//! The ratios are the headline; absolute numbers drift with the machine.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    OUTPUT_BYTES, STEPS, Table, closed_loop, knob, median, noop_saga, noop_sagas, rate, scaled, sled_engine,
    thousands,
};
use hodei::{Outcome, SagaContext, SagaDefinition, SagaId, SagaRun, SledStore, StepError};
use tokio::sync::{mpsc, oneshot};

fn main() {
    let rt = common::runtime();
    rt.block_on(async {
        println!("## hodei engine benchmarks (sled, durability on)");
        if common::selected("throughput") {
            throughput().await;
        }
        if common::selected("recovery") {
            recovery().await;
        }
        if common::selected("storage") {
            storage().await;
        }
    });
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temporary directory")
}

/// Raw sled opened exactly as `SledStore` opens it, so the baseline differs from hodei only by
/// what hodei adds on top.
fn raw_sled(path: &Path) -> sled::Db {
    sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .expect("opening raw sled")
}

/// The same key shape as hodei's journal (`id ‖ 0xFF ‖ seq`), so key length is no difference.
fn raw_key(saga: usize, seq: u64) -> Vec<u8> {
    let mut key = format!("saga-{saga}").into_bytes();
    key.push(0xFF);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Group commit for the raw baseline, built the way hodei's store builds it: one std thread calls
/// the synchronous `db.flush()` and wakes every waiter queued before that flush began. sled
/// 0.34.7's `flush_async` deadlocks when awaited concurrently (spacejam/sled#1308), so it
/// cannot serve as the baseline.
struct GroupFlush {
    shared: Arc<(Mutex<FlushQueue>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct FlushQueue {
    waiters: Vec<oneshot::Sender<()>>,
    closed: bool,
}

impl GroupFlush {
    fn start(db: sled::Db) -> Self {
        let shared = Arc::new((Mutex::new(FlushQueue::default()), Condvar::new()));
        let worker = shared.clone();
        let thread = std::thread::spawn(move || {
            let (queue, wake) = &*worker;
            loop {
                let batch = {
                    let mut q = queue.lock().expect("flush queue");
                    while q.waiters.is_empty() && !q.closed {
                        q = wake.wait(q).expect("flush queue");
                    }
                    if q.waiters.is_empty() {
                        return;
                    }
                    std::mem::take(&mut q.waiters)
                };
                db.flush().expect("flushing raw sled");
                for waiter in batch {
                    let _ = waiter.send(());
                }
            }
        });
        Self { shared, thread: Some(thread) }
    }

    /// Resolves once everything written before the call is on disk.
    async fn durable(&self) {
        let (tx, rx) = oneshot::channel();
        self.shared.0.lock().expect("flush queue").waiters.push(tx);
        self.shared.1.notify_one();
        rx.await.expect("the raw flusher stopped");
    }
}

impl Drop for GroupFlush {
    fn drop(&mut self) {
        self.shared.0.lock().expect("flush queue").closed = true;
        self.shared.1.notify_one();
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the raw flusher panicked");
        }
    }
}

/// Durable steps per second through raw sled in `dir`, `concurrency` writers in a closed loop.
/// With `start_and_end`, a step is two inserts each awaited until a group flush covers it (a
/// small start record, then the 100-byte output): the least a journal must do to keep hodei's
/// promises (a step's start durable before its body runs, its end before the saga sees it).
/// Without, one durable 100-byte insert: a journal that stored only the step outputs.
async fn raw_durable_steps(dir: &Path, concurrency: usize, steps: usize, start_and_end: bool) -> f64 {
    let db = raw_sled(&journal(dir));
    let tree = db.open_tree("events").expect("opening a raw tree");
    let flusher = Arc::new(GroupFlush::start(db.clone()));
    let step = move |n: usize| {
        let (tree, flusher) = (tree.clone(), flusher.clone());
        async move {
            let (saga, seq) = (n / STEPS as usize, 2 * (n % STEPS as usize) as u64);
            if start_and_end {
                tree.insert(raw_key(saga, seq), vec![n as u8; 16]).expect("raw insert");
                flusher.durable().await;
            }
            tree.insert(raw_key(saga, seq + 1), vec![n as u8; OUTPUT_BYTES]).expect("raw insert");
            flusher.durable().await;
        }
    };
    // The same warm-up round as hodei's (`hodei_steps`).
    common::raw_steps_per_second(concurrency, steps, step).await
}

/// Durable steps per second of `sagas` no-op sagas through a fresh engine.
async fn hodei_steps(concurrency: usize, sagas: usize) -> f64 {
    let dir = tempdir();
    let engine = sled_engine(dir.path(), [noop_saga("noop")]).await;
    // One round of sagas first, so the timed run finds sled's trees and caches warm.
    noop_sagas(&engine, "noop", "warm", concurrency, concurrency.max(10)).await;
    let elapsed = noop_sagas(&engine, "noop", "timed", concurrency, sagas).await;
    engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
    rate(sagas * STEPS as usize, elapsed)
}

async fn throughput() {
    // Rounds alternate hodei and raw sled, and the ratio is taken within each round, so that
    // the load other tenants put on this machine shifts both sides of a ratio alike.
    let rounds = knob("HODEI_BENCH_ROUNDS", 5).max(1);
    let table = Table::new(
        &format!(
            "Step throughput: closed loop, sagas of 10 no-op steps with 100-byte outputs (median of {rounds} rounds)"
        ),
        &[
            "concurrency",
            "hodei durable steps/s",
            "raw sled, start and end durable /s",
            "hodei / that",
            "raw sled, one durable insert /s",
            "hodei / that",
            "target",
        ],
    );
    for (concurrency, sagas) in [(1, scaled(100)), (16, scaled(800)), (256, scaled(4_000))] {
        let steps = sagas * STEPS as usize;
        let (mut ours, mut floor, mut one, mut to_floor, mut to_one) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let round_ours = hodei_steps(concurrency, sagas).await;
            let round_floor = raw_durable_steps(tempdir().path(), concurrency, steps, true).await;
            let round_one = raw_durable_steps(tempdir().path(), concurrency, steps, false).await;
            ours.push(round_ours);
            floor.push(round_floor);
            one.push(round_one);
            to_floor.push(round_ours / round_floor);
            to_one.push(round_ours / round_one);
        }
        let target = if concurrency == 256 { ">= 20,000 steps/s and >= 50 % of start and end" } else { "" };
        table.row(&[
            concurrency.to_string(),
            thousands(median(ours)),
            thousands(median(floor)),
            format!("{:.0} %", 100.0 * median(to_floor)),
            thousands(median(one)),
            format!("{:.0} %", 100.0 * median(to_one)),
            target.into(),
        ]);
    }
}

/// Two steps. With `parked`, the second step reports on it and never finishes, which leaves the
/// saga in flight with its first step journaled; without, it completes at once. `first_runs`
/// counts executions of the first step, which a resumed saga must replay, not run.
fn recovery_saga(parked: Option<mpsc::UnboundedSender<()>>, first_runs: Arc<AtomicUsize>) -> SagaDefinition {
    SagaDefinition::new("recover", 1, move |ctx: SagaContext, n: u32| {
        let (parked, first_runs) = (parked.clone(), first_runs.clone());
        async move {
            ctx.step("s0")
                .input(n)
                .run(|_, n: u32| {
                    first_runs.fetch_add(1, Ordering::Relaxed);
                    async move { Ok::<_, StepError>(vec![n as u8; OUTPUT_BYTES]) }
                })
                .await?;
            ctx.step("s1")
                .input(n)
                .run(|_, n: u32| {
                    let parked = parked.clone();
                    async move {
                        if let Some(parked) = parked {
                            let _ = parked.send(());
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, StepError>(vec![n as u8; OUTPUT_BYTES])
                    }
                })
                .await?;
            Ok(n)
        }
    })
}

fn recovery_id(n: usize) -> String {
    format!("recover-{n}")
}

/// Leaves `sagas` sagas in flight in `dir`, each with its first step journaled and its second
/// started, and the engine closed.
async fn park_sagas(dir: &Path, sagas: usize) {
    let (parked_tx, mut parked) = mpsc::unbounded_channel();
    let engine = sled_engine(dir, [recovery_saga(Some(parked_tx), Arc::default())]).await;
    let starter = engine.clone();
    closed_loop(64, sagas, move |n| {
        let engine = starter.clone();
        async move {
            let run = SagaRun::new("recover", recovery_id(n), &(n as u32)).expect("a valid saga run");
            engine.start(run).await.expect("starting a saga");
        }
    })
    .await;
    // A second step's body runs only after the first step's completion is durable.
    for _ in 0..sagas {
        parked.recv().await.expect("a parked saga reported");
    }
    let report = engine.shutdown(Duration::ZERO).await.expect("shutting down");
    assert_eq!(report.in_flight.len(), sagas, "every saga must be left in flight");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a directory");
    for entry in std::fs::read_dir(from).expect("listing a directory") {
        let entry = entry.expect("listing a directory");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copying a file");
        }
    }
}

/// What a scan of a whole sled database found.
struct Scan {
    elapsed: Duration,
    keys: usize,
    /// Bytes of the live keys and values: the data, without sled's log and page overhead.
    bytes: u64,
}

/// Opens raw sled on `path` and reads every key and value of every tree: the least any
/// recovery has to do.
fn scan_everything(path: &Path) -> Scan {
    let started = Instant::now();
    let db = raw_sled(path);
    let (mut keys, mut bytes) = (0, 0);
    for name in db.tree_names() {
        for item in db.open_tree(name).expect("opening a tree").iter() {
            let (key, value) = item.expect("reading raw sled");
            keys += 1;
            bytes += (key.len() + value.len()) as u64;
        }
    }
    Scan { elapsed: started.elapsed(), keys, bytes }
}

async fn recovery() {
    let sagas = knob("HODEI_BENCH_RECOVERY_SAGAS", scaled(10_000)).max(1);
    let dir = tempdir();
    park_sagas(dir.path(), sagas).await;

    // The baseline reads a copy, so the engine below recovers from the untouched directory.
    let copy = tempdir();
    copy_dir(&journal(dir.path()), &journal(copy.path()));
    let Scan { elapsed: scan, keys, .. } = scan_everything(&journal(copy.path()));

    let first_runs = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let engine = sled_engine(dir.path(), [recovery_saga(None, first_runs.clone())]).await;
    let start_returned = started.elapsed();
    for n in 0..sagas {
        let id = SagaId::new(recovery_id(n)).expect("a valid saga id");
        let handle = engine.handle(&id).expect("a resumed saga");
        match handle.outcome::<u32>().await.expect("awaiting a resumed saga") {
            Outcome::Completed(out) if out as usize == n => {}
            other => panic!("resumed saga {id} ended with {other:?}"),
        }
    }
    let all_done = started.elapsed();
    engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");

    let table = Table::new(
        &format!("Recovery: {} sagas in flight, each resumed at its second step", thousands(sagas as f64)),
        &["figure", "hodei", "raw sled open + full scan", "hodei / raw", "target"],
    );
    let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    let ratio = |d: Duration| format!("{:.1}x", d.as_secs_f64() / scan.as_secs_f64());
    table.row(&[
        "all resumed sagas completed".into(),
        secs(all_done),
        format!("{} ({keys} keys)", secs(scan)),
        ratio(all_done),
        "<= 2 s for 10,000".into(),
    ]);
    table.row(&[
        "`start()` returned".into(),
        secs(start_returned),
        secs(scan),
        ratio(start_returned),
        String::new(),
    ]);
    let reruns = first_runs.load(Ordering::Relaxed);
    table.row(&[
        "journaled first steps run again".into(),
        reruns.to_string(),
        String::new(),
        String::new(),
        "0".into(),
    ]);
    // A bench that measured recovery by re-running work would measure the wrong thing.
    assert_eq!(reruns, 0, "resumed sagas ran journaled first steps again");
}

/// Bytes of every file under `path`, as `ls -l` would add them up.
fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .expect("listing a directory")
        .map(|entry| {
            let entry = entry.expect("listing a directory");
            let meta = entry.metadata().expect("reading file metadata");
            if meta.is_dir() { dir_size(&entry.path()) } else { meta.len() }
        })
        .sum()
}

fn journal(dir: &Path) -> PathBuf {
    dir.join("journal")
}

/// Both sides of the storage figure write at this concurrency, with a flush per write as the
/// engine does, since sled's log grows with the number of flushes as well as with the data.
const STORAGE_CONCURRENCY: usize = 64;

async fn storage() {
    let sagas = scaled(2_000);
    let steps = sagas * STEPS as usize;

    let dir = tempdir();
    let engine = sled_engine(dir.path(), [noop_saga("noop")]).await;
    noop_sagas(&engine, "noop", "store", STORAGE_CONCURRENCY, sagas).await;
    engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
    drop(engine);
    let ours = dir_size(&journal(dir.path()));
    // Reopening also proves the engine released the directory.
    let ours_reported =
        SledStore::open(dir.path()).expect("reopening the store").size_on_disk().expect("size");
    let ours_data = scan_everything(&journal(dir.path())).bytes;

    let raw_dir = tempdir();
    raw_durable_steps(raw_dir.path(), STORAGE_CONCURRENCY, steps, false).await;
    let raw = dir_size(&journal(raw_dir.path()));
    let raw_reported = raw_sled(&journal(raw_dir.path())).size_on_disk().expect("size");
    let raw_data = scan_everything(&journal(raw_dir.path())).bytes;

    let table = Table::new(
        &format!(
            "Storage: {} sagas x {STEPS} steps, 100-byte outputs, bytes per step",
            thousands(sagas as f64)
        ),
        &["figure", "hodei", "raw sled, one durable 100-byte insert a step", "hodei / raw"],
    );
    for (figure, ours, raw) in [
        ("on disk: files under journal/", ours, raw),
        ("on disk: sled's size_on_disk", ours_reported, raw_reported),
        ("live keys and values", ours_data, raw_data),
    ] {
        let per_step = |bytes: u64| format!("{:.0} B", bytes as f64 / steps as f64);
        table.row(&[
            figure.into(),
            per_step(ours),
            per_step(raw),
            format!("{:.2}x", ours as f64 / raw as f64),
        ]);
    }
}
