use std::sync::Arc;

use super::state::{Engine, Inner};
use crate::driver::{LiveSaga, final_status};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaRecord, SagaStatus};
use crate::lock::lock;
use crate::saga::SagaDefinition;

impl Engine {
    pub(super) fn recover(&self) -> Result<()> {
        let in_flight = match self.inner.store.leases() {
            // Shared with other engines: only the sagas this one claims, then more at each beat.
            Some(leases) => {
                let claimed = leases.renew(usize::MAX)?.claimed;
                super::leasing::start(&self.inner, leases.beat(), leases.wake());
                claimed
            }
            None => {
                if let Some(writable) = self.inner.store.writable() {
                    super::rewritable::start(&self.inner, writable);
                }
                self.inner.store.in_flight()?
            }
        };
        tracing::info!(sagas = in_flight.len(), "resuming sagas in flight");
        for record in in_flight {
            self.inner.adopt(record)?;
        }
        Ok(())
    }

    /// Registers a definition while running, and resumes the sagas that were waiting for it.
    pub fn register(&self, definition: SagaDefinition) -> Result<()> {
        let (name, version) = (definition.name.clone(), definition.version);
        self.inner.registry.add(definition)?;
        let waiting: Vec<Arc<LiveSaga>> = lock(&self.inner.live)
            .values()
            .filter(|l| {
                let r = l.journal.record();
                r.definition == name && r.version == version && r.status == SagaStatus::WaitingForVersion
            })
            .cloned()
            .collect();
        for live in waiting {
            // An operator's request may be ending it (a cancel, or a fork that moves it): it is
            // resumed once that is done, if it still waits then.
            if let Ok(_requests) = live.control.requests.try_lock() {
                self.inner.adopt_waiting(&live)?;
                continue;
            }
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let _requests = live.control.requests.lock().await;
                if let Err(e) = inner.adopt_waiting(&live) {
                    tracing::error!(
                        saga.id = %live.journal.id, error = %e,
                        "a saga waiting for its version could not be resumed"
                    );
                }
            });
        }
        Ok(())
    }
}

impl Inner {
    /// Resumes `live`, which waited for its version, unless it changed while an operator's
    /// request held it: ended, or resumed already.
    fn adopt_waiting(self: &Arc<Self>, live: &Arc<LiveSaga>) -> Result<()> {
        let current = self.live(&live.journal.id).is_some_and(|now| Arc::ptr_eq(&now, live));
        let record = live.journal.record();
        if !current || record.status != SagaStatus::WaitingForVersion {
            return Ok(());
        }
        self.adopt(record)
    }

    /// Takes over a saga found in flight: resumes it, or shows why it cannot run.
    pub(super) fn adopt(self: &Arc<Self>, record: SagaRecord) -> Result<()> {
        let id = record.id.clone();
        let history = self.store.history(&id);
        // On a shared store the database may only be away for a moment: the saga is resumed at
        // a later beat, not parked (nor left live with no driver, which no beat would retry).
        if let Err(Error::Storage { .. }) = &history
            && self.store.leases().is_some()
        {
            tracing::warn!(saga.id = %id, "the journal could not be read; the saga is resumed at a later beat");
            lock(&self.unwritten).push(id);
            return Ok(());
        }
        let next = history.as_ref().map_or(0, |h| h.len() as u64);
        let final_event =
            history.as_ref().ok().and_then(|h| last_state(h).filter(|r| r.event.is_final()).cloned());
        let live = self.new_live(record.clone(), next, final_event.is_some());
        if let Ok(history) = &history {
            self.observe_live(&live, history);
        }
        let requests = history.as_ref().map(|h| Requests::of(h)).unwrap_or_default();
        if let Some(reason) = requests.cancel {
            // Known to the control too, so that a later cancel is not journaled twice.
            live.control.cancel.send_replace(Some(reason));
        }
        let under_pause = if requests.compensating { SagaStatus::Compensating } else { SagaStatus::Running };
        if requests.paused {
            // The journal, not the record, says whether the saga is paused: the two are
            // separate writes, and a crash may come between them.
            live.journal.restore_pause(under_pause.clone());
            live.control.paused.send_replace(true);
        }
        lock(&self.live).insert(id.clone(), live.clone());
        let set_status = |status: SagaStatus| live.journal.write_status(status);
        let history = match history {
            Ok(history) => history,
            Err(e) => return set_status(SagaStatus::Parked { reason: e.to_string() }),
        };
        if let Some(end) = final_event {
            // The record lagged behind its journal; the journal is the truth.
            set_status(final_status(&end.event))?;
            self.finished(&live, end);
            return Ok(());
        }
        match self.registry.get(&record.definition, Some(record.version)) {
            None => {
                tracing::warn!(saga.id = %id, definition = %record.definition, version = record.version,
                    "no definition registered for this version; the saga waits");
                set_status(SagaStatus::WaitingForVersion)
            }
            Some(definition) => {
                // A paused saga's record shows `Paused` whatever it is doing under the pause.
                match record.status {
                    SagaStatus::Running | SagaStatus::Compensating => set_status(record.status)?,
                    _ => set_status(under_pause)?,
                }
                self.spawn(live, definition, history);
                Ok(())
            }
        }
    }
}

/// What operators asked of a saga, as its journal says.
#[derive(Default)]
struct Requests {
    /// The first cancel's reason.
    cancel: Option<String>,
    /// Whether it is paused now: paused and not since resumed, cancelled or finished.
    paused: bool,
    /// Whether it has entered its compensation (it was cancelled, or its body failed).
    compensating: bool,
}

impl Requests {
    fn of(history: &[RecordedEvent]) -> Self {
        let mut requests = Requests::default();
        for recorded in history {
            match &recorded.event {
                Event::CancelRequested { reason } | Event::CancelRequestedBy { reason, .. } => {
                    requests.cancel.get_or_insert_with(|| reason.clone());
                    requests.paused = false;
                    requests.compensating = true;
                }
                Event::BodyFailed { .. } => requests.compensating = true,
                Event::Paused { .. } => requests.paused = true,
                Event::Resumed { .. } | Event::CompensationRetryRequested { .. } => requests.paused = false,
                event if event.is_final() => requests.paused = false,
                _ => {}
            }
        }
        requests
    }
}

/// The last event that says where the saga stands: links to other runs may follow it.
pub(super) fn last_state(history: &[RecordedEvent]) -> Option<&RecordedEvent> {
    history.iter().rev().find(|r| !r.event.is_link())
}
