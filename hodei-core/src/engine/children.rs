use super::state::{Engine, Inner};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus};
use crate::retry::StepError;
use crate::store::EventStore;

impl Engine {
    /// A child saga's part in its parent's compensation: a running child is cancelled (and so
    /// compensates itself); a completed child with compensable steps is reopened and
    /// compensated. Returns once the child has ended again.
    pub(crate) async fn compensate_child(&self, child: &SagaId, parent: &SagaId) -> Result<(), StepError> {
        let reason = format!("its parent saga `{parent}` is compensating");
        let retryable = |e: Error| StepError::retryable(e.to_string());
        // A cancel can lose the race with the child's completion; then the completed child is
        // reopened, so two rounds always suffice.
        for _ in 0..2 {
            let live = match self.inner.live(child) {
                Some(live) => live,
                None => {
                    let Some(record) = self.inner.store.record(child).map_err(retryable)? else {
                        return Ok(());
                    };
                    match record.status {
                        SagaStatus::Completed => {
                            if !self.reopen_to_compensate(&record, &reason).await.map_err(retryable)? {
                                return Ok(());
                            }
                        }
                        SagaStatus::Compensated | SagaStatus::Failed => return Ok(()),
                        SagaStatus::CompensationFailed => {
                            return Err(StepError::terminal(format!(
                                "child saga `{child}` could not compensate; an operator must finish it"
                            )));
                        }
                        _ => return Err(retryable(Error::EngineStopped(child.clone()))),
                    }
                    self.inner.live(child).ok_or_else(|| retryable(Error::EngineStopped(child.clone())))?
                }
            };
            match self.cancel(child, reason.clone()).await {
                Ok(()) | Err(Error::SagaFinished(_)) => {}
                Err(e) => return Err(retryable(e)),
            }
            let mut finished = live.finished.subscribe();
            drop(live);
            let end = finished
                .wait_for(Option::is_some)
                .await
                .map_err(|_| retryable(Error::EngineStopped(child.clone())))?
                .as_ref()
                .map(|e| e.event.clone());
            match end {
                Some(Event::SagaCompensated { .. } | Event::SagaFailed { .. }) => return Ok(()),
                Some(Event::SagaCompensationFailed { error, .. }) => {
                    return Err(StepError::terminal(format!(
                        "child saga `{child}` could not compensate: {error}"
                    )));
                }
                _ => {}
            }
        }
        Err(StepError::retryable(format!("child saga `{child}` did not compensate")))
    }

    /// Reopens a completed saga so that it compensates: journals a cancel after its end and
    /// resumes it. Returns `false`, changing nothing, when it has nothing to compensate.
    pub(super) async fn reopen_to_compensate(&self, record: &SagaRecord, reason: &str) -> Result<bool> {
        let inner = &self.inner;
        let history = inner.store.history(&record.id)?;
        let compensable = history.iter().any(|r| {
            matches!(
                r.event,
                Event::StepStarted { compensable: true, .. } | Event::StepStartedAt { compensable: true, .. }
            )
        });
        if !compensable {
            return Ok(false);
        }
        let cancel = Event::CancelRequested { reason: reason.into() };
        let reopened = reopen_compensating(inner, record, history.len() as u64, cancel)?;
        inner.store.durable().await?;
        tracing::info!(saga.id = %record.id, reason, "reopened to compensate");
        inner.adopt(reopened)?;
        Ok(true)
    }
}

/// Appends `event` to a finished saga's journal (whose next sequence number is `next_seq`) and
/// marks it compensating again, in one write: how a parent's compensation reopens a completed
/// child, and how an operator retries a failed compensation. The caller adopts it once durable.
pub(super) fn reopen_compensating(
    inner: &Inner,
    record: &SagaRecord,
    next_seq: u64,
    event: Event,
) -> Result<SagaRecord> {
    let (store, now) = (inner.store.as_ref(), inner.timers.now());
    let mut reopened = record.clone();
    reopened.status = SagaStatus::Compensating;
    reopened.updated_at = now;
    store.append(&record.id, &[RecordedEvent { seq: next_seq, at: now, event }], Some(&reopened))?;
    Ok(reopened)
}
