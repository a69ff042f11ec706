//! `Engine::census`: the runs in flight and their waits, as a metrics endpoint counts them at
//! each scrape, before and after a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{
    Census, Engine, EngineEventKind, Event, MemoryStore, Outcome, SagaContext, SagaDefinition, SagaId,
    SagaRun, StepError,
};

/// Sleeps an hour on a durable timer.
fn sleeper() -> SagaDefinition {
    SagaDefinition::new("sleeper", 1, |ctx: SagaContext, (): ()| async move {
        ctx.sleep(Duration::from_secs(3600)).await;
        Ok::<_, StepError>(())
    })
}

/// Waits for the `go` signal.
fn waiter() -> SagaDefinition {
    SagaDefinition::new(
        "waiter",
        1,
        |ctx: SagaContext, (): ()| async move { ctx.wait_signal::<u32>("go").await },
    )
}

async fn open(store: Arc<MemoryStore>) -> Engine {
    Engine::builder().store(store).register(sleeper()).register(waiter()).start().await.unwrap()
}

fn runs(entries: &[(&str, &'static str, usize)]) -> BTreeMap<(String, &'static str), usize> {
    entries.iter().map(|(d, s, n)| (((*d).to_owned(), *s), *n)).collect()
}

/// Waits, bounded, until the census matches: a wait is counted a moment after its start is
/// journaled (the signal wait subscribes to arrivals once the start is durable).
async fn census_becomes(engine: &Engine, expected: impl Fn(&Census) -> bool) -> Census {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let census = engine.census();
            if expected(&census) {
                return census;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the census never matched: {:?}", engine.census()))
}

/// Waits until `id` journals its timer's start, through the engine's events.
async fn timer_started(engine: &Engine, id: &str, start: impl std::future::Future<Output = ()>) {
    let mut events = engine.subscribe();
    start.await;
    loop {
        let event = events.recv().await.unwrap();
        if event.saga_id.as_str() == id
            && matches!(&event.kind, EngineEventKind::Journaled(r) if matches!(r.event, Event::TimerStarted { .. }))
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_census_counts_runs_timers_and_signal_waits_and_again_after_a_restart() {
    let store = Arc::new(MemoryStore::new());
    let engine = open(store.clone()).await;
    assert_eq!(engine.census(), Census::default());

    let run = |definition, id| SagaRun::new(definition, id, &()).unwrap();
    timer_started(&engine, "s1", async {
        engine.start(run("sleeper", "s1")).await.unwrap();
    })
    .await;
    // The timer is counted from before its start is journaled.
    let census = engine.census();
    assert_eq!((census.timers_waiting, census.runs.clone()), (1, runs(&[("sleeper", "running", 1)])));

    engine.start(run("waiter", "w1")).await.unwrap();
    let census = census_becomes(&engine, |c| c.signal_waits == 1).await;
    assert_eq!(census.runs, runs(&[("sleeper", "running", 1), ("waiter", "running", 1)]));
    assert_eq!((census.timers_waiting, census.backoffs_waiting), (1, 0));

    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);

    // A new engine on the same journal counts the same, from what recovery made live again.
    let engine = open(store).await;
    let census = census_becomes(&engine, |c| c.signal_waits == 1 && c.timers_waiting == 1).await;
    assert_eq!(census.runs, runs(&[("sleeper", "running", 1), ("waiter", "running", 1)]));

    let waiter = SagaId::new("w1").unwrap();
    engine.signal(&waiter, "go", &7u32).await.unwrap();
    assert_eq!(engine.handle(&waiter).unwrap().outcome::<u32>().await.unwrap(), Outcome::Completed(7));
    let sleeper = SagaId::new("s1").unwrap();
    engine.cancel(&sleeper, "enough").await.unwrap();
    let outcome = engine.handle(&sleeper).unwrap().outcome::<()>().await.unwrap();
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert_eq!(engine.census(), Census::default());
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}
