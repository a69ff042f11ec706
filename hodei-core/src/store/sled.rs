use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::oneshot;

use super::{Durable, EventStore, check_sequence};
use crate::codec::{decode_record, encode_record};
use crate::error::{Error, Result, StorageError};
use crate::event::{RecordedEvent, SagaId, SagaRecord};

/// The on-disk store: sled 0.34 in a data directory, made durable by group commit.
///
/// Layout of the directory: `LOCK` (held for the store's lifetime, so that a second process
/// gets [`Error::Locked`]) and `journal/` (the sled database) with three trees:
/// - `events`: key `saga id ‖ 0xFF ‖ seq (u64 BE)`, one record per event. `0xFF` never occurs
///   in UTF-8, so one saga's prefix never matches another's;
/// - `records`: key `saga id`, the summary record;
/// - `in_flight`: key `saga id`, empty value; the recovery index.
///
/// Durability: one dedicated thread calls sled's synchronous `flush` and wakes every writer
/// whose write that flush covered. sled 0.34.7's `flush_async` deadlocks when awaited
/// concurrently (spacejam/sled#1308), which is why it is not used.
#[derive(Debug)]
pub struct SledStore {
    events: sled::Tree,
    records: sled::Tree,
    in_flight: sled::Tree,
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
        let (events, records, in_flight) = (tree("events")?, tree("records")?, tree("in_flight")?);
        let flusher = Flusher::start(db.clone()).map_err(io("starting the flusher thread"))?;
        Ok(Self { events, records, in_flight, flusher, db, path, _lock: lock })
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

fn encode(id: &SagaId, seq: Option<u64>, value: &impl serde::Serialize) -> Result<Vec<u8>> {
    encode_record(value).map_err(|reason| Error::Codec {
        action: "encode",
        what: match seq {
            Some(seq) => format!("event {seq} of saga `{id}`"),
            None => format!("the record of saga `{id}`"),
        },
        reason,
    })
}

/// Why a transaction gave up without writing.
enum Abort {
    SequenceConflict,
    Exists(sled::IVec),
}

impl EventStore for SledStore {
    fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>> {
        let id = &record.id;
        check_sequence(id, std::slice::from_ref(first), 0)?;
        let record_bytes = encode(id, None, record)?;
        let event_bytes = encode(id, Some(0), first)?;
        let key = id.as_str().as_bytes();
        let result = (&self.events, &self.records, &self.in_flight).transaction(|(ev, rec, inf)| {
            if let Some(existing) = rec.get(key)? {
                return Err(ConflictableTransactionError::Abort(Abort::Exists(existing)));
            }
            rec.insert(key, record_bytes.as_slice())?;
            ev.insert(event_key(id, 0), event_bytes.as_slice())?;
            if !record.status.is_final() {
                inf.insert(key, &[])?;
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(None),
            Err(TransactionError::Abort(Abort::Exists(bytes))) => {
                Self::decode_record(id.as_str(), &bytes).map(Some)
            }
            Err(TransactionError::Abort(Abort::SequenceConflict)) => {
                Err(Error::SequenceConflict { id: id.clone(), expected: 0 })
            }
            Err(TransactionError::Storage(e)) => Err(storage("creating a saga")(e)),
        }
    }

    fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()> {
        let Some(first) = events.first().map(|e| e.seq) else {
            return match record {
                Some(record) => self.append_atomically(id, &[], 0, Some(record)),
                None => Ok(()),
            };
        };
        let conflict = || Error::SequenceConflict { id: id.clone(), expected: first };
        // Sequence 0 is written by `create` alone.
        if first == 0 {
            return Err(conflict());
        }
        check_sequence(id, events, first)?;
        let encoded = events
            .iter()
            .map(|e| Ok((event_key(id, e.seq), encode(id, Some(e.seq), e)?)))
            .collect::<Result<Vec<_>>>()?;
        if let ([(key, value)], None) = (encoded.as_slice(), record) {
            // The hot path, one event per step transition: a compare-and-swap instead of a
            // transaction. The journal is append-only, so "previous exists, this one does
            // not" is exactly "the journal ends at first - 1".
            if !self.events.contains_key(event_key(id, first - 1)).map_err(storage("appending"))? {
                return Err(conflict());
            }
            return match self.events.compare_and_swap(key, None::<&[u8]>, Some(value.as_slice())) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(conflict()),
                Err(e) => Err(storage("appending")(e)),
            };
        }
        self.append_atomically(id, &encoded, first, record)
    }

    fn durable(&self) -> Durable {
        self.flusher.request()
    }

    fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        let prefix = journal_prefix(id);
        let mut out = Vec::new();
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
            let event: RecordedEvent = decode_record(&value).map_err(|reason| corrupt(seq, reason))?;
            if event.seq != seq {
                return Err(corrupt(seq, format!("record claims sequence {}", event.seq)));
            }
            out.push(event);
        }
        Ok(out)
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
            let corrupt =
                |reason: &str| Error::CorruptRecord { saga: name.clone(), seq: None, reason: reason.into() };
            let id = SagaId::new(name.clone()).map_err(|_| corrupt("invalid id in the in-flight index"))?;
            out.push(self.record(&id)?.ok_or_else(|| corrupt("in-flight, but has no record"))?);
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
        let keys: Vec<sled::IVec> = self
            .events
            .scan_prefix(journal_prefix(id))
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(storage("reading a journal"))?;
        let key = id.as_str().as_bytes();
        (&self.events, &self.records, &self.in_flight)
            .transaction(|(ev, rec, inf)| {
                for k in &keys {
                    ev.remove(k)?;
                }
                rec.remove(key)?;
                inf.remove(key)?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => storage("removing a saga")(e),
                TransactionError::Abort(()) => Error::Storage {
                    operation: "removing a saga",
                    source: StorageError::message("transaction aborted"),
                },
            })
    }
}

impl SledStore {
    fn append_atomically(
        &self,
        id: &SagaId,
        encoded: &[(Vec<u8>, Vec<u8>)],
        first: u64,
        record: Option<&SagaRecord>,
    ) -> Result<()> {
        let record_bytes = record.map(|r| encode(id, None, r)).transpose()?;
        let key = id.as_str().as_bytes();
        let result = (&self.events, &self.records, &self.in_flight).transaction(|(ev, rec, inf)| {
            if let Some((first_key, _)) = encoded.first() {
                let prev_missing = ev.get(event_key(id, first - 1))?.is_none();
                if prev_missing || ev.get(first_key.as_slice())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(Abort::SequenceConflict));
                }
            }
            for (k, v) in encoded {
                ev.insert(k.as_slice(), v.as_slice())?;
            }
            if let (Some(record), Some(bytes)) = (record, &record_bytes) {
                if rec.get(key)?.is_none() {
                    return Err(ConflictableTransactionError::Abort(Abort::SequenceConflict));
                }
                rec.insert(key, bytes.as_slice())?;
                if record.status.is_final() {
                    inf.remove(key)?;
                } else {
                    inf.insert(key, &[])?;
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(_)) if encoded.is_empty() => Err(Error::SagaNotFound(id.clone())),
            Err(TransactionError::Abort(_)) => {
                Err(Error::SequenceConflict { id: id.clone(), expected: first })
            }
            Err(TransactionError::Storage(e)) => Err(storage("appending")(e)),
        }
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
