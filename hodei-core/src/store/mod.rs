//! Where journals live: the [`EventStore`] trait and its two implementations.
//!
//! - [`SledStore`] (feature `sled`, on by default): on disk, durable, group-committed.
//! - [`MemoryStore`]: in memory, for tests and for users who want no persistence.
//!
//! A store is synchronous on purpose: writes land in the backend's memory at once, and
//! durability is a separate future ([`EventStore::durable`]) so that one fsync can cover the
//! writes of every saga that asked for it meanwhile (group commit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result, StorageError};
use crate::event::{RecordedEvent, SagaId, SagaRecord};
use crate::observe::Observer;

pub(crate) mod leases;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sled")]
mod sled;

#[cfg(feature = "sled")]
pub use self::sled::{DEFAULT_FREE_SPACE_RESERVE, SledError, SledOptions, SledStore};
pub use leases::{Leases, Posted, Renewal, Request};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{DEFAULT_LEASE, PostgresError, PostgresOptions, PostgresStore, SqlParam, SqlRow};

/// Storage for saga journals and their summary records.
///
/// The engine is the only writer of a saga's journal, but implementations still enforce the
/// sequence check: an append must land exactly at the journal's next sequence number, or it
/// fails with [`Error::SequenceConflict`] and changes nothing.
pub trait EventStore: Send + Sync + fmt::Debug + 'static {
    /// Creates a saga: its entry in the in-flight index, its first event (sequence 0) and its
    /// summary record. The first event is the commit point: if a saga with that id exists,
    /// nothing is written and its record is returned.
    fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>>;

    /// Appends `events` atomically; the first one's sequence number must be the journal's next.
    /// With `record`, then replaces the summary record; a final status also removes the saga
    /// from the in-flight index.
    ///
    /// The journal is the source of truth: an implementation may write the record after the
    /// events, non-atomically, as long as a record that lags behind its journal after a crash
    /// is repaired from the journal (the engine repairs a lagging final status itself).
    /// A status change alone (`events` empty) must work even when the journal cannot be read.
    fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()>;

    /// Resolves once everything written before the call is on stable storage.
    fn durable(&self) -> Durable;

    /// The saga's whole journal, in order. Empty if the saga does not exist.
    fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>>;

    /// The saga's summary record.
    fn record(&self, id: &SagaId) -> Result<Option<SagaRecord>>;

    /// The records of every saga that has not finished. Its cost grows with the number of
    /// such sagas, not with the size of the store.
    fn in_flight(&self) -> Result<Vec<SagaRecord>>;

    /// Every saga's record.
    fn records(&self) -> Result<Vec<SagaRecord>>;

    /// The records after `after` in id order (from the first without it) that `keep` keeps, at
    /// most `limit` of them: one page of a listing. Its cost grows with the records it reads
    /// from the cursor up to the last one it returns, not with the size of the store.
    ///
    /// The default reads every record; the stores of this crate scan from the cursor. It is
    /// there so that a store written before this method still builds.
    fn records_after(
        &self,
        after: Option<&SagaId>,
        limit: usize,
        keep: &dyn Fn(&SagaRecord) -> bool,
    ) -> Result<Vec<SagaRecord>> {
        let mut records = self.records()?;
        records.retain(|r| after.is_none_or(|after| r.id > *after) && keep(r));
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records.truncate(limit);
        Ok(records)
    }

    /// Deletes a saga: its record, its journal and its index entry.
    fn remove(&self, id: &SagaId) -> Result<()>;

    /// Tells `observer` about each group commit from now on
    /// ([`Observer::journal_flushed`]), replacing any observer before. The engine calls it
    /// when it starts with an observer. The default observes nothing: a store that makes
    /// nothing durable has nothing to tell.
    fn observe(&self, observer: Arc<dyn Observer>) {
        let _ = observer;
    }

    /// How the store shares its sagas among several engines, if it does: the engine then
    /// drives only the sagas it claims (see [`Leases`]). `None`, the default: the store's
    /// engine drives every saga in flight.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }

    /// Whether the store takes writes, for a store that refuses them for a while and takes
    /// them again on its own (the sled store on a full disk): a saga whose write fails then
    /// stops, writing nothing more, and the engine resumes it from its journal once this is
    /// `true` again, instead of parking it. `None`, the default: a failed write parks the saga
    /// (unless the store has [`leases`](Self::leases), whose beat resumes it).
    fn writable(&self) -> Option<watch::Receiver<bool>> {
        None
    }
}

/// A shared store is a store: lets several engines in turn (a restart in a test, say) or an
/// engine and an inspector use one store.
impl<T: EventStore + ?Sized> EventStore for Arc<T> {
    fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>> {
        (**self).create(record, first)
    }
    fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()> {
        (**self).append(id, events, record)
    }
    fn durable(&self) -> Durable {
        (**self).durable()
    }
    fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        (**self).history(id)
    }
    fn record(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        (**self).record(id)
    }
    fn in_flight(&self) -> Result<Vec<SagaRecord>> {
        (**self).in_flight()
    }
    fn records(&self) -> Result<Vec<SagaRecord>> {
        (**self).records()
    }
    fn records_after(
        &self,
        after: Option<&SagaId>,
        limit: usize,
        keep: &dyn Fn(&SagaRecord) -> bool,
    ) -> Result<Vec<SagaRecord>> {
        (**self).records_after(after, limit, keep)
    }
    fn remove(&self, id: &SagaId) -> Result<()> {
        (**self).remove(id)
    }
    fn observe(&self, observer: Arc<dyn Observer>) {
        (**self).observe(observer)
    }
    fn leases(&self) -> Option<&dyn Leases> {
        (**self).leases()
    }
    fn writable(&self) -> Option<watch::Receiver<bool>> {
        (**self).writable()
    }
}

/// A future that resolves when earlier writes are durable. See [`EventStore::durable`].
#[must_use = "a write is not durable until this resolves"]
#[derive(Debug)]
pub struct Durable(DurableState);

#[derive(Debug)]
enum DurableState {
    Ready(Option<Result<(), StorageError>>),
    Waiting(oneshot::Receiver<Result<(), StorageError>>),
}

impl Durable {
    /// Already durable (a store without persistence, or nothing to wait for).
    pub fn ready() -> Self {
        Self(DurableState::Ready(Some(Ok(()))))
    }

    /// Durable when the flusher answers on this channel.
    pub fn waiting(rx: oneshot::Receiver<Result<(), StorageError>>) -> Self {
        Self(DurableState::Waiting(rx))
    }
}

impl Future for Durable {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let result = match &mut self.0 {
            DurableState::Ready(result) => result.take().unwrap_or(Ok(())),
            DurableState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(result)) => result,
                Poll::Ready(Err(_)) => Err(StorageError::message("the flusher thread stopped")),
            },
        };
        Poll::Ready(result.map_err(|source| source.into_error("flushing")))
    }
}

/// Checks the rules every store enforces before an append: the events are numbered densely and
/// start at `next`, the journal's next sequence number.
pub(crate) fn check_sequence(id: &SagaId, events: &[RecordedEvent], next: u64) -> Result<()> {
    let conflict = || Error::SequenceConflict { id: id.clone(), expected: next };
    for (offset, event) in events.iter().enumerate() {
        if event.seq != next + offset as u64 {
            return Err(conflict());
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod conformance;
