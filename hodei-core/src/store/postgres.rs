//! [`PostgresStore`]: journals in PostgreSQL, so that several processes can share them.
//!
//! # Design
//!
//! [`EventStore`] is synchronous and is called from inside Tokio tasks, on whatever runtime
//! the engine runs (the tests use `current_thread` too). So the store never drives database
//! I/O on the caller's runtime: it owns **one background thread running its own
//! `current_thread` runtime**, on which every connection and its I/O task live.
//!
//! - **Writes are group-committed, as sled's are.** `append` and `create` check the sequence
//!   against an in-memory next-sequence cache, encode, and queue the write; it is visible to
//!   this process's reads at once through a write-behind overlay (`overlay.rs`). One writer
//!   task (`writer.rs`) takes everything queued, commits it in one transaction (three
//!   pipelined statements whatever the batch's size), and only after `COMMIT` returns answers
//!   the [`durable`](EventStore::durable) futures that were waiting: nothing is acknowledged
//!   before it is committed, and one commit covers every saga that wrote meanwhile.
//! - **The database checks the sequence too**, in the same transaction: each saga's row holds
//!   its journal's next sequence number, and the batch's `UPDATE ... WHERE next_seq =
//!   expected` (or `INSERT ... ON CONFLICT DO NOTHING` for a creation) must find every saga
//!   where this process expects it; the row stays locked until the commit, and the events'
//!   primary key `(saga_id, seq)` is the last line of defence. A batch that misses rolls
//!   back whole and fails with [`PostgresError::SequenceConflict`]: a second process writing
//!   the same saga changes nothing.
//! - **A failed batch fails every waiter, and is forgotten.** A refused or lost transaction
//!   fails the `durable()` futures waiting on it, and the writes queued behind it (they build
//!   on it), with the same [`Error::Storage`]; the overlay drops all of them and the sagas
//!   they touched read their journal's end from the database before their next append, so
//!   the process never shows writes that do not exist. A `durable()` called after the failure
//!   by a thread whose writes it dropped fails too (the store remembers, per thread, the
//!   failure count at its oldest write not yet waited for; the engine waits right after it
//!   writes, on the same thread). The writer opens a new connection for the next batch.
//! - **Reads that miss the overlay are a blocking round trip**: the calling thread hands the
//!   query to the background runtime and blocks on a channel for the answer, as a sled read
//!   blocks on the disk. This cannot deadlock a runtime: the background runtime never waits
//!   for the caller's. (`Handle::block_on` would panic inside a runtime, and
//!   `block_in_place` only works on multi-thread runtimes.) Reads use a small pool of
//!   connections, so concurrent reads are concurrent queries.
//!
//! Records are the store's versioned, checksummed envelopes (`codec.rs`), as `bytea`: one row
//! per event, one row per saga. Tables and migrations: `postgres/migrations/`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{Durable, EventStore, check_sequence};
use crate::codec::{FORMAT_V1, decode_record, decode_record_versioned, encode_record};
use crate::error::{Error, Result, StorageError};
use crate::event::{RecordedEvent, SagaId, SagaRecord};

mod connection;
mod error;
mod leases;
mod migrations;
mod options;
mod overlay;
mod tls;
mod writer;

use connection::{Connector, Readers};
pub use error::PostgresError;
pub use options::{DEFAULT_LEASE, PostgresOptions};
use overlay::{Op, Overlay};

/// Journals in PostgreSQL (feature `postgres`). See the [module docs](self) for the design.
///
/// [`connect`](Self::connect) applies the schema's migrations, so a fresh database (or
/// schema, with [`PostgresOptions::schema`]) needs nothing else. Errors of the database reach
/// callers as [`Error::Storage`], whose source is a [`PostgresError`] or the driver's error.
#[derive(Debug)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the store's handle, its background runtime and its writer share.
#[derive(Debug)]
struct Shared {
    overlay: Mutex<Overlay>,
    /// Wakes the writer when something is queued.
    wake: Notify,
    readers: Readers,
    runtime: tokio::runtime::Handle,
    /// This engine's id among those sharing the database.
    member: String,
    /// This process's hold on `member`, random: a later process under the same name takes
    /// the name over with its own.
    incarnation: i64,
    /// A later process took `member` over: this store writes and claims nothing more.
    superseded: AtomicBool,
    lease: Duration,
    /// Set by the first renewal, which also takes back this engine's own sagas.
    renewed: AtomicBool,
    /// A claim failed on its way back (the database went away mid-call): it may have committed
    /// without this engine hearing of it, so the next renewal looks for sagas the database
    /// says this engine owns that it does not know it owns.
    unsure: AtomicBool,
    /// Woken when a request is posted for one of this engine's sagas.
    posted: Arc<Notify>,
    /// When the listener last heard a notification for this engine, and whether the engine
    /// was told that notifications do not seem to arrive.
    heard: Mutex<Option<std::time::Instant>>,
    warned_unheard: AtomicBool,
}

impl Shared {
    fn overlay(&self) -> MutexGuard<'_, Overlay> {
        // Every change to the overlay is made whole under the lock before anything can panic.
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A later process took this engine's name: this one stops. Everything it owned is lost to
    /// it (told once to its engine by the next renewal), and it claims, creates and renews
    /// nothing from now on.
    fn supersede(&self) {
        if !self.superseded.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::error!(
                engine = %self.member,
                "another process took this engine's id: this one drives none of its sagas any more \
                 (two live processes must not share an engine id; a restarted one takes it over)"
            );
        }
    }
}

fn database(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |e| Error::Storage { operation, source: StorageError::new(PostgresError::from(e)) }
}

/// A number for this process's hold on its engine id that another process, or another store
/// in this one, is not going to pick: std's hasher keys are random per process and differ
/// between calls, and the clock and pid mix in.
fn incarnation() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    hasher.write_u32(std::process::id());
    // Never 0, which rows from before incarnations hold.
    (hasher.finish() | 1) as i64
}

fn refused(operation: &'static str, e: PostgresError) -> Error {
    Error::Storage { operation, source: StorageError::new(e) }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db?sslmode=...`)
    /// and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// [`connect`](Self::connect), with options.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self> {
        let connector = Connector::new(url, &options)?;
        let lease = options.checked_lease().map_err(|e| refused("connecting to PostgreSQL", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
            Error::Storage { operation: "starting the PostgreSQL thread", source: StorageError::new(e) }
        })?;
        let shared = Arc::new(Shared {
            overlay: Mutex::default(),
            wake: Notify::new(),
            readers: Readers::new(connector),
            runtime: runtime.handle().clone(),
            member: options.member(),
            incarnation: incarnation(),
            superseded: AtomicBool::new(false),
            lease,
            renewed: AtomicBool::new(false),
            unsure: AtomicBool::new(false),
            posted: Arc::new(Notify::new()),
            heard: Mutex::new(None),
            warned_unheard: AtomicBool::new(false),
        });
        let (ready, started) = oneshot::channel();
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hodei-postgres".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match open_writer(&worker).await {
                        Ok(connection) => {
                            let _ = ready.send(Ok(()));
                            tokio::spawn(leases::listen(worker.clone()));
                            writer::run(worker.clone(), Some(connection)).await;
                            release(&worker).await;
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| Error::Storage {
                operation: "starting the PostgreSQL thread",
                source: StorageError::new(e),
            })?;
        let started = started
            .await
            .unwrap_or_else(|_| Err(refused("connecting to PostgreSQL", PostgresError::Stopped)));
        match started {
            Ok(()) => Ok(Self { shared, thread: Some(thread) }),
            Err(e) => {
                // The thread has returned, or is about to.
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// Runs `query` on the background runtime and blocks this thread until it answers.
    fn call<T, F>(&self, operation: &'static str, query: impl FnOnce(Arc<Shared>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let future = query(self.shared.clone());
        self.shared.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        // A runtime that has shut down drops the task, and with it `tx`.
        let answer = || rx.recv().unwrap_or_else(|_| Err(refused(operation, PostgresError::Stopped)));
        // The store's calls block (the `EventStore` trait is synchronous), and engines make them
        // from async code. On a multi-thread runtime the worker hands its other tasks over while
        // it waits: a round trip that takes seconds (the database restarting, a lost link)
        // must not stall the engine's lease beat and every other task queued behind it.
        match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(answer),
            _ => answer(),
        }
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// Runs one statement on one of the store's connections, in a transaction of its own,
    /// blocking this thread until the database answers. For what is built on the store and
    /// shares its database: the control plane keeps its PKI (`hodei_pki_*`, created by this
    /// store's migrations) there, so that every engine trusts one CA. `sql` is prepared once
    /// per connection.
    pub fn run_statement(
        &self,
        operation: &'static str,
        sql: &'static str,
        params: Vec<SqlParam>,
    ) -> Result<Vec<SqlRow>> {
        self.query(operation, sql, params)
    }

    /// This engine's id among the engines sharing the database.
    pub fn engine_id(&self) -> &str {
        &self.shared.member
    }

    /// Takes a saga this store does not own (one reopened or forked, or one this engine lost
    /// and whose new owner died): refused with [`Error::Fenced`] while a live engine holds it.
    fn take_over(&self, id: &SagaId) -> Result<()> {
        if self.shared.superseded.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Fenced(id.clone()));
        }
        match self.claim_one(id)? {
            Some((epoch, next)) => {
                let mut overlay = self.shared.overlay();
                overlay.own(id, epoch);
                overlay.learn_next(id, next);
                Ok(())
            }
            None if self.next_in_database(id)?.is_none() => Err(Error::SagaNotFound(id.clone())),
            None => Err(Error::Fenced(id.clone())),
        }
    }

    /// Queues a checked write.
    fn push(&self, overlay: &mut Overlay, op: Op, events: &[RecordedEvent], record: Option<&SagaRecord>) {
        Unsynced::note(self.id(), overlay.failures, &op.id);
        overlay.push(op, events, record);
        self.shared.wake.notify_one();
    }

    /// The existing saga's record, for `create`.
    fn existing(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        if let Some(record) = self.shared.overlay().pending_record(id) {
            return Ok(Some(record));
        }
        self.record_in_database(id)
    }

    /// Runs one query on a reader connection, blocking this thread until it answers.
    fn query(&self, operation: &'static str, sql: &'static str, params: Vec<Param>) -> Result<Vec<Row>> {
        self.call(operation, move |shared| async move {
            let mut client = shared.readers.get().await.map_err(database(operation))?;
            let params: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            client.query_prepared(sql, &params).await.map_err(database(operation))
        })
    }

    fn record_in_database(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        let sql = "SELECT record FROM hodei_sagas WHERE id = $1";
        let rows = self.query("reading a saga record", sql, vec![Box::new(id.as_str().to_owned())])?;
        rows.first().map(|row| decode_saga(id.as_str(), row.get(0))).transpose()
    }

    /// Where the journal ends in the database; `None` if the saga is not there.
    fn next_in_database(&self, id: &SagaId) -> Result<Option<u64>> {
        let sql = "SELECT next_seq FROM hodei_sagas WHERE id = $1";
        let rows = self.query("reading where a journal ends", sql, vec![Box::new(id.as_str().to_owned())])?;
        Ok(rows.first().map(|row| row.get::<_, i64>(0) as u64))
    }

    /// Records from the database in id order: those after `after`, at most `limit`, or every
    /// one (in flight only, if asked).
    fn records_in_database(
        &self,
        after: Option<&SagaId>,
        limit: Option<usize>,
        in_flight_only: bool,
    ) -> Result<Vec<SagaRecord>> {
        let sql = "SELECT id, record FROM hodei_sagas
                   WHERE ($1::text IS NULL OR id > $1) AND (in_flight OR NOT $2)
                   ORDER BY id LIMIT $3";
        let params: Vec<Param> = vec![
            Box::new(after.map(|id| id.as_str().to_owned())),
            Box::new(in_flight_only),
            Box::new(limit.map(|l| l as i64)),
        ];
        let rows = self.query("reading saga records", sql, params)?;
        rows.iter().map(|row| decode_saga(row.get(0), row.get(1))).collect()
    }

    fn journal_in_database(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        let sql = "SELECT seq, body FROM hodei_events WHERE saga_id = $1 ORDER BY seq";
        let rows = self.query("reading a journal", sql, vec![Box::new(id.as_str().to_owned())])?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let seq = row.get::<_, i64>(0) as u64;
            let corrupt = |reason| Error::CorruptRecord { saga: id.to_string(), seq: Some(seq), reason };
            if seq != out.len() as u64 {
                return Err(corrupt(format!("the journal jumps from {} to {seq}", out.len())));
            }
            let (mut event, format): (RecordedEvent, u8) =
                decode_record_versioned(row.get(1)).map_err(corrupt)?;
            if format == FORMAT_V1 {
                event.event.tag_legacy_payloads();
            }
            if event.seq != seq {
                return Err(corrupt(format!("the record claims sequence {}", event.seq)));
            }
            out.push(event);
        }
        Ok(out)
    }

    /// Records from the database, with this process's uncommitted records laid over them.
    fn merged_records(&self, in_flight_only: bool) -> Result<Vec<SagaRecord>> {
        // The overlay first: a write committed between the two reads is then in the database,
        // in the overlay, or both, and never in neither.
        let pending = self.shared.overlay().pending_records();
        let mut records: BTreeMap<SagaId, SagaRecord> = self
            .records_in_database(None, None, in_flight_only)?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        for (id, record) in pending {
            if in_flight_only && record.status.is_final() {
                records.remove(&id);
            } else {
                records.insert(id, record);
            }
        }
        Ok(records.into_values().collect())
    }
}

/// Opens the writer's connection and migrates the schema on it.
async fn open_writer(shared: &Shared) -> Result<writer::WriterConnection> {
    let connector = shared.readers.connector();
    let mut client = connector.connect().await.map_err(database("connecting to PostgreSQL"))?;
    migrations::migrate(&mut client, connector.schema()).await.map_err(|e| match e {
        migrations::MigrationError::Database(e) => database("migrating the schema")(e),
        migrations::MigrationError::Refused(e) => refused("migrating the schema", e),
    })?;
    drop(client);
    writer::WriterConnection::open(connector).await.map_err(database("connecting to PostgreSQL"))
}

/// Lets go of this engine's lease as the store closes: the others take its sagas at once.
async fn release(shared: &Shared) {
    if !shared.renewed.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    let released = async {
        let client = shared.readers.get().await?;
        client.execute(leases::RELEASE, &[&shared.member, &shared.incarnation]).await
    };
    if let Err(e) = released.await {
        tracing::warn!(error = %e, "the engine's lease was not released; it lapses on its own");
    }
}

/// A query parameter, owned: it travels to the background runtime.
/// A statement's parameter, owned: it crosses to the store's thread.
pub type SqlParam = Box<dyn ToSql + Send + Sync>;
type Param = SqlParam;
/// A row a statement of [`PostgresStore::run_statement`] returned.
pub type SqlRow = Row;

fn decode_saga(id: &str, bytes: &[u8]) -> Result<SagaRecord> {
    decode_record(bytes).map_err(|reason| Error::CorruptRecord { saga: id.into(), seq: None, reason })
}

fn encode<T: serde::Serialize + ?Sized>(
    id: &SagaId,
    what: impl FnOnce() -> String,
    value: &T,
) -> Result<Vec<u8>> {
    encode_record(value).map_err(|reason| Error::Codec {
        action: "encode",
        what: format!("{} of saga `{id}`", what()),
        reason,
    })
}

fn encode_events(id: &SagaId, events: &[RecordedEvent]) -> Result<Vec<(u64, Vec<u8>)>> {
    events.iter().map(|e| Ok((e.seq, encode(id, || format!("event {}", e.seq), e)?))).collect()
}

fn encode_saga(record: &SagaRecord) -> Result<(Vec<u8>, bool)> {
    Ok((encode(&record.id, || "the record".into(), record)?, !record.status.is_final()))
}

impl EventStore for PostgresStore {
    fn create(&self, record: &SagaRecord, first: &RecordedEvent) -> Result<Option<SagaRecord>> {
        let id = &record.id;
        check_sequence(id, std::slice::from_ref(first), 0)?;
        // A later process holds this engine's id and would never hear of the saga.
        if self.shared.superseded.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Fenced(id.clone()));
        }
        let op = Op {
            id: id.clone(),
            expected: Some(0),
            events: encode_events(id, std::slice::from_ref(first))?,
            record: Some(encode_saga(record)?),
            epoch: 1,
            applies: Vec::new(),
        };
        if self.shared.overlay().knows(id) {
            return self.existing(id);
        }
        if let Some(existing) = self.record_in_database(id)? {
            return Ok(Some(existing));
        }
        let mut overlay = self.shared.overlay();
        // Another create of this id may have been queued during the read.
        if overlay.knows(id) {
            drop(overlay);
            return self.existing(id);
        }
        overlay.own(id, 1);
        self.push(&mut overlay, op, std::slice::from_ref(first), Some(record));
        Ok(None)
    }

    fn append(&self, id: &SagaId, events: &[RecordedEvent], record: Option<&SagaRecord>) -> Result<()> {
        let encoded_record = record.map(encode_saga).transpose()?;
        if self.shared.overlay().epoch(id).is_none() {
            self.take_over(id)?;
        }
        if events.is_empty() {
            // A status change alone: no sequence to check, so it works for a journal that
            // cannot be read.
            if let Some(record) = record {
                let mut overlay = self.shared.overlay();
                let epoch = overlay.epoch(id).ok_or_else(|| Error::Fenced(id.clone()))?;
                let op = Op {
                    id: id.clone(),
                    expected: None,
                    events: Vec::new(),
                    record: encoded_record,
                    epoch,
                    applies: Vec::new(),
                };
                self.push(&mut overlay, op, &[], Some(record));
            }
            return Ok(());
        }
        let encoded = encode_events(id, events)?;
        let known = self.shared.overlay().next(id);
        let from_database = match known {
            Some(_) => None,
            None => Some(self.next_in_database(id)?.ok_or_else(|| Error::SagaNotFound(id.clone()))?),
        };
        let mut overlay = self.shared.overlay();
        // Taken by another engine since the check above: the write is theirs to make.
        let epoch = overlay.epoch(id).ok_or_else(|| Error::Fenced(id.clone()))?;
        let next = match (overlay.next(id), from_database) {
            (Some(next), _) => next,
            (None, Some(read)) => overlay.learn_next(id, read),
            // Forgotten between the two locks (its batch failed): read it again.
            (None, None) => {
                drop(overlay);
                return self.append(id, events, record);
            }
        };
        check_sequence(id, events, next)?;
        let op = Op {
            id: id.clone(),
            expected: Some(next),
            events: encoded,
            record: encoded_record,
            epoch,
            applies: Vec::new(),
        };
        self.push(&mut overlay, op, events, record);
        Ok(())
    }

    fn durable(&self) -> Durable {
        let (since, sagas) = Unsynced::take(self.id()).unzip();
        let sagas = sagas.unwrap_or_default();
        let mut overlay = self.shared.overlay();
        if let Err(fenced) = overlay.answer(&sagas, &Ok(())) {
            // A write of this thread's was dropped: another engine owns its saga now.
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(fenced));
            return Durable::waiting(rx);
        }
        if let Some(failure) = since.filter(|&at| overlay.failures > at).and(overlay.last_failure.clone()) {
            // A batch failed after this thread's oldest write that was not waited for: that
            // write may be among those dropped.
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(failure));
            return Durable::waiting(rx);
        }
        if overlay.settled() {
            return Durable::ready();
        }
        let (tx, rx) = oneshot::channel();
        overlay.wait((tx, sagas));
        drop(overlay);
        self.shared.wake.notify_one();
        Durable::waiting(rx)
    }

    fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        // The overlay first, as in `merged_records`.
        let pending = self.shared.overlay().pending_events(id);
        let mut history = if pending.first().is_some_and(|e| e.seq == 0) {
            Vec::new()
        } else {
            self.journal_in_database(id)?
        };
        for event in pending {
            if event.seq == history.len() as u64 {
                history.push(event);
            }
        }
        Ok(history)
    }

    fn record(&self, id: &SagaId) -> Result<Option<SagaRecord>> {
        self.existing(id)
    }

    fn in_flight(&self) -> Result<Vec<SagaRecord>> {
        self.merged_records(true)
    }

    fn records(&self) -> Result<Vec<SagaRecord>> {
        self.merged_records(false)
    }

    fn records_after(
        &self,
        after: Option<&SagaId>,
        limit: usize,
        keep: &dyn Fn(&SagaRecord) -> bool,
    ) -> Result<Vec<SagaRecord>> {
        /// Rows read per query: a filter that keeps few records reads on in chunks this big.
        const CHUNK: usize = 256;
        let pending = self.shared.overlay().pending_records();
        let mut out = Vec::new();
        let mut cursor = after.cloned();
        while out.len() < limit {
            let chunk = self.records_in_database(cursor.as_ref(), Some(CHUNK), false)?;
            let full = chunk.len() == CHUNK;
            // The ids this chunk covers: up to its last, or all that remain if it is the end.
            let end = chunk.last().filter(|_| full).map(|r| r.id.clone());
            let mut candidates: BTreeMap<SagaId, SagaRecord> =
                chunk.into_iter().map(|r| (r.id.clone(), r)).collect();
            for (id, record) in &pending {
                let after_cursor = cursor.as_ref().is_none_or(|c| id > c);
                let within = end.as_ref().is_none_or(|e| id <= e);
                if after_cursor && within {
                    candidates.insert(id.clone(), record.clone());
                }
            }
            out.extend(candidates.into_values().filter(|r| keep(r)).take(limit - out.len()));
            match end {
                Some(end) => cursor = Some(end),
                None => break,
            }
        }
        Ok(out)
    }

    fn leases(&self) -> Option<&dyn super::Leases> {
        Some(self)
    }

    fn remove(&self, id: &SagaId) -> Result<()> {
        // Everything queued first, so that no queued write of the saga lands after the delete.
        let durable = self.durable();
        self.call("removing a saga", move |_| durable)?;
        // One statement, so one transaction: no half-removed saga.
        let sql = "WITH events AS (DELETE FROM hodei_events WHERE saga_id = $1)
                   DELETE FROM hodei_sagas WHERE id = $1";
        self.query("removing a saga", sql, vec![Box::new(id.as_str().to_owned())])?;
        self.shared.overlay().forget(id);
        Ok(())
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The writer commits what is queued, then returns, and the thread with it.
        self.shared.overlay().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

thread_local! {
    /// Per store, the failure count when this thread made its oldest write not yet followed by
    /// a `durable()` on this thread, and the sagas it wrote since.
    static UNSYNCED: RefCell<Vec<(usize, u64, Vec<SagaId>)>> = const { RefCell::new(Vec::new()) };
}

/// See `UNSYNCED`.
struct Unsynced;

impl Unsynced {
    fn note(store: usize, failures: u64, saga: &SagaId) {
        UNSYNCED.with(|unsynced| {
            let mut unsynced = unsynced.borrow_mut();
            match unsynced.iter_mut().find(|(s, _, _)| *s == store) {
                Some((_, _, sagas)) => {
                    if !sagas.contains(saga) {
                        sagas.push(saga.clone());
                    }
                }
                None => unsynced.push((store, failures, vec![saga.clone()])),
            }
        });
    }

    fn take(store: usize) -> Option<(u64, Vec<SagaId>)> {
        UNSYNCED.with(|unsynced| {
            let mut unsynced = unsynced.borrow_mut();
            let at = unsynced.iter().position(|(s, _, _)| *s == store)?;
            let (_, failures, sagas) = unsynced.swap_remove(at);
            Some((failures, sagas))
        })
    }
}

#[cfg(test)]
pub(crate) mod test_database;

#[cfg(test)]
mod tests;
