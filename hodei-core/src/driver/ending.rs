//! How a saga's run ends in its journal: finished, or parked for an operator.

use super::journal::Halt;
use super::live::LiveSaga;
use crate::event::{Event, RecordedEvent, SagaStatus};

pub(super) async fn finish(live: &LiveSaga, event: Event, status: SagaStatus) -> Option<RecordedEvent> {
    match live.journal.transition(Some(event), status).await {
        Ok(recorded) => {
            tracing::info!(status = live.journal.record().status.kind(), "saga finished");
            recorded
        }
        Err(e) => park(live, unwritable(&e)).await,
    }
}

pub(super) fn unwritable(e: &dyn std::fmt::Display) -> String {
    format!("the journal could not be written: {e}")
}

/// Parks the saga. A parked saga has not finished, so there is no final event to return.
pub(super) async fn park(live: &LiveSaga, reason: String) -> Option<RecordedEvent> {
    match live.journal.halted() {
        // Not parked: another engine drives it now, and this one may write nothing more.
        Some(Halt::Fenced) => {
            tracing::warn!(reason = %reason, "saga taken over by another engine; no longer driven here");
            return None;
        }
        // Not parked: the database may be restarting, or the disk have room again soon; the
        // engine resumes it from its journal once the store takes writes.
        Some(Halt::Unwritten) => {
            tracing::warn!(reason = %reason, "a journal write failed; the saga resumes once the store answers");
            return None;
        }
        None => {}
    }
    tracing::error!(reason = %reason, "saga parked");
    // If even this write fails, the saga stays in flight as it was and is retried at the next
    // start; the in-memory status below still shows why to anyone inspecting it now.
    if let Err(e) = live.journal.transition(None, SagaStatus::Parked { reason }).await {
        tracing::error!(error = %e, "could not record that the saga is parked");
    }
    None
}

/// The status a final event gives its saga.
pub(crate) fn final_status(event: &Event) -> SagaStatus {
    match event {
        Event::SagaCompleted { .. } => SagaStatus::Completed,
        Event::SagaCompensated { .. } => SagaStatus::Compensated,
        Event::SagaCompensationFailed { .. } => SagaStatus::CompensationFailed,
        _ => SagaStatus::Failed,
    }
}
