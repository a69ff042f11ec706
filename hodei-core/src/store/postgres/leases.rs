//! Several engines on one database: this store's engine renews its lease, claims the sagas of
//! engines whose lease lapsed, and takes one saga on demand (a finished saga reopened, say).
//!
//! An engine's lease is one row of `hodei_engines`, renewed once per beat for all its sagas.
//! A saga's owner and epoch are in its own row; a claim moves the epoch on under the row's lock
//! (`FOR UPDATE SKIP LOCKED`, so engines claiming at once share the sagas out instead of
//! queueing on them), and every write of the owner checks the epoch in its own transaction
//! (`writer.rs`). Times are the database's (`now()`), so the engines' clocks may disagree.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Param, PostgresStore, database, decode_saga};
use crate::error::Result;
use crate::event::SagaId;
use crate::store::{Leases, Renewal};

/// Extends the lease if it has not lapsed; no row back means it had (or never existed).
const RENEW: &str = "UPDATE hodei_engines SET lease_until = now() + $2::float8 * interval '1 second'
    WHERE id = $1 AND lease_until > now() RETURNING 1";

/// Takes a lease afresh: the engine is new, or its lease lapsed (its sagas may be gone).
const JOIN: &str = "INSERT INTO hodei_engines (id, lease_until)
    VALUES ($1, now() + $2::float8 * interval '1 second')
    ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until";

/// Which of the sagas this engine holds are at another epoch now.
const LOST: &str = "SELECT s.id FROM unnest($1::text[], $2::int8[]) AS u(id, epoch)
    JOIN hodei_sagas s ON s.id = u.id COLLATE \"C\" WHERE s.epoch <> u.epoch";

/// Claims sagas in flight that no live engine owns (and, with `$3`, this engine's own from an
/// earlier life), in id order, skipping those another engine is claiming at the same moment.
const CLAIM: &str = "WITH candidates AS (
        SELECT s.id FROM hodei_sagas s
        WHERE s.in_flight AND (
            s.owner IS NULL
            OR s.owner IN (SELECT id FROM hodei_engines WHERE lease_until <= now() AND id <> $1)
            OR ($3 AND s.owner = $1))
        ORDER BY s.id LIMIT $2
        FOR UPDATE SKIP LOCKED)
    UPDATE hodei_sagas s SET owner = $1, epoch = s.epoch + 1
    FROM candidates c WHERE s.id = c.id
    RETURNING s.id, s.epoch, s.record";

/// Takes one saga if no live engine owns it.
const CLAIM_ONE: &str = "UPDATE hodei_sagas s SET owner = $1, epoch = s.epoch + 1
    WHERE s.id = $2 AND (
        s.owner IS NULL OR s.owner = $1
        OR s.owner IN (SELECT id FROM hodei_engines WHERE lease_until <= now()))
    RETURNING s.epoch, s.next_seq";

/// Forgets engines whose lease lapsed and that own nothing in flight any more.
const FORGET_DEAD: &str = "DELETE FROM hodei_engines e WHERE e.lease_until <= now() AND e.id <> $1
    AND NOT EXISTS (SELECT 1 FROM hodei_sagas s WHERE s.in_flight AND s.owner = e.id)";

/// Lets go of the lease at once, so that the other engines take the sagas over at their next
/// beat instead of after the lease.
pub(super) const RELEASE: &str = "UPDATE hodei_engines SET lease_until = '-infinity' WHERE id = $1";

impl Leases for PostgresStore {
    fn beat(&self) -> Duration {
        self.shared.lease / 5
    }

    fn renew(&self, max: usize) -> Result<Renewal> {
        let first = !self.shared.renewed.swap(true, Ordering::AcqRel);
        let owned = self.shared.overlay().owned();
        let member = self.shared.member.clone();
        let lease = self.shared.lease.as_secs_f64();
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let operation = "renewing the engine's lease";
        let (lost, claimed) = self.call(operation, move |shared| async move {
            let client = shared.readers.get().await.map_err(database(operation))?;
            let renewed = client.query(RENEW, &[&member, &lease]).await.map_err(database(operation))?;
            let mut lost = Vec::new();
            if renewed.is_empty() {
                client.execute(JOIN, &[&member, &lease]).await.map_err(database(operation))?;
                if !owned.is_empty() {
                    let (ids, epochs): (Vec<String>, Vec<i64>) =
                        owned.into_iter().map(|(id, epoch)| (id.to_string(), epoch)).unzip();
                    let rows = client.query(LOST, &[&ids, &epochs]).await.map_err(database(operation))?;
                    lost = rows.iter().map(|row| row.get::<_, String>(0)).collect();
                }
            }
            if first {
                client.execute(FORGET_DEAD, &[&member]).await.map_err(database(operation))?;
            }
            let rows = client.query(CLAIM, &[&member, &limit, &first]).await.map_err(database(operation))?;
            let claimed: Vec<(String, i64, Vec<u8>)> =
                rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect();
            Ok((lost, claimed))
        })?;
        let lost: HashSet<SagaId> = lost.into_iter().filter_map(|id| SagaId::new(id).ok()).collect();
        let mut records = Vec::with_capacity(claimed.len());
        for (id, epoch, record) in &claimed {
            records.push((decode_saga(id, record)?, *epoch));
        }
        records.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        let mut overlay = self.shared.overlay();
        overlay.fence(&lost);
        // With those a refused write revealed before this beat.
        let mut lost = overlay.take_unreported();
        lost.sort();
        let mut renewal = Renewal { lost, claimed: Vec::with_capacity(records.len()) };
        for (record, epoch) in records {
            overlay.own(&record.id, epoch);
            renewal.claimed.push(record);
        }
        Ok(renewal)
    }
}

impl PostgresStore {
    /// Takes `id` for this engine if no live engine owns it; returns its epoch and where its
    /// journal ends, or `None` if another engine holds it.
    pub(super) fn claim_one(&self, id: &SagaId) -> Result<Option<(i64, u64)>> {
        let params: Vec<Param> = vec![Box::new(self.shared.member.clone()), Box::new(id.as_str().to_owned())];
        let rows = self.query("claiming a saga", CLAIM_ONE, params)?;
        Ok(rows.first().map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1) as u64)))
    }
}
