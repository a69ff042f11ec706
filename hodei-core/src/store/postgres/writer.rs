//! The writer: one task on the store's runtime that owns one connection and commits each batch
//! of queued writes in one transaction (group commit), then answers the batch's waiters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::connection::Connector;
use super::overlay::{Batch, Op};
use super::{PostgresError, Shared};
use crate::error::StorageError;
use crate::event::SagaId;

/// Creates sagas, owned by this engine at epoch 1; an id that exists is left alone, and
/// missing from what it returns. Nothing is created once a later process holds this engine's
/// name (`$6` is this process's incarnation): that one would never hear of the saga.
const CREATE: &str = "INSERT INTO hodei_sagas (id, next_seq, record, in_flight, owner, epoch)
    SELECT u.*, $5, 1 FROM unnest($1::text[], $2::int8[], $3::bytea[], $4::bool[]) AS u
    WHERE NOT EXISTS (SELECT 1 FROM hodei_engines e WHERE e.id = $5 AND e.incarnation <> $6)
    ON CONFLICT (id) DO NOTHING RETURNING id";

/// Whether a later process holds this engine's name.
const SUPERSEDED: &str = "SELECT 1 FROM hodei_engines WHERE id = $1 AND incarnation <> $2";

/// Moves journals on and replaces records. A journal that is not where the batch expects it,
/// or no longer at this engine's epoch (another engine took it over), is left alone, and
/// missing from what it returns. Its row stays locked until the transaction ends, so a second
/// process's append or claim waits, then sees the new `next_seq` or epoch. A finished saga
/// loses its owner: anyone may reopen it.
const UPDATE: &str = "UPDATE hodei_sagas AS s
    SET next_seq = coalesce(u.next_seq, s.next_seq),
        record = coalesce(u.record, s.record),
        in_flight = coalesce(u.in_flight, s.in_flight),
        owner = CASE WHEN u.in_flight = false THEN NULL ELSE s.owner END
    FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[], $5::bool[], $6::int8[])
        AS u(id, expected, next_seq, record, in_flight, epoch)
    WHERE s.id = u.id COLLATE \"C\" AND (u.expected IS NULL OR s.next_seq = u.expected)
        AND s.epoch = u.epoch
    RETURNING s.id";

/// Appends events. One that exists is left alone, and missing from the count: its saga's
/// `UPDATE` misses too, unless the tables disagree, and either way the batch is refused.
const INSERT_EVENTS: &str = "INSERT INTO hodei_events (saga_id, seq, body, epoch)
    SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[], $4::int8[])
    ON CONFLICT (saga_id, seq) DO NOTHING RETURNING saga_id";

/// Deletes the posted requests that the batch's writes apply.
const APPLIED: &str = "DELETE FROM hodei_requests WHERE id = ANY($1::int8[])";

/// Where the sagas of a refused batch are now: which of them another engine took over.
const EPOCHS: &str = "SELECT id, epoch FROM hodei_sagas WHERE id = ANY($1::text[])";

/// The writer's connection, with its statements prepared.
pub(super) struct WriterConnection {
    client: Client,
    create: Statement,
    update: Statement,
    insert_events: Statement,
}

impl std::fmt::Debug for WriterConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterConnection").finish_non_exhaustive()
    }
}

/// Why a batch was not committed.
pub(super) enum Refusal {
    /// Another engine owns these sagas now; the rest of the batch may go without them.
    Fenced(HashSet<SagaId>),
    /// A later process took this engine's name: nothing of the batch, nor of any later one,
    /// may go.
    Superseded,
    /// Nothing of the batch may go.
    Failed(StorageError),
}

impl From<StorageError> for Refusal {
    fn from(e: StorageError) -> Self {
        Self::Failed(e)
    }
}

impl WriterConnection {
    pub(super) async fn open(connector: &Connector) -> Result<Self, tokio_postgres::Error> {
        let client = connector.connect().await?;
        let (create, update, insert_events) =
            tokio::try_join!(client.prepare(CREATE), client.prepare(UPDATE), client.prepare(INSERT_EVENTS))?;
        Ok(Self { client, create, update, insert_events })
    }

    /// Commits `ops` in one transaction, or nothing of them; `member` is this engine, held by
    /// this process as `incarnation`.
    async fn commit(&mut self, ops: &[Op], member: &str, incarnation: i64) -> Result<(), Refusal> {
        let merged = merge(ops);
        let tx = self.client.transaction().await.map_err(database)?;
        // The three statements go out at once (tokio-postgres pipelines the queries of one
        // connection): one round trip, then the commit's.
        let (c, u, e) = (&merged.create, &merged.update, &merged.events);
        let creates: [&(dyn ToSql + Sync); 6] =
            [&c.ids, &c.next, &c.records, &c.in_flight, &member, &incarnation];
        let updates: [&(dyn ToSql + Sync); 6] =
            [&u.ids, &u.expected, &u.next, &u.records, &u.in_flight, &u.epochs];
        let events: [&(dyn ToSql + Sync); 4] = [&e.ids, &e.seqs, &e.bodies, &e.epochs];
        let (created, updated, inserted) = tokio::try_join!(
            tx.query(&self.create, &creates),
            tx.query(&self.update, &updates),
            tx.query(&self.insert_events, &events),
        )
        .map_err(database)?;
        let returned =
            |rows: &[tokio_postgres::Row]| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>();
        let (created, updated, inserted) = (returned(&created), returned(&updated), returned(&inserted));
        let missing = merged
            .create
            .ids
            .iter()
            .map(|id| (*id, 0))
            .filter(|(id, _)| !created.iter().any(|c| c == id))
            .chain(
                merged
                    .update
                    .ids
                    .iter()
                    .zip(&merged.update.expected)
                    .filter_map(|(id, expected)| Some((*id, (*expected)? as u64)))
                    .filter(|(id, _)| !updated.iter().any(|u| u == id)),
            )
            .chain(merged.events.first_not_in(&inserted))
            .next();
        if !merged.applied.is_empty() {
            // Rare (an operator's request from another engine): its own round trip.
            tx.execute(APPLIED, &[&merged.applied]).await.map_err(database)?;
        }
        if missing.is_none() && updated.len() == merged.update.ids.len() {
            return tx.commit().await.map_err(|e| database(e).into());
        }
        // Asked why before anything is decided: a create refused for want of the name, or a
        // saga at another epoch, was taken by another engine; otherwise the journal moved on
        // under this store.
        if created.len() < merged.create.ids.len()
            && !tx.query(SUPERSEDED, &[&member, &incarnation]).await.map_err(database)?.is_empty()
        {
            return Err(Refusal::Superseded);
        }
        let fenced = fenced(&tx, &merged.update).await?;
        if !fenced.is_empty() {
            tx.rollback().await.map_err(database)?;
            return Err(Refusal::Fenced(fenced));
        }
        match missing {
            Some((id, expected)) => {
                // Dropping the transaction rolls it back.
                let id = SagaId::new(id).map_err(StorageError::new)?;
                Err(StorageError::new(PostgresError::SequenceConflict { id, expected }).into())
            }
            // Only status changes of sagas that are gone missed: nothing to change there.
            None => tx.commit().await.map_err(|e| database(e).into()),
        }
    }
}

/// The sagas of `updates` whose epoch in the database is not this engine's.
async fn fenced(
    tx: &tokio_postgres::Transaction<'_>,
    updates: &Updates<'_>,
) -> Result<HashSet<SagaId>, StorageError> {
    let rows = tx.query(EPOCHS, &[&updates.ids]).await.map_err(database)?;
    let now: HashMap<String, i64> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let mut fenced = HashSet::new();
    for (id, epoch) in updates.ids.iter().zip(&updates.epochs) {
        if now.get(*id).is_some_and(|now| now != epoch) {
            fenced.insert(SagaId::new(*id).map_err(StorageError::new)?);
        }
    }
    Ok(fenced)
}

fn database(e: tokio_postgres::Error) -> StorageError {
    StorageError::new(PostgresError::from(e))
}

/// One batch's writes as the columns of the three statements.
#[derive(Default)]
struct Merged<'a> {
    create: Creates<'a>,
    update: Updates<'a>,
    events: Events<'a>,
    applied: Vec<i64>,
}

#[derive(Default)]
struct Creates<'a> {
    ids: Vec<&'a str>,
    next: Vec<i64>,
    records: Vec<&'a [u8]>,
    in_flight: Vec<bool>,
}

#[derive(Default)]
struct Updates<'a> {
    ids: Vec<&'a str>,
    expected: Vec<Option<i64>>,
    next: Vec<Option<i64>>,
    records: Vec<Option<&'a [u8]>>,
    in_flight: Vec<Option<bool>>,
    epochs: Vec<i64>,
}

#[derive(Default)]
struct Events<'a> {
    ids: Vec<&'a str>,
    seqs: Vec<i64>,
    bodies: Vec<&'a [u8]>,
    epochs: Vec<i64>,
}

impl<'a> Events<'a> {
    /// The first event of a saga with fewer events in `inserted` than in the batch. Where the
    /// batch expected that journal to be is not known here: the event's sequence number stands
    /// for it.
    fn first_not_in(&self, inserted: &[String]) -> Option<(&'a str, u64)> {
        if inserted.len() == self.ids.len() {
            return None;
        }
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for id in inserted {
            *counts.entry(id.as_str()).or_default() += 1;
        }
        let short =
            |id: &str| counts.get(id).copied().unwrap_or(0) < self.ids.iter().filter(|i| **i == id).count();
        self.ids.iter().zip(&self.seqs).find(|(id, _)| short(id)).map(|(id, seq)| (*id, *seq as u64))
    }
}

/// One saga's writes in a batch, merged: the journal must be where its first append expects
/// it, and ends where its last one leaves it; the last record wins.
#[derive(Default)]
struct SagaWrite<'a> {
    create: bool,
    epoch: i64,
    expected: Option<u64>,
    next: Option<u64>,
    record: Option<(&'a [u8], bool)>,
}

fn merge(ops: &[Op]) -> Merged<'_> {
    // In id order, so that two processes lock the rows of the sagas they share in one order.
    let mut sagas: BTreeMap<&str, SagaWrite<'_>> = BTreeMap::new();
    let mut merged = Merged::default();
    for op in ops {
        let saga = sagas.entry(op.id.as_str()).or_default();
        saga.create |= op.expected == Some(0);
        saga.epoch = op.epoch;
        merged.applied.extend(&op.applies);
        if saga.expected.is_none() && !op.events.is_empty() {
            saga.expected = op.expected;
        }
        if let Some((seq, _)) = op.events.last() {
            saga.next = Some(seq + 1);
        }
        if let Some((bytes, in_flight)) = &op.record {
            saga.record = Some((bytes, *in_flight));
        }
        for (seq, body) in &op.events {
            merged.events.ids.push(op.id.as_str());
            merged.events.seqs.push(*seq as i64);
            merged.events.bodies.push(body);
            merged.events.epochs.push(op.epoch);
        }
    }
    for (id, saga) in sagas {
        match (saga.create, saga.record) {
            // `create` always carries the record, so a creation has one.
            (true, Some((record, in_flight))) => {
                merged.create.ids.push(id);
                merged.create.next.push(saga.next.unwrap_or(1) as i64);
                merged.create.records.push(record);
                merged.create.in_flight.push(in_flight);
            }
            _ => {
                merged.update.ids.push(id);
                merged.update.expected.push(saga.expected.map(|e| e as i64));
                merged.update.next.push(saga.next.map(|n| n as i64));
                merged.update.records.push(saga.record.map(|(r, _)| r));
                merged.update.in_flight.push(saga.record.map(|(_, f)| f));
                merged.update.epochs.push(saga.epoch);
            }
        }
    }
    merged
}

/// The writer's loop: until the store closes and its queue is empty.
pub(super) async fn run(shared: Arc<Shared>, mut connection: Option<WriterConnection>) {
    loop {
        let wake = shared.wake.notified();
        let taken = {
            let mut overlay = shared.overlay();
            overlay.take().ok_or(overlay.closed)
        };
        let mut batch = match taken {
            Ok(batch) => batch,
            Err(true) => return,
            Err(false) => {
                wake.await;
                continue;
            }
        };
        let result = loop {
            if batch.ops.is_empty() {
                // Every earlier batch has been answered: what its waiters wrote is committed.
                break Ok(());
            }
            match commit(&shared, &mut connection, &batch).await {
                Ok(()) => break Ok(()),
                Err(Refusal::Failed(e)) => break Err(e),
                // The others' writes go on without those of the sagas this engine lost.
                Err(Refusal::Fenced(lost)) => {
                    tracing::warn!(
                        sagas = lost.len(),
                        "writes refused: another engine took these sagas over"
                    );
                    shared.overlay().fence(&lost);
                    batch.ops.retain(|op| !lost.contains(&op.id));
                }
                Err(Refusal::Superseded) => {
                    shared.supersede();
                    let all: HashSet<SagaId> = batch.ops.iter().map(|op| op.id.clone()).collect();
                    shared.overlay().fence(&all);
                    batch.ops.clear();
                }
            }
        };
        let mut overlay = shared.overlay();
        let dropped = match &result {
            Ok(()) => {
                overlay.committed(&batch);
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, writes = batch.ops.len(), "a PostgreSQL group commit failed");
                overlay.failed(&batch, e.clone())
            }
        };
        for (waiter, sagas) in batch.waiters.into_iter().chain(dropped) {
            let _ = waiter.send(overlay.answer(&sagas, &result));
        }
    }
}

async fn commit(
    shared: &Shared,
    connection: &mut Option<WriterConnection>,
    batch: &Batch,
) -> Result<(), Refusal> {
    let conn = match connection {
        Some(conn) => conn,
        None => {
            connection.insert(WriterConnection::open(shared.readers.connector()).await.map_err(database)?)
        }
    };
    let result = conn.commit(&batch.ops, &shared.member, shared.incarnation).await;
    if let Err(Refusal::Failed(_)) = result {
        // A new one for the next batch: the server may be ending this one (a terminated
        // backend answers with an error before the socket closes), and a refused batch is rare.
        *connection = None;
    }
    result
}
