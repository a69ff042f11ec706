//! Job logs in the PostgreSQL database that control planes share (`hodei_job_logs*`, created by
//! the store's migrations).
//!
//! # Why the logs live there
//!
//! With several control planes, an agent whose control plane died sends the rest of a job's
//! output to another one, and the job's saga may by then run on a third. A log kept on the disk
//! of whichever control plane received it would be split across machines, and lost with any
//! one of them. In the database every control plane appends to one log and reads it whole, and
//! it is exactly as durable as the journal of the saga that waits for the job.
//!
//! # Durability and group commit
//!
//! [`LogStore::write`](super::LogStore::write) only queues a batch in memory. A sync sends
//! every batch queued for the job since the last one in one statement (`hodei_log_append`),
//! which checks and applies them in one transaction, holding the job's row lock: the commit is
//! the fsync, and only what it committed is acknowledged or read. So a flood of output costs a
//! round trip and a commit per however many batches arrived meanwhile, as on disk. Syncs of one
//! job run one at a time, so its batches reach the database in the order they were written.
//!
//! The checks are the file store's: a resend is compared with what is stored and skipped, a
//! batch past the end is a gap, past the cap bytes are only counted. A transaction cannot
//! leave a torn tail, so there is nothing to recover at start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex, PoisonError};
use std::time::{Duration, Instant};

use hodei_core::{PostgresStore, SqlParam, SqlRow};
use prost::bytes::Bytes;
use tokio::sync::watch;

use super::batch::batch_end;
use super::error::LogStoreError;
use super::holder::JobHolder;
use super::job_id::encode_job_id;
use super::reader::{LogChunk, chunk_of};
use super::status::{LogStatus, StreamStatus};
use super::stream::LogStream;
use crate::metrics::Metrics;

/// How often a follower looks for output another control plane appended: its own control
/// plane's appends wake it at once.
const RECHECK_REMOTE: Duration = Duration::from_millis(250);

/// One batch written and not yet sent.
struct Queued {
    stream: LogStream,
    offset: u64,
    bytes: Bytes,
}

/// The logs of control planes sharing a database.
pub(super) struct SharedLogs {
    store: Arc<PostgresStore>,
    max_stream_bytes: u64,
    queued: SyncMutex<HashMap<String, Vec<Queued>>>,
    /// Held by a job's sync while its batches are on their way, so that syncs of one job
    /// reach the database in order.
    flushing: SyncMutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped after every commit of this process, for its followers.
    appended: watch::Sender<u64>,
}

/// Which jobs without a result a worker holds (the statement's `$2` is the wait, in ms): on a
/// session with a control plane whose lease is live, or was less than the wait ago (a control
/// plane that died detached nobody: its workers count as between sessions from the moment its
/// lease lapsed), or between sessions for less than the wait.
macro_rules! held {
    () => {
        "FROM hodei_job_logs l LEFT JOIN hodei_engines e ON e.id = l.member
         WHERE l.result IS NULL AND NOT l.closed AND l.worker IS NOT NULL
           AND (e.lease_until > now() - $2::bigint * interval '1 millisecond'
                OR (l.member IS NULL AND l.detached_at > now() - $2::bigint * interval '1 millisecond'))"
    };
}

/// The holders of the jobs `$1`.
const HOLDERS: &str = concat!("SELECT l.job, l.worker, l.member ", held!(), " AND l.job = ANY($1)");

/// Whether worker `$1` holds a job.
const HOLDS_ANY: &str = concat!("SELECT 1 ", held!(), " AND l.worker = $1 LIMIT 1");

fn wait_millis(wait: Duration) -> i64 {
    i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)
}

impl std::fmt::Debug for SharedLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLogs").field("engine", &self.store.engine_id()).finish_non_exhaustive()
    }
}

fn stream_number(stream: LogStream) -> i16 {
    match stream {
        LogStream::Stdout => 1,
        LogStream::Stderr => 2,
    }
}

/// The stream a number of [`stream_number`] stands for.
fn stream_of(number: i16) -> Option<LogStream> {
    LogStream::ALL.into_iter().find(|stream| stream_number(*stream) == number)
}

fn offset_param(offset: u64) -> i64 {
    // Offsets past i64::MAX would need 8 EiB of output; the batch check refuses overflow.
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// A session number as the table keeps it: the bits as they are.
fn session_param(session: u64) -> i64 {
    i64::from_ne_bytes(session.to_ne_bytes())
}

fn offset_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SharedLogs {
    pub(super) fn new(store: Arc<PostgresStore>, max_stream_bytes: u64) -> Self {
        Self {
            store,
            max_stream_bytes,
            queued: SyncMutex::default(),
            flushing: SyncMutex::default(),
            appended: watch::Sender::new(0),
        }
    }

    /// Runs one statement off the async threads (the store's calls block).
    async fn run(
        &self,
        operation: &'static str,
        sql: &'static str,
        params: Vec<SqlParam>,
    ) -> Result<Vec<SqlRow>, LogStoreError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.run_statement(operation, sql, params))
            .await
            .map_err(|e| LogStoreError::Shared { operation, source: Box::new(e) })?
            .map_err(|e| LogStoreError::Shared { operation, source: Box::new(e) })
    }

    pub(super) fn write(
        &self,
        job: &str,
        stream: LogStream,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), LogStoreError> {
        encode_job_id(job)?;
        let len = bytes.len();
        // The database keeps offsets as bigint.
        if i64::try_from(batch_end(job, stream, offset, len)?).is_err() {
            return Err(LogStoreError::OffsetOverflow { job: job.to_owned(), stream, offset, len });
        }
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        queued.entry(job.to_owned()).or_default().push(Queued { stream, offset, bytes });
        Ok(())
    }

    /// Sends what was queued for `job` and returns where its log stands.
    pub(super) async fn sync(
        &self,
        job: &str,
        metrics: Option<&Metrics>,
    ) -> Result<LogStatus, LogStoreError> {
        self.flush(job, metrics).await?;
        self.status(job).await
    }

    async fn flush(&self, job: &str, metrics: Option<&Metrics>) -> Result<(), LogStoreError> {
        let lock = {
            let mut flushing = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(flushing.entry(job.to_owned()).or_default())
        };
        let outcome = async {
            let _turn = lock.lock().await;
            let batches = self.queued.lock().unwrap_or_else(PoisonError::into_inner).remove(job);
            let Some(mut batches) = batches.filter(|b| !b.is_empty()) else { return Ok(()) };
            // In stream order: batches an earlier session queued and could not send are
            // resent by the agent's next one, and interleave with them here.
            batches.sort_by_key(|b| (stream_number(b.stream), b.offset));
            let began = Instant::now();
            let streams: Vec<i16> = batches.iter().map(|b| stream_number(b.stream)).collect();
            let offsets: Vec<i64> = batches.iter().map(|b| offset_param(b.offset)).collect();
            let chunks: Vec<Vec<u8>> = batches.iter().map(|b| b.bytes.to_vec()).collect();
            let rows = self
                .run(
                    "appending to a job log",
                    "SELECT outcome, batch, at FROM hodei_log_append($1, $2, $3, $4, $5)",
                    vec![
                        Box::new(job.to_owned()),
                        Box::new(streams),
                        Box::new(offsets),
                        Box::new(chunks),
                        Box::new(offset_param(self.max_stream_bytes)),
                    ],
                )
                .await?;
            if let Some(metrics) = metrics {
                metrics.log_fsynced(began.elapsed());
            }
            self.appended.send_modify(|n| *n = n.wrapping_add(1));
            let Some(row) = rows.first() else {
                return Err(LogStoreError::Shared {
                    operation: "appending to a job log",
                    source: "the append returned no outcome".into(),
                });
            };
            let (outcome, batch, at): (String, i32, i64) = (row.get(0), row.get(1), row.get(2));
            let refused =
                usize::try_from(batch).ok().and_then(|i| i.checked_sub(1)).and_then(|i| batches.get(i));
            let job = job.to_owned();
            match (outcome.as_str(), refused) {
                ("ok", _) => Ok(()),
                ("closed", _) => Err(LogStoreError::Closed { job }),
                ("gap", Some(b)) => Err(LogStoreError::Gap {
                    job,
                    stream: b.stream,
                    offset: b.offset,
                    expected: offset_of(at),
                }),
                ("mismatch", Some(b)) => {
                    Err(LogStoreError::Mismatch { job, stream: b.stream, offset: offset_of(at) })
                }
                (other, _) => Err(LogStoreError::Shared {
                    operation: "appending to a job log",
                    source: format!("unknown outcome {other:?} for batch {batch}").into(),
                }),
            }
        }
        .await;
        let mut flushing = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
        // Nobody else waits for this job's turn: its entry goes, so that jobs this process only
        // saw a part of leave nothing behind.
        if flushing.get(job).is_some_and(|held| Arc::ptr_eq(held, &lock) && Arc::strong_count(&lock) == 2) {
            flushing.remove(job);
        }
        outcome
    }

    pub(super) async fn begin(&self, job: &str) -> Result<(), LogStoreError> {
        encode_job_id(job)?;
        self.run(
            "beginning a job log",
            "INSERT INTO hodei_job_logs (job) VALUES ($1) ON CONFLICT (job) DO NOTHING",
            vec![Box::new(job.to_owned())],
        )
        .await
        .map(drop)
    }

    /// Sends what was queued, then closes the log, storing `result` if there is one (a second
    /// result replaces the first).
    pub(super) async fn close(
        &self,
        job: &str,
        result: Option<&[u8]>,
        metrics: Option<&Metrics>,
    ) -> Result<(), LogStoreError> {
        encode_job_id(job)?;
        match self.flush(job, metrics).await {
            // Output resent after the log was closed (its acknowledgement was lost with a
            // session): the log is complete as stored, and the result is stored again.
            Ok(()) | Err(LogStoreError::Closed { .. }) => {}
            Err(e) => return Err(e),
        }
        self.run(
            "closing a job log",
            "INSERT INTO hodei_job_logs (job, closed, result) VALUES ($1, true, $2)
             ON CONFLICT (job) DO UPDATE SET closed = true,
                 result = coalesce(EXCLUDED.result, hodei_job_logs.result)",
            vec![Box::new(job.to_owned()), Box::new(result.map(<[u8]>::to_vec))],
        )
        .await?;
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    pub(super) async fn result(&self, job: &str) -> Result<Option<Vec<u8>>, LogStoreError> {
        encode_job_id(job)?;
        let rows = self
            .run(
                "reading a job's result",
                "SELECT result FROM hodei_job_logs WHERE job = $1",
                vec![Box::new(job.to_owned())],
            )
            .await?;
        Ok(rows.first().and_then(|row| row.get::<_, Option<Vec<u8>>>(0)))
    }

    pub(super) async fn exists(&self, job: &str) -> Result<bool, LogStoreError> {
        encode_job_id(job)?;
        let rows = self
            .run(
                "looking for a job log",
                "SELECT 1 FROM hodei_job_logs WHERE job = $1",
                vec![Box::new(job.to_owned())],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    pub(super) async fn jobs(&self) -> Result<Vec<String>, LogStoreError> {
        let rows =
            self.run("listing job logs", "SELECT job FROM hodei_job_logs ORDER BY job", vec![]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    pub(super) async fn status(&self, job: &str) -> Result<LogStatus, LogStoreError> {
        encode_job_id(job)?;
        let rows = self
            .run(
                "reading a job log's status",
                "SELECT l.closed, s.stream, s.end_offset, s.stored, s.truncated
                 FROM hodei_job_logs l LEFT JOIN hodei_job_log_streams s ON s.job = l.job
                 WHERE l.job = $1",
                vec![Box::new(job.to_owned())],
            )
            .await?;
        let mut status = LogStatus::default();
        for row in &rows {
            status.closed = row.get(0);
            let Some(stream) = row.get::<_, Option<i16>>(1).and_then(stream_of) else { continue };
            // Rows are written in one transaction each, so nothing here is a torn tail.
            let end = offset_of(row.get(2));
            *status.stream_mut(stream) =
                StreamStatus { end, stored: offset_of(row.get(3)), truncated: row.get(4), confirmed: end };
        }
        Ok(status)
    }

    pub(super) async fn read(
        &self,
        job: &str,
        stream: LogStream,
        from: u64,
        max_len: usize,
    ) -> Result<LogChunk, LogStoreError> {
        self.read_with_closed(job, stream, from, max_len).await.map(|(chunk, _)| chunk)
    }

    async fn read_at(
        &self,
        job: &str,
        status: &LogStatus,
        stream: LogStream,
        from: u64,
        max_len: usize,
    ) -> Result<LogChunk, LogStoreError> {
        let stored = status.stream(stream).stored;
        let to = stored.min(from.saturating_add(u64::try_from(max_len).unwrap_or(u64::MAX)));
        let bytes = if to > from {
            let rows = self
                .run(
                    "reading a job log",
                    "SELECT hodei_log_range($1, $2, $3, $4)",
                    vec![
                        Box::new(job.to_owned()),
                        Box::new(stream_number(stream)),
                        Box::new(offset_param(from)),
                        Box::new(offset_param(to)),
                    ],
                )
                .await?;
            rows.first().map(|row| row.get::<_, Vec<u8>>(0)).unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(chunk_of(status, stream, from, bytes))
    }

    pub(super) async fn attach(&self, job: &str, worker: &str, session: u64) -> Result<(), LogStoreError> {
        encode_job_id(job)?;
        self.run(
            "recording which worker holds a job",
            "INSERT INTO hodei_job_logs (job, worker, member, session) VALUES ($1, $2, $3, $4)
             ON CONFLICT (job) DO UPDATE SET worker = $2, member = $3, session = $4, detached_at = NULL",
            vec![
                Box::new(job.to_owned()),
                Box::new(worker.to_owned()),
                Box::new(self.member()),
                Box::new(session_param(session)),
            ],
        )
        .await
        .map(drop)
    }

    pub(super) async fn detach(
        &self,
        worker: &str,
        jobs: &[String],
        session: u64,
    ) -> Result<(), LogStoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        self.run(
            "recording that a worker's session ended",
            "UPDATE hodei_job_logs SET member = NULL, detached_at = now()
             WHERE job = ANY($1) AND worker = $2 AND member = $3 AND session = $4",
            vec![
                Box::new(jobs.to_vec()),
                Box::new(worker.to_owned()),
                Box::new(self.member()),
                Box::new(session_param(session)),
            ],
        )
        .await
        .map(drop)
    }

    /// Only `attach` sets a job's worker, and a hub checks a claim with this before it attaches:
    /// so it stays the worker the job was first handed to.
    pub(super) async fn handed_to(&self, job: &str) -> Result<Option<String>, LogStoreError> {
        encode_job_id(job)?;
        let rows = self
            .run(
                "looking for the worker a job was handed to",
                "SELECT worker FROM hodei_job_logs WHERE job = $1",
                vec![Box::new(job.to_owned())],
            )
            .await?;
        Ok(rows.first().and_then(|row| row.get::<_, Option<String>>(0)))
    }

    pub(super) async fn holds_only(&self, worker: &str, jobs: &[String]) -> Result<(), LogStoreError> {
        self.run(
            "recording the jobs a worker holds",
            "UPDATE hodei_job_logs SET member = NULL, detached_at = '-infinity'
             WHERE worker = $1 AND result IS NULL AND NOT (job = ANY($2))",
            vec![Box::new(worker.to_owned()), Box::new(jobs.to_vec())],
        )
        .await
        .map(drop)
    }

    /// Detaches every job this control plane's sessions held: none is open when it starts.
    pub(super) async fn detach_all(&self) -> Result<(), LogStoreError> {
        self.run(
            "recording that an earlier run's sessions ended",
            "UPDATE hodei_job_logs SET member = NULL, detached_at = now() WHERE member = $1 AND result IS NULL",
            vec![Box::new(self.member())],
        )
        .await
        .map(drop)
    }

    pub(super) async fn holder(
        &self,
        jobs: &[String],
        wait: Duration,
    ) -> Result<Option<JobHolder>, LogStoreError> {
        if jobs.is_empty() {
            return Ok(None);
        }
        let rows = self
            .run(
                "looking for the worker that holds a job",
                HOLDERS,
                vec![Box::new(jobs.to_vec()), Box::new(wait_millis(wait))],
            )
            .await?;
        let held: Vec<JobHolder> = rows
            .iter()
            .map(|row| JobHolder { job: row.get(0), worker: row.get(1), member: row.get(2) })
            .collect();
        Ok(jobs.iter().find_map(|job| held.iter().find(|h| &h.job == job).cloned()))
    }

    pub(super) async fn holds_any(&self, worker: &str, wait: Duration) -> Result<bool, LogStoreError> {
        let rows = self
            .run(
                "looking for the jobs a worker holds",
                HOLDS_ANY,
                vec![Box::new(worker.to_owned()), Box::new(wait_millis(wait))],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    pub(super) async fn request_cancel(&self, job: &str, reason: &str) -> Result<bool, LogStoreError> {
        let rows = self
            .run(
                "asking for a job to be cancelled",
                "UPDATE hodei_job_logs SET cancel = coalesce(cancel, $2)
                 WHERE job = $1 AND result IS NULL AND NOT closed RETURNING 1",
                vec![Box::new(job.to_owned()), Box::new(reason.to_owned())],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    pub(super) async fn cancels(&self, jobs: &[String]) -> Result<Vec<(String, String)>, LogStoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .run(
                "reading the cancels asked for jobs",
                "SELECT job, cancel FROM hodei_job_logs WHERE job = ANY($1) AND cancel IS NOT NULL AND result IS NULL",
                vec![Box::new(jobs.to_vec())],
            )
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    fn member(&self) -> String {
        self.store.engine_id().to_owned()
    }

    /// What a follower of this store waits on: a bump after each of its commits.
    pub(super) fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// A read, and whether the log was closed as of that read (what a follower needs).
    pub(super) async fn read_with_closed(
        &self,
        job: &str,
        stream: LogStream,
        from: u64,
        max_len: usize,
    ) -> Result<(LogChunk, bool), LogStoreError> {
        let status = self.status(job).await?;
        let chunk = self.read_at(job, &status, stream, from, max_len).await?;
        Ok((chunk, status.closed))
    }

    /// Waits for an append of this process, or for the time after which one of another's may
    /// have committed. False once the store is gone.
    pub(super) async fn wait_for_more(appended: &mut watch::Receiver<u64>) -> bool {
        tokio::select! {
            changed = appended.changed() => changed.is_ok(),
            () = tokio::time::sleep(RECHECK_REMOTE) => true,
        }
    }
}
