//! What this process wrote and the database has not committed yet: the queue the writer takes
//! its batches from, the waiters of `durable()`, and per saga the uncommitted events and record
//! that reads lay over what they read from the database. Also the next sequence number of
//! every journal this process writes.
//!
//! Plain data behind the store's mutex: no I/O here.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio::sync::oneshot;

use crate::error::StorageError;
use crate::event::{RecordedEvent, SagaId, SagaRecord};

/// A waiter of [`EventStore::durable`](crate::store::EventStore::durable), and the sagas its
/// thread wrote since its last wait: a write of one that another engine took is refused alone.
pub(super) type Waiter = (oneshot::Sender<Result<(), StorageError>>, Vec<SagaId>);

/// One write, encoded, as the writer commits it.
#[derive(Debug)]
pub(super) struct Op {
    pub id: SagaId,
    /// Where the journal must be for the write to apply: `Some(0)` creates the saga, `None`
    /// (a status change alone) applies wherever it is.
    pub expected: Option<u64>,
    /// `(seq, encoded event)`.
    pub events: Vec<(u64, Vec<u8>)>,
    /// The encoded record, and whether it keeps the saga in flight.
    pub record: Option<(Vec<u8>, bool)>,
    /// The epoch of this store's ownership of the saga: the database must still be at it.
    pub epoch: i64,
    /// Posted requests this write applies: deleted in its transaction.
    pub applies: Vec<i64>,
}

/// One saga's uncommitted writes.
#[derive(Debug, Default)]
struct Pending {
    events: Vec<RecordedEvent>,
    record: Option<SagaRecord>,
    /// The last batch with a write of this saga.
    last_batch: u64,
}

/// A batch taken by the writer.
#[derive(Debug)]
pub(super) struct Batch {
    pub number: u64,
    pub ops: Vec<Op>,
    pub waiters: Vec<Waiter>,
}

#[derive(Debug, Default)]
pub(super) struct Overlay {
    next: HashMap<SagaId, u64>,
    /// The sagas this store owns, at the epoch it owns them.
    epochs: HashMap<SagaId, i64>,
    /// Sagas another engine took from this one: their writers are told so.
    lost: HashSet<SagaId>,
    /// Those of them the engine has not been told of by a renewal yet.
    unreported: Vec<SagaId>,
    /// Posted requests that the next write of their saga applies.
    applying: HashMap<SagaId, Vec<i64>>,
    pending: HashMap<SagaId, Pending>,
    queue: Vec<Op>,
    waiters: Vec<Waiter>,
    /// The number of the batch being queued.
    forming: u64,
    /// A batch is being committed.
    writing: bool,
    pub closed: bool,
    /// How many batches failed so far.
    pub failures: u64,
    /// Why the last one failed.
    pub last_failure: Option<StorageError>,
}

impl Overlay {
    /// The next sequence number of a journal this process writes, if it knows it.
    pub(super) fn next(&self, id: &SagaId) -> Option<u64> {
        self.next.get(id).copied()
    }

    /// Notes where a journal read from the database ends, unless a write of this process
    /// got there first (then its number is newer).
    pub(super) fn learn_next(&mut self, id: &SagaId, next: u64) -> u64 {
        *self.next.entry(id.clone()).or_insert(next)
    }

    /// The next write of `id` applies posted request `request`.
    pub(super) fn applying(&mut self, id: &SagaId, request: i64) {
        self.applying.entry(id.clone()).or_default().push(request);
    }

    /// Forgets `request` unless a write took it; returns whether none did.
    pub(super) fn unapplied(&mut self, request: i64) -> bool {
        let mut found = false;
        self.applying.retain(|_, requests| {
            found |= requests.contains(&request);
            requests.retain(|r| *r != request);
            !requests.is_empty()
        });
        found
    }

    /// Queues a write that the caller checked against [`next`](Self::next).
    pub(super) fn push(&mut self, mut op: Op, events: &[RecordedEvent], record: Option<&SagaRecord>) {
        if let Some(requests) = self.applying.remove(&op.id) {
            op.applies.extend(requests);
        }
        let pending = self.pending.entry(op.id.clone()).or_default();
        pending.events.extend_from_slice(events);
        if let Some(record) = record {
            pending.record = Some(record.clone());
        }
        pending.last_batch = self.forming;
        if let Some(last) = events.last() {
            self.next.insert(op.id.clone(), last.seq + 1);
        }
        self.queue.push(op);
    }

    /// The epoch this store owns the saga at, if it does.
    pub(super) fn epoch(&self, id: &SagaId) -> Option<i64> {
        self.epochs.get(id).copied()
    }

    /// This store owns the saga at `epoch` from now on (it created or claimed it).
    pub(super) fn own(&mut self, id: &SagaId, epoch: i64) {
        self.lost.remove(id);
        self.epochs.insert(id.clone(), epoch);
    }

    /// Whether another engine took `id` from this store, which has not owned it again since.
    pub(super) fn was_lost(&self, id: &SagaId) -> bool {
        self.lost.contains(id)
    }

    /// The sagas this store owns, with their epochs.
    pub(super) fn owned(&self) -> Vec<(SagaId, i64)> {
        self.epochs.iter().map(|(id, epoch)| (id.clone(), *epoch)).collect()
    }

    /// Another engine owns these sagas now: this store forgets their uncommitted writes and
    /// where their journals end, and drops their queued writes, whose waiters are told.
    pub(super) fn fence(&mut self, ids: &HashSet<SagaId>) {
        for id in ids {
            self.epochs.remove(id);
            self.next.remove(id);
            self.pending.remove(id);
            if self.lost.insert(id.clone()) {
                self.unreported.push(id.clone());
            }
        }
        self.queue.retain(|op| !ids.contains(&op.id));
    }

    /// The sagas lost since the last call.
    pub(super) fn take_unreported(&mut self) -> Vec<SagaId> {
        std::mem::take(&mut self.unreported)
    }

    /// The answer for a waiter whose thread wrote `sagas`: the batch's, unless one of them was
    /// taken by another engine.
    pub(super) fn answer(
        &self,
        sagas: &[SagaId],
        batch: &Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        match sagas.iter().find(|id| self.lost.contains(*id)) {
            Some(id) => Err(StorageError::fenced(id.clone())),
            None => batch.clone(),
        }
    }

    /// Whether the saga has uncommitted writes or a known journal here.
    pub(super) fn knows(&self, id: &SagaId) -> bool {
        self.next.contains_key(id) || self.pending.contains_key(id)
    }

    pub(super) fn pending_events(&self, id: &SagaId) -> Vec<RecordedEvent> {
        self.pending.get(id).map(|p| p.events.clone()).unwrap_or_default()
    }

    pub(super) fn pending_record(&self, id: &SagaId) -> Option<SagaRecord> {
        self.pending.get(id).and_then(|p| p.record.clone())
    }

    /// Every uncommitted record, by id.
    pub(super) fn pending_records(&self) -> BTreeMap<SagaId, SagaRecord> {
        self.pending.iter().filter_map(|(id, p)| Some((id.clone(), p.record.clone()?))).collect()
    }

    /// Whether `durable()` has nothing to wait for.
    pub(super) fn settled(&self) -> bool {
        self.queue.is_empty() && !self.writing
    }

    pub(super) fn wait(&mut self, waiter: Waiter) {
        self.waiters.push(waiter);
    }

    /// The writer's next batch, if there is anything to answer.
    pub(super) fn take(&mut self) -> Option<Batch> {
        if self.queue.is_empty() && self.waiters.is_empty() {
            return None;
        }
        let number = self.forming;
        self.forming += 1;
        self.writing = true;
        Some(Batch {
            number,
            ops: std::mem::take(&mut self.queue),
            waiters: std::mem::take(&mut self.waiters),
        })
    }

    /// The batch is committed: its writes are the database's now.
    pub(super) fn committed(&mut self, batch: &Batch) {
        self.writing = false;
        let mut in_flight: HashMap<&SagaId, bool> = HashMap::new();
        for op in &batch.ops {
            if let Some((_, keeps)) = op.record {
                in_flight.insert(&op.id, keeps);
            }
            let Some(pending) = self.pending.get_mut(&op.id) else { continue };
            // This saga's oldest pending events are this op's: batches commit in order.
            pending.events.drain(..op.events.len().min(pending.events.len()));
        }
        for op in &batch.ops {
            if self.pending.get(&op.id).is_some_and(|p| p.last_batch <= batch.number) {
                self.pending.remove(&op.id);
                // A finished journal takes no more appends here: forget it, to bound the
                // memory. One that is reopened reads its end from the database again.
                if in_flight.get(&op.id) == Some(&false) {
                    self.next.remove(&op.id);
                    // The database let go of a finished saga's owner.
                    self.epochs.remove(&op.id);
                }
            }
        }
    }

    /// The batch failed. Every write queued behind it builds on it, so those are dropped too,
    /// uncommitted: returns their waiters, who are told the same failure. The journals they
    /// touched are read from the database again before their next append.
    pub(super) fn failed(&mut self, batch: &Batch, error: StorageError) -> Vec<Waiter> {
        self.writing = false;
        for op in batch.ops.iter().chain(&self.queue) {
            self.next.remove(&op.id);
        }
        self.queue.clear();
        self.pending.clear();
        self.failures += 1;
        self.last_failure = Some(error);
        std::mem::take(&mut self.waiters)
    }

    /// Forgets a removed saga.
    pub(super) fn forget(&mut self, id: &SagaId) {
        self.next.remove(id);
        self.pending.remove(id);
        self.epochs.remove(id);
        self.lost.remove(id);
    }
}
