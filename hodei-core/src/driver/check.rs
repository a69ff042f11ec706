//! A replay check: a saga's current code run against its journal, with nothing run live.

use std::sync::Arc;
use std::time::Duration;

use super::host::Host;
use super::interrupt::Interrupt;
use super::lifecycle::{Ending, Prepared, prepare};
use super::live::LiveSaga;
use super::probe::{PatchTaken, Probe};
use super::shared::SagaShared;
use super::spec::BoxFuture;
use crate::event::RecordedEvent;
use crate::replay_check::ReplayVerdict;
use crate::retry::StepError;

/// How long a replay may take to reach the end of its journal. Replay runs no live code and
/// takes microseconds per operation: only a body that waits on something neither journaled nor
/// an operation (a channel of its own, a sleep outside `ctx.sleep`) takes longer.
const REPLAY_LIMIT: Duration = Duration::from_secs(10);

/// Replays `history` on `body` and says whether the run would go on, or park and why, with the
/// patches it reached. Every operation past the journal stops instead of running.
pub(crate) async fn check(
    host: Host,
    live: Arc<LiveSaga>,
    body: impl FnOnce(Arc<SagaShared>, Vec<u8>) -> BoxFuture<Result<Vec<u8>, StepError>>,
    history: Vec<RecordedEvent>,
) -> (ReplayVerdict, Vec<PatchTaken>) {
    let probe = Arc::new(Probe::default());
    let host = Host { probe: Some(probe.clone()), ..host };
    let verdict = replay_until_live(host, &probe, live, body, history).await;
    (verdict, probe.patches())
}

async fn replay_until_live(
    host: Host,
    probe: &Probe,
    live: Arc<LiveSaga>,
    body: impl FnOnce(Arc<SagaShared>, Vec<u8>) -> BoxFuture<Result<Vec<u8>, StepError>>,
    history: Vec<RecordedEvent>,
) -> ReplayVerdict {
    let Prepared { shared, input, interrupt: mut interrupt_rx } = match prepare(host, &live, &history) {
        Ok(prepared) => prepared,
        Err(reason) => return ReplayVerdict::WouldPark { reason },
    };
    let mut body = Box::pin(body(shared.clone(), input));
    // Done once every recorded operation is reached and some scope has gone as far as the
    // journal goes: what it would run next is live, and no later code can contradict the
    // journal. A park found on the way wins, whichever task found it.
    let mut replayed = shared.replayed.subscribe();
    let settled = async {
        let next = probe.live().await;
        let _ = replayed.wait_for(|done| *done).await;
        next
    };
    let ending = tokio::select! {
        biased;
        Ok(why) = &mut interrupt_rx => Ending::Interrupted(why),
        result = body.as_mut() => Ending::Body(result),
        next = settled => return ReplayVerdict::Clean { next: Some(next) },
        () = tokio::time::sleep(REPLAY_LIMIT) => {
            return ReplayVerdict::Stalled {
                reason: match shared.unvisited() {
                    Some((key, kind)) => format!(
                        "the code did not reach operation {key} ({kind}) within {REPLAY_LIMIT:?}: it waits on something the journal does not record"
                    ),
                    None => format!("the body neither ended nor reached an operation within {REPLAY_LIMIT:?}"),
                },
            };
        }
    };
    drop(body);
    match ending {
        // Ended on what is recorded: it would finish, or compensate, as the journal says.
        Ending::Body(result) => match shared.ending_mismatch(result.is_ok()) {
            Some(reason) => ReplayVerdict::WouldPark { reason },
            None => ReplayVerdict::Clean { next: probe.first_live() },
        },
        Ending::Interrupted(Interrupt::Nondeterminism(reason)) => ReplayVerdict::WouldPark { reason },
        Ending::Interrupted(Interrupt::BranchCancelled(reason)) => ReplayVerdict::WouldPark {
            reason: format!("the saga's body stopped for a branch's cancel: {reason}"),
        },
        Ending::Interrupted(Interrupt::Cancelled(_)) => ReplayVerdict::Clean { next: probe.first_live() },
        Ending::Interrupted(Interrupt::Suspended | Interrupt::Storage(_)) => {
            ReplayVerdict::Stalled { reason: "the engine stopped during the check".into() }
        }
    }
}
