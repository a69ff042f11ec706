//! A flush that fails is never taken for success. sled's own sync of its log is made to fail
//! with sled's failpoints (its `failpoints` feature, a dev-dependency of this crate): the
//! failpoint `buffer write post` fails the write of a log buffer right after its
//! `sync_file_range`, as an fsync reporting an error would. The store cannot inject it any
//! other way: sled writes and syncs its files itself.
//!
//! Failpoints are global to the process, so the tests of this file take turns.
//! `cargo test -p hodei-core --test failed_flush`.
#![cfg(feature = "sled")]

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hodei_core::{
    Engine, Error, Event, EventStore, Outcome, RecordedEvent, SagaDefinition, SagaId, SagaRecord, SagaRun,
    SagaStatus, SledError, SledStore, StepError, Timestamp,
};
use tokio::sync::{Mutex, Notify};

/// Held by each test: a failpoint set by one must fail the other's write no more than its own.
static TURN: Mutex<()> = Mutex::const_new(());

fn assert_failed_sled(error: &Error) {
    let Error::Storage { source, .. } = error else { panic!("expected a storage error, got {error:?}") };
    assert!(
        matches!(source.source().and_then(|s| s.downcast_ref::<SledError>()), Some(SledError::Failed { .. })),
        "expected SledError::Failed, got {error}"
    );
}

fn event(seq: u64) -> RecordedEvent {
    RecordedEvent {
        seq,
        at: Timestamp(seq),
        event: Event::CancelRequested { reason: format!("event {seq}") },
    }
}

#[tokio::test]
async fn a_failed_flush_acknowledges_nothing_and_stops_the_store() {
    let _turn = TURN.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let id = SagaId::new("s").unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    // A record as a store gives it back (its constructor is the engine's).
    let record: SagaRecord = serde_json::from_value(serde_json::json!({
        "id": "s", "definition": "d", "version": 1, "status": "Running", "created_at": 0, "updated_at": 0,
    }))
    .unwrap();
    let first = RecordedEvent {
        seq: 0,
        at: Timestamp(0),
        event: Event::SagaStarted { definition: "d".into(), version: 1, input: vec![] },
    };
    assert!(store.create(&record, &first).unwrap().is_none());
    store.append(&id, &[event(1)], None).unwrap();
    store.durable().await.unwrap();

    store.append(&id, &[event(2)], None).unwrap();
    // sled fails the next write of a log buffer after syncing it.
    sled::fail::set("buffer write post", 1);
    let flushed = store.durable().await.unwrap_err();
    let Error::Storage { operation: "flushing", .. } = &flushed else { panic!("{flushed:?}") };
    // No later write or flush succeeds: none could vouch for event 2, nor for what follows it.
    assert!(!*store.writable().unwrap().borrow());
    assert_failed_sled(&store.append(&id, &[event(3)], None).unwrap_err());
    assert_failed_sled(&store.durable().await.unwrap_err());
    drop(store);

    // The acknowledged events are there, and the directory is not damaged: the failed flush's
    // group commit was never recorded as acknowledged. Event 2, never acknowledged, is there
    // too: the sync reported its failure after the bytes reached the file, and sled reads them.
    let store = SledStore::open(dir.path()).unwrap_or_else(|e| panic!("reopening: {e}"));
    let history = store.history(&id).unwrap();
    assert_eq!(history[1..], [event(1), event(2)]);
    store.append(&id, &[event(history.len() as u64)], None).unwrap();
    store.durable().await.unwrap();
}

/// Runs a saga whose one step's end fails to flush at `failpoint`, then restarts the engine on
/// its directory; returns how many times the step's body ran.
async fn step_end_fails_to_flush(failpoint: &'static str) -> u32 {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let returned = Arc::new(AtomicU32::new(0));
    let (entered, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let definition = || {
        let (runs, returned, entered, go) = (runs.clone(), returned.clone(), entered.clone(), go.clone());
        SagaDefinition::new("gated", 1, move |ctx, ()| {
            let (runs, returned, entered, go) = (runs.clone(), returned.clone(), entered.clone(), go.clone());
            async move {
                let value: u32 = ctx
                    .step("first")
                    .run(move |_, ()| {
                        let (runs, entered, go) = (runs.clone(), entered.clone(), go.clone());
                        async move {
                            // Gated on the first run only: the one whose end fails to flush.
                            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                                entered.notify_one();
                                go.notified().await;
                            }
                            Ok::<_, StepError>(7)
                        }
                    })
                    .await?;
                returned.fetch_add(1, Ordering::SeqCst);
                Ok(value)
            }
        })
    };
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let mut writable = store.writable().unwrap();
    let engine = Engine::builder().store(store.clone()).register(definition()).start().await.unwrap();
    let id = engine.start(SagaRun::new("gated", "run", &()).unwrap()).await.unwrap().id().clone();
    entered.notified().await;
    sled::fail::set(failpoint, 1);
    go.notify_one();

    // The step's end was not flushed: the body never got its result, the saga is not parked
    // (it stopped, to resume from its journal), and the store takes no more writes.
    writable.wait_for(|takes| !*takes).await.unwrap();
    assert_failed_sled(&engine.start(SagaRun::new("gated", "other", &()).unwrap()).await.unwrap_err());
    assert_eq!(returned.load(Ordering::SeqCst), 0);
    assert_eq!(engine.status(&id).unwrap().status, SagaStatus::Running);
    // Its last flush fails too, and says so.
    assert_failed_sled(&engine.shutdown(Duration::from_secs(10)).await.unwrap_err());
    drop(engine);
    drop(store);

    // A restart reads the journal sled kept, and the saga goes on from there.
    let engine = Engine::builder().data_dir(dir.path()).register(definition()).start().await.unwrap();
    let outcome = engine.handle(&id).unwrap().outcome::<u32>().await.unwrap();
    assert_eq!(outcome, Outcome::Completed(7));
    assert_eq!(returned.load(Ordering::SeqCst), 1);
    let history = engine.history(&id).unwrap();
    let ends = history.iter().filter(|r| matches!(r.event, Event::StepCompleted { .. })).count();
    assert_eq!(ends, 1, "{history:?}");
    runs.load(Ordering::SeqCst)
}

/// The sync reported a failure after the bytes reached the file: sled reads them on the next
/// open, so the step's end is there, and the step does not run again. It was never
/// acknowledged: the body gets the result only from the journal read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_end_whose_sync_fails_is_returned_only_after_a_restart_reads_it() {
    let _turn = TURN.lock().await;
    assert_eq!(step_end_fails_to_flush("buffer write post").await, 1);
}

/// The write itself failed: the step's end is not in the journal, and the step runs again
/// after the restart, as after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_end_whose_write_fails_runs_the_step_again_after_a_restart() {
    let _turn = TURN.lock().await;
    assert_eq!(step_end_fails_to_flush("buffer write").await, 2);
}
