//! The writer: one task on the store's runtime that owns one connection and commits each batch
//! of queued writes in one transaction (group commit), then answers the batch's waiters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::connection::Connector;
use super::overlay::{Batch, Op};
use super::{PostgresError, Shared};
use crate::error::StorageError;
use crate::event::SagaId;

/// Creates sagas; an id that exists is left alone, and missing from what it returns.
const CREATE: &str = "INSERT INTO hodei_sagas (id, next_seq, record, in_flight)
    SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[], $4::bool[])
    ON CONFLICT (id) DO NOTHING RETURNING id";

/// Moves journals on and replaces records. A journal that is not where the batch expects it is
/// left alone, and missing from what it returns. Its row stays locked until the transaction
/// ends, so a second process's append to it waits, then sees the new `next_seq` and misses.
const UPDATE: &str = "UPDATE hodei_sagas AS s
    SET next_seq = coalesce(u.next_seq, s.next_seq),
        record = coalesce(u.record, s.record),
        in_flight = coalesce(u.in_flight, s.in_flight)
    FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[], $5::bool[])
        AS u(id, expected, next_seq, record, in_flight)
    WHERE s.id = u.id COLLATE \"C\" AND (u.expected IS NULL OR s.next_seq = u.expected)
    RETURNING s.id";

/// Appends events. One that exists is left alone, and missing from the count: its saga's
/// `UPDATE` misses too, unless the tables disagree, and either way the batch is refused.
const INSERT_EVENTS: &str = "INSERT INTO hodei_events (saga_id, seq, body)
    SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[])
    ON CONFLICT (saga_id, seq) DO NOTHING RETURNING saga_id";

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

impl WriterConnection {
    pub(super) async fn open(connector: &Connector) -> Result<Self, tokio_postgres::Error> {
        let client = connector.connect().await?;
        let (create, update, insert_events) =
            tokio::try_join!(client.prepare(CREATE), client.prepare(UPDATE), client.prepare(INSERT_EVENTS))?;
        Ok(Self { client, create, update, insert_events })
    }

    /// Commits `ops` in one transaction, or nothing of them.
    async fn commit(&mut self, ops: &[Op]) -> Result<(), StorageError> {
        let merged = merge(ops);
        let tx = self.client.transaction().await.map_err(database)?;
        // The three statements go out at once (tokio-postgres pipelines the queries of one
        // connection): one round trip, then the commit's.
        let (c, u, e) = (&merged.create, &merged.update, &merged.events);
        let creates: [&(dyn ToSql + Sync); 4] = [&c.ids, &c.next, &c.records, &c.in_flight];
        let updates: [&(dyn ToSql + Sync); 5] = [&u.ids, &u.expected, &u.next, &u.records, &u.in_flight];
        let events: [&(dyn ToSql + Sync); 3] = [&e.ids, &e.seqs, &e.bodies];
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
        if let Some((id, expected)) = missing {
            // Dropping the transaction rolls it back.
            let id = SagaId::new(id).map_err(StorageError::new)?;
            return Err(StorageError::new(PostgresError::SequenceConflict { id, expected }));
        }
        tx.commit().await.map_err(database)
    }
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
}

#[derive(Default)]
struct Events<'a> {
    ids: Vec<&'a str>,
    seqs: Vec<i64>,
    bodies: Vec<&'a [u8]>,
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
        let batch = match taken {
            Ok(batch) => batch,
            Err(true) => return,
            Err(false) => {
                wake.await;
                continue;
            }
        };
        let result = if batch.ops.is_empty() {
            // Every earlier batch has been answered: what its waiters wrote is committed.
            Ok(())
        } else {
            commit(&shared, &mut connection, &batch).await
        };
        let dropped = {
            let mut overlay = shared.overlay();
            match &result {
                Ok(()) => {
                    overlay.committed(&batch);
                    Vec::new()
                }
                Err(e) => {
                    tracing::warn!(error = %e, writes = batch.ops.len(), "a PostgreSQL group commit failed");
                    overlay.failed(&batch, e.clone())
                }
            }
        };
        for waiter in batch.waiters.into_iter().chain(dropped) {
            let _ = waiter.send(result.clone());
        }
    }
}

async fn commit(
    shared: &Shared,
    connection: &mut Option<WriterConnection>,
    batch: &Batch,
) -> Result<(), StorageError> {
    let conn = match connection {
        Some(conn) => conn,
        None => {
            connection.insert(WriterConnection::open(shared.readers.connector()).await.map_err(database)?)
        }
    };
    let result = conn.commit(&batch.ops).await;
    if result.is_err() {
        // A new one for the next batch: the server may be ending this one (a terminated
        // backend answers with an error before the socket closes), and a refused batch is rare.
        *connection = None;
    }
    result
}
