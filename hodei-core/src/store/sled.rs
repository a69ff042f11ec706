use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{Durable, EventStore, check_sequence};
use crate::codec::{decode_record, encode_record};
use crate::error::{Error, Result, StorageError};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord};

/// The on-disk store: sled 0.34 in a data directory, made durable by group commit.
///
/// Layout of the directory: `LOCK` (held for the store's lifetime, so that a second process
/// gets [`Error::Locked`]) and `journal/` (the sled database) with four trees:
/// - `events`: key `saga id ‖ 0xFF ‖ first seq (u64 BE)`, one record per append: the events of
///   one append are stored together, so a step transition costs one insert. `0xFF` never
///   occurs in UTF-8, so one saga's prefix never matches another's;
/// - `records`: key `saga id`, the summary record;
/// - `in_flight`: key `saga id`, empty value; the recovery index;
/// - `purging`: key `saga id`; a removal that must be finished if the process died in it.
///
/// **Only single-key writes.** A sled 0.34 transaction (or `apply_batch`) switches the whole
/// process into a mode where every operation takes a global lock and each commit stops all
/// writers; measured here, that cost more than the rest of a saga. So the journal record is the
/// one commit point of every change, and the summary record and the in-flight index are
/// derived from it: written after it, and repaired from the journal when they lag (see
/// [`in_flight`](EventStore::in_flight) and `create`).
///
/// Sequence check: the store keeps each open journal's next sequence number in memory
/// (sharded), so an append checks it without reading sled. The `LOCK` makes this store the only
/// writer of the directory, which is what makes that memory authoritative.
///
/// Durability: one dedicated thread calls sled's synchronous `flush` and wakes every writer
/// whose write that flush covered. sled 0.34.7's `flush_async` deadlocks when awaited
/// concurrently (spacejam/sled#1308), which is why it is not used.
#[derive(Debug)]
pub struct SledStore {
    next_seq: SequenceShards,
    events: sled::Tree,
    records: sled::Tree,
    in_flight: sled::Tree,
    purging: sled::Tree,
    flusher: Flusher,
    db: sled::Db,
    path: PathBuf,
    _lock: File,
}

fn storage(operation: &'static str) -> impl FnOnce(sled::Error) -> Error {
    move |e| Error::Storage { operation, source: StorageError::new(e) }
}

fn io(operation: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Storage { operation, source: StorageError::new(e) }
}

impl SledStore {
    /// Opens (or creates) the store in `path`.
    ///
    /// Fails with [`Error::Locked`] if another process, or another store in this one, has it
    /// open.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        fs::create_dir_all(&path).map_err(io("creating the data directory"))?;
        let lock_path = path.join("LOCK");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io("opening the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock_path).ok().filter(|h| !h.trim().is_empty());
                return Err(Error::Locked { path, holder: holder.map(|h| h.trim().to_string()) });
            }
            Err(TryLockError::Error(e)) => return Err(io("locking the data directory")(e)),
        }
        // Only a hint for the error message of the next process; the lock is what counts.
        lock.set_len(0).and_then(|()| write!(lock, "held by pid {}", std::process::id())).ok();

        let db = sled::Config::new()
            .path(path.join("journal"))
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()
            .map_err(storage("opening the sled database"))?;
        let tree = |name: &str| db.open_tree(name).map_err(storage("opening a tree"));
        let (events, records, in_flight, purging) =
            (tree("events")?, tree("records")?, tree("in_flight")?, tree("purging")?);
        let flusher = Flusher::start(db.clone()).map_err(io("starting the flusher thread"))?;
        let next_seq = SequenceShards::default();
        let store = Self { next_seq, events, records, in_flight, purging, flusher, db, path, _lock: lock };
        for key in store.purging.iter().keys() {
            let key = key.map_err(storage("reading unfinished removals"))?;
            store.finish_removal(&key)?;
        }
        Ok(store)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many group flushes the store has made: durable writes over this is the average
    /// group-commit size.
    pub fn flush_count(&self) -> u64 {
        self.flusher.shared.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What sled reports as its size on disk, in bytes.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.db.size_on_disk().map_err(storage("measuring the database"))
    }

    fn decode_record(id: &str, bytes: &[u8]) -> Result<SagaRecord> {
        decode_record(bytes).map_err(|reason| Error::CorruptRecord { saga: id.into(), seq: None, reason })
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.flusher.stop();
        // Writes made without waiting for durability still reach the disk on a clean close.
        let _ = self.db.flush();
    }
}

fn event_key(id: &SagaId, seq: u64) -> Vec<u8> {
    let mut key = journal_prefix(id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn journal_prefix(id: &SagaId) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.as_str().len() + 9);
    key.extend_from_slice(id.as_str().as_bytes());
    key.push(0xFF);
    key
}

fn encode<T: serde::Serialize + ?Sized>(id: &SagaId, seq: Option<u64>, value: &T) -> Result<Vec<u8>> {
    encode_record(value).map_err(|reason| Error::Codec {
        action: "encode",
        what: match seq {
            Some(seq) => format!("event {seq} of saga `{id}`"),
            None => format!("the record of saga `{id}`"),
        },
        reason,
    })
}

impl EventStore for SledStore {
    fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>> {
        let id = &record.id;
        check_sequence(id, std::slice::from_ref(first), 0)?;
        let record_bytes = encode(id, None, record)?;
        let event_bytes = encode(id, Some(0), std::slice::from_ref(first))?;
        let name = id.as_str().as_bytes();
        let mut shard = self.next_seq.shard(id);
        // Index first, so that a journal never exists unindexed. The first event is the commit
        // point and the existence check at once.
        self.in_flight.insert(name, &[]).map_err(storage("creating a saga"))?;
        let created = self
            .events
            .compare_and_swap(event_key(id, 0), None::<&[u8]>, Some(event_bytes))
            .map_err(storage("creating a saga"))?;
        if created.is_err() {
            let existing = self.record_or_rebuild(id)?.ok_or_else(|| Error::SagaNotFound(id.clone()))?;
            if existing.status.is_final() {
                self.in_flight.remove(name).map_err(storage("creating a saga"))?;
            }
            return Ok(Some(existing));
        }
        self.records.insert(name, record_bytes).map_err(storage("creating a saga"))?;
        shard.insert(id.clone(), 1);
        Ok(None)
    }

    fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()> {
        // Held across the write, so two appends to one saga cannot interleave between the
        // check and the insert.
        let mut shard = self.next_seq.shard(id);
        if events.is_empty() {
            // A status change alone needs no sequence number: it must work even for a journal
            // that can no longer be read, so that such a saga can be parked.
            if let Some(record) = record {
                self.write_record(record)?;
                if record.status.is_final() {
                    shard.remove(id);
                }
            }
            return Ok(());
        }
        let next = match shard.get(id) {
            Some(next) => *next,
            None => {
                if record.is_some_and(|r| !r.status.is_final()) {
                    // A finished journal reopened (a completed child saga whose parent
                    // compensates): indexed before its next event, as `create` does, so that
                    // it is never in flight unindexed.
                    self.in_flight
                        .insert(id.as_str().as_bytes(), &[])
                        .map_err(storage("reopening a saga"))?;
                }
                self.read_journal(id)?.len() as u64
            }
        };
        // Sequence 0 is written by `create` alone.
        if next == 0 {
            return Err(Error::SagaNotFound(id.clone()));
        }
        check_sequence(id, events, next)?;
        let value = encode(id, Some(next), events)?;
        self.events.insert(event_key(id, next), value).map_err(storage("appending"))?;
        shard.insert(id.clone(), next + events.len() as u64);
        if let Some(record) = record {
            self.write_record(record)?;
            if record.status.is_final() {
                // A finished journal takes no more appends; forget it to bound the memory.
                shard.remove(id);
            }
        }
        Ok(())
    }

    fn durable(&self) -> Durable {
        self.flusher.request()
    }

    fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        let history = self.read_journal(id)?;
        // The engine reads a journal before it resumes writing it: remember where it ends.
        if history.last().is_some_and(|last| !last.event.is_final()) {
            self.next_seq.shard(id).entry(id.clone()).or_insert(history.len() as u64);
        }
        Ok(history)
    }

    fn record(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        let bytes = self.records.get(id.as_str()).map_err(storage("reading a saga record"))?;
        bytes.map(|b| Self::decode_record(id.as_str(), &b)).transpose()
    }

    fn in_flight(&self) -> Result<Vec<SagaRecord>> {
        let mut out = Vec::new();
        for key in self.in_flight.iter().keys() {
            let key = key.map_err(storage("reading the in-flight index"))?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let Ok(id) = SagaId::new(name.clone()) else {
                return Err(Error::CorruptRecord {
                    saga: name,
                    seq: None,
                    reason: "invalid id in the in-flight index".into(),
                });
            };
            match self.record_or_rebuild(&id)? {
                Some(record) => out.push(record),
                // Indexed, but the process died before the first event: the start was never
                // acknowledged, so there is nothing to resume.
                None => {
                    self.in_flight.remove(&key).map_err(storage("repairing the in-flight index"))?;
                }
            }
        }
        Ok(out)
    }

    fn records(&self) -> Result<Vec<SagaRecord>> {
        self.records
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(storage("reading saga records"))?;
                Self::decode_record(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    fn remove(&self, id: &SagaId) -> Result<()> {
        self.next_seq.shard(id).remove(id);
        let name = id.as_str().as_bytes();
        // Marked first, so that a removal cut short by a crash is finished on the next open
        // instead of leaving half a journal behind.
        self.purging.insert(name, &[]).map_err(storage("removing a saga"))?;
        self.finish_removal(name)?;
        Ok(())
    }
}

impl SledStore {
    /// Writes a summary record after its journal: the record and the index follow the
    /// journal, and are repaired from it if the process dies in between.
    fn write_record(&self, record: &SagaRecord) -> Result<()> {
        let name = record.id.as_str().as_bytes();
        self.records
            .insert(name, encode(&record.id, None, record)?)
            .map_err(storage("updating a saga record"))?;
        if record.status.is_final() {
            self.in_flight.remove(name).map_err(storage("updating the in-flight index"))?;
        }
        Ok(())
    }

    fn finish_removal(&self, name: &[u8]) -> Result<()> {
        let mut prefix = name.to_vec();
        prefix.push(0xFF);
        self.records.remove(name).map_err(storage("removing a saga"))?;
        self.in_flight.remove(name).map_err(storage("removing a saga"))?;
        for key in self.events.scan_prefix(&prefix).keys() {
            let key = key.map_err(storage("removing a saga"))?;
            self.events.remove(key).map_err(storage("removing a saga"))?;
        }
        self.purging.remove(name).map_err(storage("removing a saga"))?;
        Ok(())
    }

    /// The saga's record, rebuilt from its journal if the process died between writing the
    /// journal and the record. `None` if there is no journal either.
    fn record_or_rebuild(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        if let Some(record) = self.record(id)? {
            return Ok(Some(record));
        }
        let journal = self.read_journal(id)?;
        let Some(first) = journal.first() else { return Ok(None) };
        let Event::SagaStarted { definition, version, .. } = &first.event else {
            return Err(Error::CorruptRecord {
                saga: id.to_string(),
                seq: Some(0),
                reason: "the journal does not begin with SagaStarted".into(),
            });
        };
        let record = SagaRecord::new(id.clone(), definition.clone(), *version, first.at);
        self.records
            .insert(id.as_str(), encode(id, None, &record)?)
            .map_err(storage("repairing a record"))?;
        Ok(Some(record))
    }

    fn read_journal(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        let prefix = journal_prefix(id);
        let mut out: Vec<RecordedEvent> = Vec::new();
        for item in self.events.scan_prefix(&prefix) {
            let (key, value) = item.map_err(storage("reading a journal"))?;
            let expected = out.len() as u64;
            let corrupt = |seq, reason| Error::CorruptRecord { saga: id.to_string(), seq: Some(seq), reason };
            let seq = <[u8; 8]>::try_from(&key[prefix.len()..])
                .map(u64::from_be_bytes)
                .map_err(|_| corrupt(expected, format!("malformed key of {} bytes", key.len())))?;
            if seq != expected {
                return Err(corrupt(expected, format!("missing; the journal jumps to {seq}")));
            }
            let batch: Vec<RecordedEvent> = decode_record(&value).map_err(|reason| corrupt(seq, reason))?;
            if batch.is_empty() {
                return Err(corrupt(seq, "empty record".into()));
            }
            for (offset, event) in batch.into_iter().enumerate() {
                if event.seq != seq + offset as u64 {
                    return Err(corrupt(seq, format!("record claims sequence {}", event.seq)));
                }
                out.push(event);
            }
        }
        Ok(out)
    }
}

/// The next sequence number of every journal written through this store, sharded so that
/// concurrent sagas rarely share a lock.
#[derive(Debug, Default)]
struct SequenceShards([Mutex<HashMap<SagaId, u64>>; 32]);

impl SequenceShards {
    fn shard(&self, id: &SagaId) -> MutexGuard<'_, HashMap<SagaId, u64>> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut hasher);
        let shard = &self.0[hasher.finish() as usize % self.0.len()];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Group commit: writers queue a waiter, one thread flushes and answers every waiter that was
/// queued before the flush began. A write made before its waiter was queued is therefore always
/// covered by the flush that answers it.
#[derive(Debug)]
struct Flusher {
    shared: Arc<FlushShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct FlushShared {
    queue: Mutex<FlushQueue>,
    wake: Condvar,
    flushes: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct FlushQueue {
    waiters: Vec<oneshot::Sender<Result<(), StorageError>>>,
    closed: bool,
}

impl FlushShared {
    fn queue(&self) -> MutexGuard<'_, FlushQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Flusher {
    fn start(db: sled::Db) -> std::io::Result<Self> {
        let shared = Arc::new(FlushShared::default());
        let worker = shared.clone();
        let thread = std::thread::Builder::new().name("hodei-flusher".into()).spawn(move || {
            loop {
                let batch = {
                    let mut queue = worker.queue();
                    while queue.waiters.is_empty() && !queue.closed {
                        queue = worker.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
                    }
                    if queue.waiters.is_empty() {
                        return;
                    }
                    std::mem::take(&mut queue.waiters)
                };
                let result = db.flush().map(drop).map_err(StorageError::new);
                worker.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    fn request(&self) -> Durable {
        let (tx, rx) = oneshot::channel();
        let mut queue = self.shared.queue();
        if queue.closed {
            return Durable::waiting(rx); // tx dropped: resolves to "flusher stopped"
        }
        queue.waiters.push(tx);
        drop(queue);
        self.shared.wake.notify_one();
        Durable::waiting(rx)
    }

    fn stop(&mut self) {
        self.shared.queue().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn sled_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance::run_all(&SledStore::open(dir.path()).unwrap()).await;
    }

    #[test]
    fn a_second_open_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledStore::open(dir.path()).unwrap();
        match SledStore::open(dir.path()) {
            Err(Error::Locked { path, holder }) => {
                assert_eq!(path, dir.path());
                assert_eq!(holder, Some(format!("held by pid {}", std::process::id())));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn the_lock_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path()).unwrap());
        assert!(SledStore::open(dir.path()).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_durable_writes_all_resolve_and_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path()).unwrap());
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    for n in 0..20u32 {
                        store.events.insert(format!("k{i}-{n}"), &[1u8][..]).unwrap();
                        store.durable().await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.events.len(), 64 * 20);
        // 1280 durable writes from 64 concurrent writers: sharing must have happened.
        assert!(store.flush_count() < 64 * 20, "{} flushes", store.flush_count());
    }
}
