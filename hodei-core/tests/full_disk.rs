//! A full disk: the sled store's data directory on a small tmpfs, filled by sagas whose steps
//! return large outputs.
//!
//! Writes are refused with a typed error once the filesystem is under the store's free space
//! reserve; nothing acknowledged (a step result a saga body was given, a start that returned,
//! an outcome) is lost; the directory opens again, never `Damaged`, and every journal reads
//! whole; once space is freed the same engine goes on, without a restart: the sagas the refusal
//! stopped resume and finish, new ones run.
//!
//! Mounting takes root: without it the tests print that they were skipped, unless
//! `HODEI_REQUIRE_MOUNT=1` (set by `.ci/run`). `cargo test -p hodei-core --test full_disk`.
#![cfg(all(feature = "sled", target_os = "linux"))]

#[path = "support/tmpfs.rs"]
mod tmpfs;

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hodei_core::{
    Engine, Error, Event, EventStore, Outcome, SagaDefinition, SagaId, SagaRun, SagaStatus, SledError,
    SledOptions, SledStore, StepError,
};
use tmpfs::Tmpfs;
use tokio::sync::Notify;

/// The filesystem, and what the test keeps of it to free later.
const FILESYSTEM: u64 = 24 << 20;
const FILLER: usize = 8 << 20;
/// Over what sled needs to flush what it took and write a node of its tree whole (about
/// seventeen outputs) and a segment.
const RESERVE: u64 = 4 << 20;
/// Each step's output: large, so that the filesystem fills within a few dozen sagas, and
/// enough for sled to put nodes of its tree in blob files (whose failed write hangs it).
const OUTPUT: usize = 48 * 1024;
const STEPS: u32 = 6;
/// The seed of the saga stopped halfway, and of one started after the others.
const GATED: u32 = 999_999;
const AGAIN: u32 = 1_000_000;

/// The step results the saga bodies were given, by saga and step: each was on disk before.
#[derive(Clone, Default)]
struct Acknowledged(Arc<Mutex<BTreeSet<(String, u32)>>>);

impl Acknowledged {
    fn get(&self) -> BTreeSet<(String, u32)> {
        self.0.lock().unwrap().clone()
    }
}

/// Holds the first step of saga [`GATED`] once, so that the test takes the filesystem's space
/// while it runs: its end is the write refused.
#[derive(Default)]
struct Gate {
    armed: AtomicBool,
    entered: Notify,
    go: Notify,
}

impl Gate {
    fn armed() -> Arc<Self> {
        Arc::new(Self { armed: AtomicBool::new(true), ..Self::default() })
    }

    async fn pass(&self, seed: u32) {
        if seed == GATED && self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.go.notified().await;
        }
    }
}

fn output(seed: u32, step: u32) -> String {
    (0..OUTPUT as u32).map(|i| char::from(b'a' + ((seed + step + i) % 26) as u8)).collect()
}

fn definition(acknowledged: Acknowledged, gate: Arc<Gate>) -> SagaDefinition {
    SagaDefinition::new("fill", 1, move |ctx, seed: u32| {
        let (acknowledged, gate) = (acknowledged.clone(), gate.clone());
        async move {
            let mut total = 0u64;
            for step in 0..STEPS {
                let gate = gate.clone();
                let written: String = ctx
                    .step(format!("write-{step}"))
                    .input(seed)
                    .run(move |_, seed: u32| {
                        let gate = gate.clone();
                        async move {
                            gate.pass(seed).await;
                            Ok::<_, StepError>(output(seed, step))
                        }
                    })
                    .await?;
                assert_eq!(written, output(seed, step));
                acknowledged.0.lock().unwrap().insert((ctx.id().to_string(), step));
                total += written.len() as u64;
            }
            Ok(total)
        }
    })
}

fn options() -> SledOptions {
    SledOptions::default().free_space_reserve(RESERVE)
}

async fn start_engine(store: Arc<SledStore>, acknowledged: &Acknowledged, gate: &Arc<Gate>) -> Engine {
    let definition = definition(acknowledged.clone(), gate.clone());
    Engine::builder().store(store).register(definition).start().await.unwrap()
}

fn run(seed: u32) -> SagaRun {
    SagaRun::new("fill", format!("fill-{seed}"), &seed).unwrap()
}

/// What filling the disk left: the sagas started, those that finished, the start refused, and
/// the saga a refused write stopped halfway.
struct Filled {
    started: Vec<SagaId>,
    finished: BTreeSet<SagaId>,
    refused: SagaId,
    stopped: SagaId,
}

/// Fills the filesystem: starts sagas one after the other, each run until it finishes or the
/// store refuses one of its writes, until the store refuses a start. Then makes room for saga
/// [`GATED`], and takes it back while its first step runs: the step's end is refused, and the
/// saga stops halfway. The space is held by a file named `filler`, which the tests delete to
/// free it.
async fn fill(engine: &Engine, store: &SledStore, disk: &Tmpfs, gate: &Gate) -> Filled {
    let mut writable = store.writable().unwrap();
    let mut started = Vec::new();
    let mut finished = BTreeSet::new();
    let refused = 'filling: {
        for seed in 0..GATED {
            let handle = match engine.start(run(seed)).await {
                Ok(handle) => handle,
                Err(refusal) => {
                    assert_no_space(&refusal);
                    break 'filling run(seed).id().clone();
                }
            };
            tokio::select! {
                outcome = handle.outcome::<u64>() => {
                    assert_eq!(outcome.unwrap(), Outcome::Completed(u64::from(STEPS) * OUTPUT as u64));
                    finished.insert(handle.id().clone());
                }
                // Stopped by a refused write: it waits for room, and the next start is refused.
                _ = writable.wait_for(|takes| !*takes) => {}
            }
            started.push(handle.id().clone());
        }
        unreachable!("the filesystem never filled");
    };
    assert!(store.history(&refused).unwrap().is_empty(), "a refused start wrote its saga");

    let filler = disk.path().join("filler");
    std::fs::remove_file(&filler).unwrap();
    let stopped = engine.start(run(GATED)).await.unwrap().id().clone();
    gate.entered.notified().await;
    // Under the reserve, with room left for what sled holds unflushed.
    let available = fs2::available_space(disk.path()).unwrap();
    disk.fill("filler", (available - RESERVE / 2) as usize);
    gate.go.notify_one();
    writable.wait_for(|takes| !*takes).await.unwrap();
    let record = engine.status(&stopped).unwrap();
    assert_eq!(record.status, SagaStatus::Running, "stopped, not parked");
    let last = store.history(&stopped).unwrap().pop().unwrap();
    assert!(matches!(last.event, Event::StepStarted { step: 0, .. }), "{last:?}");
    assert_no_space(&engine.start(run(AGAIN)).await.unwrap_err());
    started.push(stopped.clone());
    Filled { started, finished, refused, stopped }
}

fn assert_no_space(error: &Error) {
    let Error::Storage { source, .. } = error else { panic!("expected a storage error, got {error:?}") };
    match source.source().and_then(|s| s.downcast_ref::<SledError>()) {
        Some(SledError::NoSpace { available, reserve, .. }) => {
            assert_eq!(*reserve, RESERVE);
            assert!(*available < RESERVE, "{available}");
        }
        other => panic!("expected SledError::NoSpace, got {other:?} ({error})"),
    }
}

/// Every acknowledged step and outcome is in the directory's journals, which read whole.
fn assert_kept(dir: &Path, acknowledged: &BTreeSet<(String, u32)>, finished: &BTreeSet<SagaId>) -> SledStore {
    let store = SledStore::open_with(dir, options()).unwrap_or_else(|e| panic!("reopening: {e}"));
    let mut completed: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for record in store.records().unwrap() {
        for recorded in store.history(&record.id).unwrap() {
            if let Event::StepCompleted { step, .. } = recorded.event {
                completed.entry(record.id.to_string()).or_default().insert(step);
            }
        }
    }
    for (saga, step) in acknowledged {
        assert!(completed.get(saga).is_some_and(|steps| steps.contains(step)), "step {step} of {saga} lost");
    }
    for id in finished {
        let last = store.history(id).unwrap().pop().map(|r| r.event);
        assert!(matches!(last, Some(Event::SagaCompleted { .. })), "{id} ends in {last:?}");
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_loses_nothing_and_the_same_engine_goes_on() {
    let Some(disk) = Tmpfs::mount(FILESYSTEM) else { return };
    disk.fill("filler", FILLER);
    let dir = disk.path().join("data");
    let (acknowledged, gate) = (Acknowledged::default(), Gate::armed());
    let store = Arc::new(SledStore::open_with(&dir, options()).unwrap());
    let engine = start_engine(store.clone(), &acknowledged, &gate).await;

    let filled = fill(&engine, &store, &disk, &gate).await;
    assert!(
        filled.finished.len() >= 3,
        "only {} sagas finished before the disk filled",
        filled.finished.len()
    );
    let before = acknowledged.get();

    // Room again: the same engine takes the refused start, and the sagas the refusals stopped
    // (`filled.stopped`, and any other) resume from their journals and finish.
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    let again = engine.start(run(AGAIN)).await.unwrap().id().clone();
    let all: BTreeSet<SagaId> = filled.started.iter().cloned().chain([again]).collect();
    assert!(all.contains(&filled.stopped));
    for id in &all {
        let outcome = engine.handle(id).unwrap().outcome::<u64>().await.unwrap();
        assert_eq!(outcome, Outcome::Completed(u64::from(STEPS) * OUTPUT as u64), "{id}");
    }
    assert!(acknowledged.get().is_superset(&before));

    engine.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(engine);
    drop(store);
    let store = assert_kept(&dir, &acknowledged.get(), &all);
    assert!(store.in_flight().unwrap().is_empty());
    assert!(store.history(&filled.refused).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_closed_on_a_full_disk_reopens_with_everything_acknowledged() {
    let Some(disk) = Tmpfs::mount(FILESYSTEM) else { return };
    disk.fill("filler", FILLER);
    let dir = disk.path().join("data");
    let (acknowledged, gate) = (Acknowledged::default(), Gate::armed());
    let store = Arc::new(SledStore::open_with(&dir, options()).unwrap());
    let engine = start_engine(store.clone(), &acknowledged, &gate).await;
    let filled = fill(&engine, &store, &disk, &gate).await;
    let before = acknowledged.get();
    engine.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(engine);
    drop(store);

    // Still full: the directory opens, with every acknowledged write, and refuses writes.
    let store = Arc::new(assert_kept(&dir, &before, &filled.finished));
    let acknowledged = Acknowledged::default();
    let engine = start_engine(store.clone(), &acknowledged, &Arc::default()).await;
    assert_no_space(&engine.start(run(AGAIN)).await.unwrap_err());

    // Room again: what was in flight finishes on the engine that started on the full disk.
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    let in_flight: Vec<&SagaId> = filled.started.iter().filter(|id| !filled.finished.contains(*id)).collect();
    assert!(in_flight.contains(&&filled.stopped));
    for id in &in_flight {
        let outcome = engine.handle(id).unwrap().outcome::<u64>().await.unwrap();
        assert_eq!(outcome, Outcome::Completed(u64::from(STEPS) * OUTPUT as u64), "{id}");
    }
    engine.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(engine);
    drop(store);
    let all = filled.started.into_iter().collect();
    assert!(assert_kept(&dir, &before, &all).in_flight().unwrap().is_empty());
}
