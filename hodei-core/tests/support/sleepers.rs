//! Many sagas asleep on durable timers at once, shared by `tests/timers_scale.rs` (what must
//! hold) and the workspace's `benches/timers.rs` (how late they wake, against tokio's own
//! timers, by path).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hodei_core::{
    Engine, EngineEventKind, Event, SagaContext, SagaDefinition, SagaHandle, SagaRun, StepError,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SLEEPER: &str = "sleeper";

/// Starts in flight at once.
const STARTERS: usize = 256;

pub fn sleeper_id(n: usize) -> String {
    format!("sleeper-{n}")
}

/// When each saga's body saw its sleep return, by saga number.
pub type Wakes = Arc<Mutex<Vec<Option<SystemTime>>>>;

pub fn wakes(sagas: usize) -> Wakes {
    Arc::new(Mutex::new(vec![None; sagas]))
}

/// Sleeps `millis`, then notes the wall-clock time at once: the completion written after it is
/// not part of the wake-up.
pub fn sleeper(wakes: Wakes) -> SagaDefinition {
    SagaDefinition::new(SLEEPER, 1, move |ctx: SagaContext, (n, millis): (usize, u64)| {
        let wakes = wakes.clone();
        async move {
            ctx.sleep(Duration::from_millis(millis)).await;
            let woke = SystemTime::now();
            let mut wakes =
                wakes.lock().map_err(|_| StepError::terminal("a saga panicked holding the wakes"))?;
            wakes[n] = Some(woke);
            Ok(())
        }
    })
}

/// Starts `sagas` sleepers from `STARTERS` tasks, saga `n` sleeping `sleep(n)`.
pub async fn start_sleepers(
    engine: &Engine,
    sagas: usize,
    sleep: impl Fn(usize) -> Duration + Send + Sync + 'static,
) -> Vec<SagaHandle> {
    let (next, sleep) = (Arc::new(AtomicUsize::new(0)), Arc::new(sleep));
    let starters: Vec<_> = (0..STARTERS)
        .map(|_| {
            let (engine, next, sleep) = (engine.clone(), next.clone(), sleep.clone());
            tokio::spawn(async move {
                let mut handles = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= sagas {
                        return handles;
                    }
                    let millis = sleep(n).as_millis() as u64;
                    let run = SagaRun::new(SLEEPER, sleeper_id(n), &(n, millis)).unwrap();
                    handles.push(engine.start(run).await.unwrap());
                }
            })
        })
        .collect();
    let mut handles = Vec::with_capacity(sagas);
    for starter in starters {
        handles.extend(starter.await.unwrap());
    }
    handles
}

/// Collects every sleeper's due time (by saga number) from the engine's events, as the journal
/// recorded it. `asleep` fires when all `sagas` timers are journaled. The engine's
/// `event_buffer` must hold every event the sagas publish before they sleep.
pub fn collect_due_times(
    engine: &Engine,
    sagas: usize,
    asleep: oneshot::Sender<()>,
) -> JoinHandle<HashMap<usize, SystemTime>> {
    let mut events = engine.subscribe();
    tokio::spawn(async move {
        let mut due = HashMap::with_capacity(sagas);
        while due.len() < sagas {
            match events.recv().await {
                Ok(e) => {
                    if let EngineEventKind::Journaled(r) = e.kind
                        && let Event::TimerStarted { due: at, .. } = r.event
                    {
                        let n = e.saga_id.as_str().strip_prefix("sleeper-").and_then(|n| n.parse().ok());
                        let n =
                            n.unwrap_or_else(|| panic!("a timer of an unknown saga {}", e.saga_id.as_str()));
                        due.insert(n, UNIX_EPOCH + Duration::from_millis(at.0));
                    }
                }
                Err(RecvError::Lagged(n)) => panic!("the subscriber missed {n} engine events"),
                Err(RecvError::Closed) => panic!("the engine closed its event bus"),
            }
        }
        let _ = asleep.send(());
        due
    })
}

/// How late each saga woke after its journaled due time, by saga number. Panics if a saga
/// never noted its wake-up or woke before it was due: no figure is worth having then.
pub fn lateness(wakes: &Wakes, due: &HashMap<usize, SystemTime>) -> Vec<Duration> {
    let wakes = wakes.lock().unwrap();
    wakes
        .iter()
        .enumerate()
        .map(|(n, woke)| {
            let woke = woke.unwrap_or_else(|| panic!("saga {n} completed without noting its wake-up"));
            woke.duration_since(due[&n])
                .unwrap_or_else(|early| panic!("saga {n} woke {:?} before its due time", early.duration()))
        })
        .collect()
}
