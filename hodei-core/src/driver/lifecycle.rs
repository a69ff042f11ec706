//! One saga's run, from its journal to its end: replay and run the body, then finish,
//! compensate or park.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::compensation::compensate;
use super::ending::{finish, park, unwritable};
use super::host::Host;
use super::interrupt::Interrupt;
use super::live::LiveSaga;
use super::shared::SagaShared;
use super::spec::BoxFuture;
use crate::event::{Event, RecordedEvent, SagaStatus};
use crate::replay::Replay;
use crate::retry::StepError;

/// How long a cancelled body may go on replaying to push the compensations it recorded. Replay
/// runs no live code and takes microseconds per operation; this bounds only a journal whose
/// code no longer reaches it.
const REPLAY_GRACE: Duration = Duration::from_secs(5);

/// How long a cancelled saga waits for its running step attempts to wind down before it
/// compensates: each is bounded by its own step's cancel grace; this bounds them all.
const WIND_DOWN_LIMIT: Duration = Duration::from_secs(60);

/// Polls `body` (whose own operations must see what happened), unless it is `done`, until
/// `until` resolves or `limit` passes; returns whether it resolved.
async fn polling_body<B: Future + ?Sized>(
    body: &mut std::pin::Pin<Box<B>>,
    done: &mut bool,
    until: impl Future<Output = ()>,
    limit: Duration,
) -> bool {
    tokio::pin!(until);
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut until => return true,
            // Whatever the body does now, it can no longer end the saga: the cancel decides.
            _ = body.as_mut(), if !*done => *done = true,
            () = &mut deadline => return false,
        }
    }
}

/// What a body needs to start replaying: the state it shares with its operations, the saga's
/// input, and where an operation reports why the body must stop.
pub(super) struct Prepared {
    pub shared: Arc<SagaShared>,
    pub input: Vec<u8>,
    pub interrupt: oneshot::Receiver<Interrupt>,
}

/// Indexes a saga's journal and sets up what its body needs. `Err` is why the journal cannot
/// be replayed, in the words a park gives.
pub(super) fn prepare(host: Host, live: &LiveSaga, history: &[RecordedEvent]) -> Result<Prepared, String> {
    let replay = Replay::new(history).map_err(|reason| format!("the journal is inconsistent: {reason}"))?;
    let input = match history.first().map(|r| &r.event) {
        Some(Event::SagaStarted { input, .. }) => input.clone(),
        _ => return Err("the journal does not begin with SagaStarted".into()),
    };
    let (interrupt_tx, interrupt_rx) = oneshot::channel();
    for (seq, (name, payload)) in &replay.signals {
        live.control.deliver(*seq, name.clone(), payload.clone());
    }
    let shared = Arc::new(SagaShared {
        id: live.journal.id.clone(),
        host,
        journal: live.journal.clone(),
        next_step: AtomicU32::new(replay.next_step),
        visited: replay.keys.iter().map(|_| AtomicBool::new(false)).collect(),
        unreached: AtomicUsize::new(replay.keys.len()),
        replayed: watch::Sender::new(replay.keys.is_empty()),
        consumed: Mutex::new(replay.consumed_signals().collect()),
        replay,
        stack: Mutex::new(Vec::new()),
        attempts: watch::Sender::new(0),
        interrupt: Mutex::new(Some(interrupt_tx)),
        control: live.control.clone(),
    });
    Ok(Prepared { shared, input, interrupt: interrupt_rx })
}

/// How the body ended.
pub(super) enum Ending {
    Body(Result<Vec<u8>, StepError>),
    Interrupted(Interrupt),
}

/// Runs one saga until it finishes, parks or is suspended. Returns its final event if it
/// finished; the engine, which owns the set of live sagas, tells the saga's waiters.
pub(crate) async fn drive(
    host: Host,
    live: Arc<LiveSaga>,
    body: impl FnOnce(Arc<SagaShared>, Vec<u8>) -> BoxFuture<Result<Vec<u8>, StepError>>,
    history: Vec<RecordedEvent>,
) -> Option<RecordedEvent> {
    let journal = live.journal.clone();
    let Prepared { shared, input, interrupt: interrupt_rx } = match prepare(host, &live, &history) {
        Ok(prepared) => prepared,
        Err(reason) => return park(&live, reason).await,
    };
    let body = body(shared.clone(), input);
    // A cancel already in the journal is honoured by the operations once replay reaches them;
    // a new one also cuts off a body blocked elsewhere. Either way the body is dropped only
    // after replay has pushed the compensation of every recorded step: concurrent branches
    // replay in their own tasks, and one may see the cancel before another has caught up.
    let mut body = Box::pin(body);
    let mut interrupt_rx = interrupt_rx;
    let mut new_cancel = live.control.cancel.subscribe();
    new_cancel.mark_unchanged();
    let ending = tokio::select! {
        biased;
        Ok(why) = &mut interrupt_rx => Ending::Interrupted(why),
        Ok(reason) = new_cancel.wait_for(Option::is_some) => {
            Ending::Interrupted(Interrupt::Cancelled(reason.clone().unwrap_or_default()))
        }
        result = body.as_mut() => Ending::Body(result),
    };
    if matches!(ending, Ending::Interrupted(Interrupt::Cancelled(_))) {
        let mut replayed = shared.replayed.subscribe();
        let caught_up = async {
            let _ = replayed.wait_for(|done| *done).await;
        };
        let mut done = false;
        if !polling_body(&mut body, &mut done, caught_up, REPLAY_GRACE).await {
            tracing::warn!(unreached = ?shared.unvisited(), "cancelled before replay reached every recorded operation");
        }
        // Every running step sees the cancel, journals its end and winds down (a job is
        // cancelled and waited for) before anything is compensated.
        let mut attempts = shared.attempts.subscribe();
        let wound_down = async {
            let _ = attempts.wait_for(|running| *running == 0).await;
        };
        if !polling_body(&mut body, &mut done, wound_down, WIND_DOWN_LIMIT).await {
            tracing::warn!(
                running = *shared.attempts.borrow(),
                "step attempts still running when the cancelled saga compensates"
            );
        }
    }
    // What is still in flight (branch tasks included) is dropped before anything is undone.
    drop(body);
    match ending {
        Ending::Body(Ok(output)) => {
            // A body that ends short of its journal parks even when cancelled: the steps it
            // did not reach again are not on the stack, and compensating without them would
            // leave them undone.
            if let Some(reason) = shared.ending_mismatch(true) {
                park(&live, reason).await
            } else if let Some(reason) = shared.cancel_reason() {
                compensate(&live, &shared, format!("cancelled: {reason}")).await
            } else if output.len() > shared.host.max_payload {
                let cause = format!(
                    "the saga output is {} bytes, over the limit of {} bytes",
                    output.len(),
                    shared.host.max_payload
                );
                compensate(&live, &shared, cause).await
            } else {
                finish(&live, Event::SagaCompleted { output }, SagaStatus::Completed).await
            }
        }
        Ending::Body(Err(e)) => match shared.ending_mismatch(false) {
            Some(reason) => park(&live, reason).await,
            None => compensate(&live, &shared, e.message().to_string()).await,
        },
        Ending::Interrupted(Interrupt::Nondeterminism(reason)) => park(&live, reason).await,
        // Only a branch stops for its group's cancel; the body as a whole never does.
        Ending::Interrupted(Interrupt::BranchCancelled(reason)) => {
            park(&live, format!("the saga's body stopped for a branch's cancel: {reason}")).await
        }
        Ending::Interrupted(Interrupt::Cancelled(reason)) => {
            compensate(&live, &shared, format!("cancelled: {reason}")).await
        }
        Ending::Interrupted(Interrupt::Suspended) => {
            if let Err(e) = journal.sync().await {
                tracing::error!(error = %e, "could not write the journal while suspending");
            }
            None
        }
        Ending::Interrupted(Interrupt::Storage(e)) => park(&live, unwritable(&e)).await,
    }
}
