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

use std::sync::Arc;

use tokio::sync::Notify;

use super::{Param, PostgresStore, Shared, database, decode_saga};
use crate::codec::decode_record;
use crate::error::{Error, Result};
use crate::event::SagaId;
use crate::store::{Leases, Posted, Renewal, Request};

/// Extends the lease if it has not lapsed and this process still holds the name; no row back
/// means it had lapsed, or never existed, or another process took the name.
const RENEW: &str = "UPDATE hodei_engines SET lease_until = now() + $2::float8 * interval '1 second'
    WHERE id = $1 AND incarnation = $3 AND lease_until > now() RETURNING 1";

/// Takes a lease afresh: the engine is new (`$4`: this process's first renewal, which takes the
/// name over from an earlier process under it, dead or not), or its lease lapsed (its sagas may
/// be gone). No row back: a later process took the name, and this one is superseded.
const JOIN: &str = "INSERT INTO hodei_engines (id, lease_until, incarnation)
    VALUES ($1, now() + $2::float8 * interval '1 second', $3)
    ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until, incarnation = EXCLUDED.incarnation
    WHERE $4 OR hodei_engines.incarnation = EXCLUDED.incarnation
    RETURNING 1";

/// Which of the sagas this engine holds are at another epoch now.
const LOST: &str = "SELECT s.id FROM unnest($1::text[], $2::int8[]) AS u(id, epoch)
    JOIN hodei_sagas s ON s.id = u.id COLLATE \"C\" WHERE s.epoch <> u.epoch";

/// Claims sagas in flight that no live engine owns (and, with `$3`, this engine's own from an
/// earlier life), in id order, skipping those another engine is claiming at the same moment.
/// Each engine takes its share of the orphans (their number over the live engines', rounded
/// up), so that the survivors of a death split its sagas instead of the first to beat taking
/// them all; at most `$2`. Nothing if a later process took this engine's name (`$4` is this
/// process's incarnation).
const CLAIM: &str = "WITH dead AS (
        SELECT id FROM hodei_engines WHERE lease_until <= now() AND id <> $1),
    share AS (
        SELECT ceil((SELECT count(*) FROM hodei_sagas s
                     WHERE s.in_flight AND (s.owner IS NULL OR s.owner IN (SELECT id FROM dead)))::float8
                    / greatest(1, (SELECT count(*) FROM hodei_engines WHERE lease_until > now())))::int8 AS n),
    candidates AS (
        SELECT s.id FROM hodei_sagas s
        WHERE s.in_flight AND (
            s.owner IS NULL
            OR s.owner IN (SELECT id FROM dead)
            OR ($3 AND s.owner = $1))
            AND NOT EXISTS (SELECT 1 FROM hodei_engines e WHERE e.id = $1 AND e.incarnation <> $4)
        ORDER BY s.id
        LIMIT CASE WHEN $3 THEN $2 ELSE least($2, (SELECT n FROM share)) END
        FOR UPDATE SKIP LOCKED)
    UPDATE hodei_sagas s SET owner = $1, epoch = s.epoch + 1
    FROM candidates c WHERE s.id = c.id
    RETURNING s.id, s.epoch, s.record";

/// Sagas in flight that the database says this engine owns and that it does not know it owns
/// (`$2`): those of a claim whose answer was lost. Claimed sagas are at epoch 2 or more; one
/// this engine is creating right now is at 1, and is known before its row is written. None
/// once a later process holds the name: its claims are not this process's.
const UNHEARD: &str = "SELECT s.id, s.epoch, s.record FROM hodei_sagas s
    WHERE s.owner = $1 AND s.in_flight AND s.epoch > 1 AND NOT (s.id = ANY($2::text[]))
        AND NOT EXISTS (SELECT 1 FROM hodei_engines e WHERE e.id = $1 AND e.incarnation <> $3)";

/// Takes one saga if no live engine owns it (this one aside), and no later process holds this
/// engine's name. One that another engine took from this one (`$4`) only once it has no owner
/// (it finished, and is reopened): a driver that has yet to hear that its saga was taken must
/// not take it back when its new owner dies in turn. Such a saga is claimed again by a beat,
/// which resumes it from its journal.
const CLAIM_ONE: &str = "UPDATE hodei_sagas s SET owner = $1, epoch = s.epoch + 1
    WHERE s.id = $2 AND (
        s.owner IS NULL
        OR (NOT $4 AND (s.owner = $1 OR s.owner IN (SELECT id FROM hodei_engines WHERE lease_until <= now()))))
        AND NOT EXISTS (SELECT 1 FROM hodei_engines e WHERE e.id = $1 AND e.incarnation <> $3)
    RETURNING s.epoch, s.next_seq";

/// Forgets engines whose lease lapsed and that own nothing in flight any more, nor a session
/// with a worker that held a job without a result when it died: the end of the lease dates
/// that session's end, from which its worker has the hub's worker wait to come back (see
/// `hodei_job_logs`, used by the control plane).
const FORGET_DEAD: &str = "DELETE FROM hodei_engines e WHERE e.lease_until <= now() AND e.id <> $1
    AND NOT EXISTS (SELECT 1 FROM hodei_sagas s WHERE s.in_flight AND s.owner = e.id)
    AND NOT EXISTS (SELECT 1 FROM hodei_job_logs j WHERE j.member = e.id AND j.result IS NULL AND NOT j.closed)";

/// Posts a request and notifies the saga's owner, in one statement (so one transaction: the
/// notification goes out on commit).
const POST: &str = "WITH posted AS (
        INSERT INTO hodei_requests (saga_id, body) VALUES ($1, $2) RETURNING saga_id)
    SELECT pg_notify('hodei_requests', coalesce(s.owner, ''))
    FROM posted p JOIN hodei_sagas s ON s.id = p.saga_id";

/// The requests for this engine's sagas, oldest first, with whether each waited past `$2`
/// seconds (a notification should have brought it sooner).
const POSTED: &str = "SELECT r.id, r.saga_id, r.body, r.posted_at < now() - $2::float8 * interval '1 second'
    FROM hodei_requests r JOIN hodei_sagas s ON s.id = r.saga_id
    WHERE s.owner = $1 ORDER BY r.id LIMIT 256";

/// Requests for sagas that finished before their owner took them: nothing to apply them to.
const STALE_REQUESTS: &str = "DELETE FROM hodei_requests r USING hodei_sagas s
    WHERE s.id = r.saga_id AND NOT s.in_flight";

const DELETE_REQUEST: &str = "DELETE FROM hodei_requests WHERE id = $1";

/// The channel of posted requests; a notification's payload is the owner's engine id.
const CHANNEL: &str = "hodei_requests";

/// Lets go of the lease at once, so that the other engines take the sagas over at their next
/// beat instead of after the lease; not a later process's under the same name.
pub(super) const RELEASE: &str =
    "UPDATE hodei_engines SET lease_until = '-infinity' WHERE id = $1 AND incarnation = $2";

impl Leases for PostgresStore {
    fn beat(&self) -> Duration {
        self.shared.lease / 5
    }

    fn renew(&self, max: usize) -> Result<Renewal> {
        if self.shared.superseded.load(Ordering::Acquire) {
            return Ok(self.superseded());
        }
        // Set once a renewal succeeds: a first one that failed is made again, claim included.
        let first = !self.shared.renewed.load(Ordering::Acquire);
        // The first renewal takes back all of this engine's own sagas anyway.
        let unsure = !first && self.shared.unsure.swap(false, Ordering::AcqRel);
        let owned = self.shared.overlay().owned();
        let member = self.shared.member.clone();
        let incarnation = self.shared.incarnation;
        let lease = self.shared.lease.as_secs_f64();
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let operation = "renewing the engine's lease";
        let result = self.call(operation, move |shared| async move {
            let mut client = shared.readers.get_for_lease().await.map_err(database(operation))?;
            let renewed = client
                .query_prepared(RENEW, &[&member, &lease, &incarnation])
                .await
                .map_err(database(operation))?;
            let mut lost = Vec::new();
            if renewed.is_empty() {
                let joined = client
                    .query_prepared(JOIN, &[&member, &lease, &incarnation, &first])
                    .await
                    .map_err(database(operation))?;
                if joined.is_empty() {
                    return Ok(None);
                }
                if !first {
                    tracing::warn!(
                        engine = %member,
                        "this engine's lease had lapsed (its renewals came late, or the database was \
                         away): it joins again, and loses the sagas other engines took meanwhile"
                    );
                }
                if !owned.is_empty() {
                    let (ids, epochs): (Vec<String>, Vec<i64>) =
                        owned.iter().map(|(id, epoch)| (id.to_string(), *epoch)).unzip();
                    let rows =
                        client.query_prepared(LOST, &[&ids, &epochs]).await.map_err(database(operation))?;
                    lost = rows.iter().map(|row| row.get::<_, String>(0)).collect();
                }
            }
            if first {
                client.execute_prepared(FORGET_DEAD, &[&member]).await.map_err(database(operation))?;
            }
            let mut unheard = Vec::new();
            if unsure {
                let known: Vec<String> = owned.iter().map(|(id, _)| id.to_string()).collect();
                unheard = client
                    .query_prepared(UNHEARD, &[&member, &known, &incarnation])
                    .await
                    .map_err(database(operation))?;
            }
            let rows = client
                .query_prepared(CLAIM, &[&member, &limit, &first, &incarnation])
                .await
                .map_err(database(operation))?;
            let claimed: Vec<(String, i64, Vec<u8>)> =
                rows.iter().chain(&unheard).map(|row| (row.get(0), row.get(1), row.get(2))).collect();
            Ok(Some((lost, claimed)))
        });
        // Whatever the database did with this call's claim, this engine did not hear of it.
        let renewed = result.inspect_err(|_| self.shared.unsure.store(true, Ordering::Release))?;
        let Some((lost, claimed)) = renewed else {
            self.shared.supersede();
            return Ok(self.superseded());
        };
        self.shared.renewed.store(true, Ordering::Release);
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

    fn post(&self, id: &SagaId, request: &Request) -> Result<()> {
        self.request_posted(id, request)
    }

    fn posted(&self) -> Result<Vec<Posted>> {
        self.requests_posted()
    }

    fn applying(&self, id: &SagaId, request: i64) {
        self.shared.overlay().applying(id, request);
    }

    fn settle(&self, request: i64, keep: bool) -> Result<()> {
        let unapplied = self.shared.overlay().unapplied(request);
        if unapplied && !keep {
            self.query("deleting a request", DELETE_REQUEST, vec![Box::new(request)])?;
        }
        Ok(())
    }

    fn wake(&self) -> Arc<Notify> {
        self.shared.posted.clone()
    }
}

/// Listens for requests posted for this engine's sagas, for as long as the store's runtime
/// runs, reconnecting a beat after a failure.
pub(super) async fn listen(shared: Arc<Shared>) {
    loop {
        let heard = shared.readers.connector().listen(CHANNEL, |owner| {
            if owner == shared.member {
                *shared.heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
                shared.posted.notify_one();
            }
        });
        if let Err(e) = heard.await {
            tracing::debug!(error = %e, "the listener's connection ended; requests wait for the beat");
        }
        tokio::time::sleep(shared.lease / 5).await;
    }
}

impl PostgresStore {
    /// The renewal of a superseded store: the sagas it still thought it owned, as lost.
    fn superseded(&self) -> Renewal {
        let mut overlay = self.shared.overlay();
        let owned: HashSet<SagaId> = overlay.owned().into_iter().map(|(id, _)| id).collect();
        overlay.fence(&owned);
        let mut lost = overlay.take_unreported();
        lost.sort();
        Renewal { lost, claimed: Vec::new() }
    }

    fn request_posted(&self, id: &SagaId, request: &Request) -> Result<()> {
        let body = super::encode(id, || "a posted request".into(), request)?;
        let params: Vec<Param> = vec![Box::new(id.as_str().to_owned()), Box::new(body)];
        self.query("posting a request", POST, params)?;
        Ok(())
    }

    fn requests_posted(&self) -> Result<Vec<Posted>> {
        let member = self.shared.member.clone();
        // Half a beat: a notified request is taken within milliseconds of its posting.
        let late = self.beat().as_secs_f64() / 2.0;
        let operation = "reading the posted requests";
        let rows = self.call(operation, move |shared| async move {
            let mut client = shared.readers.get().await.map_err(database(operation))?;
            client.execute_prepared(STALE_REQUESTS, &[]).await.map_err(database(operation))?;
            client.query_prepared(POSTED, &[&member, &late]).await.map_err(database(operation))
        })?;
        let mut posted = Vec::with_capacity(rows.len());
        for row in rows {
            let saga: String = row.get(1);
            let request = decode_record(row.get(2)).map_err(|reason| Error::CorruptRecord {
                saga: saga.clone(),
                seq: None,
                reason,
            })?;
            if row.get::<_, bool>(3) {
                self.unheard();
            }
            posted.push(Posted { number: row.get(0), saga: SagaId::new(saga)?, request });
        }
        Ok(posted)
    }

    /// A request waited for the beat: if the listener is up, notifications are not reaching
    /// it (a pooler in transaction mode drops `LISTEN`). Said once; the beat still applies them.
    fn unheard(&self) {
        if !self.shared.warned_unheard.swap(true, Ordering::AcqRel) {
            let heard = *self.shared.heard.lock().unwrap_or_else(|p| p.into_inner());
            tracing::warn!(
                last_heard = ?heard.map(|at| at.elapsed()),
                "a posted request waited for the beat: notifications (LISTEN/NOTIFY) are not reaching this \
                 engine, as behind a pooler in transaction mode; requests are applied at every beat instead"
            );
        }
    }

    /// Takes `id` for this engine if no live engine owns it; returns its epoch and where its
    /// journal ends, or `None` if another engine holds it.
    pub(super) fn claim_one(&self, id: &SagaId) -> Result<Option<(i64, u64)>> {
        let params: Vec<Param> = vec![
            Box::new(self.shared.member.clone()),
            Box::new(id.as_str().to_owned()),
            Box::new(self.shared.incarnation),
            Box::new(self.shared.overlay().was_lost(id)),
        ];
        let rows = self
            .query("claiming a saga", CLAIM_ONE, params)
            .inspect_err(|_| self.shared.unsure.store(true, Ordering::Release))?;
        Ok(rows.first().map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1) as u64)))
    }
}
