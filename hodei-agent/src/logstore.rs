//! The control plane's store of job logs.
//!
//! A worker agent streams each job's stdout and stderr as batches: a stream, the offset of the
//! batch's first byte within that stream, and raw bytes (never assumed to be UTF-8). After a
//! reconnect the agent resends from the last offset the hub acknowledged, so batches overlap;
//! the store keeps every byte exactly once and acknowledges only what is on disk.
//!
//! # Layout
//!
//! ```text
//! <data_dir>/logs/.lock                  flock: one store per directory
//! <data_dir>/logs/<job>/stdout.log       the stored bytes of stdout, nothing else
//! <data_dir>/logs/<job>/stderr.log       the same for stderr
//! <data_dir>/logs/<job>/state            closed flag and truncation points (absent: open, uncut)
//! <data_dir>/logs/<job>/result           the job's result: a format byte, then the hub's encoding
//! ```
//!
//! `<job>` is the job id escaped byte by byte: `a-z`, `0-9`, `-` and `_` stand for themselves,
//! every other byte is `%XX` (upper-case hex), so `saga-id/3` is `saga-id%2F3`. The escape is
//! reversible ([`LogStore::jobs`] lists the ids back) and no id can name `.`, `..`, a path
//! separator or a hidden file. Upper-case letters are escaped too, so that ids differing only
//! in case stay apart on case-insensitive file systems. An id whose escaped form is longer
//! than 255 bytes (the usual file-name limit) is refused.
//!
//! # Offsets and durability
//!
//! The length of a stream's file *is* its stored offset: there is no index to disagree with
//! it. Only bytes that were `sync_data`ed are acknowledged, so an acknowledged offset survives
//! a crash of the process or of the machine; readers and followers see only those bytes too.
//!
//! Writing and syncing are separate so that one fsync covers many batches (group commit):
//! [`LogStore::write`] puts a batch in the file and returns before it is durable, and
//! [`LogStore::sync`] makes everything written to a job's log so far durable and returns the
//! offsets that may now be acknowledged. The fsync runs outside the job's lock, so writes go on
//! while it runs and the next sync covers them: the hub keeps one sync in flight per session
//! and starts the next as soon as it returns, so a flood of output costs one fsync per
//! however many batches arrived meanwhile, and a lone batch is synced at once.
//! [`LogStore::append`] is both in one call. [`LogStore::finish`] and [`LogStore::close`] sync
//! what was written before they record the end. Calls that write nothing (a resend the store
//! already has, output past the cap) leave nothing to sync.
//!
//! # The cap and its marker
//!
//! The cap is per stream ([`LogStoreConfig::max_stream_bytes`], default
//! [`DEFAULT_MAX_STREAM_BYTES`], 64 MiB): a job that floods stdout still keeps the stderr
//! lines that explain its failure. 64 MiB is sixteen times GitLab Runner's default, enough
//! for a million 60-byte lines, and bounds a runaway job (`yes`) to 128 MiB of disk.
//!
//! Past the cap the store writes nothing more to the stream but still counts the bytes and
//! still acknowledges their offsets, so the agent never resends them. The marker is never
//! written into the stream's file (the file length must stay the stored offset): the state
//! file records where the stream was cut, and every read that reaches that point gets the
//! marker appended, on a line of its own, exactly once:
//! `[hodei: stdout truncated at N bytes; M further bytes dropped]` (with `so far` while the
//! job is running). The bytes below the cut, then the truncation point, are made durable
//! before any offset past it is acknowledged. The dropped count is persisted at the cut and at [`LogStore::close`]; after a
//! crash in between, the agent's next offset restores it, because past the cap an offset
//! beyond the end is not a gap but more dropped output.
//!
//! # Recovery
//!
//! Reopening the store trusts the files: each stream continues at its file's length, which is
//! `sync_data`ed before anything is acknowledged over it (a process that died after a write
//! but before its sync leaves bytes in the page cache only). A crash mid-append leaves a torn
//! tail that was never acknowledged; on Linux file systems it is a prefix of the batch, which
//! the agent's resend (from its last ack, at or before the tail) overlaps and the store skips.
//! Every overlap is compared with what is stored. Where a never-acknowledged tail reads as
//! zeros from the first byte that differs from the resend to the end of the file (what a file
//! system that grew the file before writing its blocks leaves), the zeros are cut and the
//! agent's bytes written instead. Any other difference is a [`LogStoreError::Mismatch`] and
//! changes nothing: acknowledged output is never rewritten. Readers may see a recovered tail
//! before the agent's resend has confirmed it.
//!
//! The state file is replaced by write, fsync and rename, so it is either the old or the new
//! one; a leftover `state.tmp` is ignored.
//!
//! There is no combined stdout/stderr view: the two streams' offsets are independent and the
//! agent sends no ordering between them.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as SyncMutex, PoisonError};

/// The shared byte buffers [`LogStore::write`] takes (the `bytes` crate's, as prost decodes
/// log batches into), re-exported so that callers need no dependency of their own for it.
pub use prost::bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::fs::{self, File};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, MutexGuard, watch};

/// The default per-stream cap: 64 MiB (see the module documentation for why).
pub const DEFAULT_MAX_STREAM_BYTES: u64 = 64 * 1024 * 1024;

/// How much a follower reads from disk for one chunk.
const FOLLOW_CHUNK: usize = 64 * 1024;
/// File names longer than this fail on ext4, xfs, btrfs and most others.
const MAX_NAME_LEN: usize = 255;
const LOCK_FILE: &str = ".lock";
const STATE_FILE: &str = "state";
const RESULT_FILE: &str = "result";
/// The first byte of the result file: the format of what follows.
const RESULT_FORMAT: u8 = 1;
const STATE_HEADER: &str = "hodei-logstore-state 1";

/// One of a job's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl LogStream {
    /// Both streams.
    pub const ALL: [LogStream; 2] = [LogStream::Stdout, LogStream::Stderr];

    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout.log",
            LogStream::Stderr => "stderr.log",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        LogStream::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the log store can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogStoreError {
    /// The job id cannot name a log.
    #[error("invalid job id {id:?}: {reason}")]
    InvalidJobId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Another store (in this process or another) has the directory open.
    #[error("log directory {} is locked by another log store", path.display())]
    Locked {
        /// The `logs` directory.
        path: PathBuf,
    },
    /// A file operation failed. Nothing past the last acknowledged offset is relied on.
    #[error("log store failed while {operation} {}: {source}", path.display())]
    Io {
        /// What the store was doing.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The batch starts past the stream's end; the agent must resend from `expected`.
    #[error(
        "{stream} of job `{job}`: a batch at offset {offset} leaves a gap; resend from offset {expected}"
    )]
    Gap {
        /// The job.
        job: String,
        /// The stream.
        stream: LogStream,
        /// Where the batch started.
        offset: u64,
        /// The stream's end: where the next batch must start (or start before).
        expected: u64,
    },
    /// A resent byte differs from the one stored (and acknowledged) at that offset. Nothing
    /// was written.
    #[error("{stream} of job `{job}`: the resent bytes differ from the stored ones at offset {offset}")]
    Mismatch {
        /// The job.
        job: String,
        /// The stream.
        stream: LogStream,
        /// The first differing offset.
        offset: u64,
    },
    /// The batch would end past `u64::MAX`.
    #[error("{stream} of job `{job}`: a batch of {len} bytes at offset {offset} overflows the offset range")]
    OffsetOverflow {
        /// The job.
        job: String,
        /// The stream.
        stream: LogStream,
        /// Where the batch started.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// The job's log was closed; it takes no more output.
    #[error("the log of job `{job}` is closed")]
    Closed {
        /// The job.
        job: String,
    },
    /// A job's state file cannot be parsed. It is left as it is for an operator.
    #[error("corrupt log state file {}: {reason}", path.display())]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was dropped while a follower waited for a log that was never closed.
    #[error("the log store was dropped before the log of job `{job}` was closed")]
    StoreDropped {
        /// The job.
        job: String,
    },
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogStoreError {
    let path = path.to_path_buf();
    move |source| LogStoreError::Io { operation, path, source }
}

/// How the store behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogStoreConfig {
    /// How many bytes of each stream of a job are stored; the rest is counted and dropped
    /// behind a visible marker.
    pub max_stream_bytes: u64,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self { max_stream_bytes: DEFAULT_MAX_STREAM_BYTES }
    }
}

impl LogStoreConfig {
    /// Sets the per-stream cap.
    pub fn with_max_stream_bytes(mut self, max_stream_bytes: u64) -> Self {
        self.max_stream_bytes = max_stream_bytes;
        self
    }
}

/// What an append acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Every byte of the stream below this offset is durably stored, or counted as dropped
    /// past the cap. The agent resends from here after a reconnect.
    pub offset: u64,
    /// The stream has reached its cap: further bytes are only counted, so the agent may stop
    /// sending them (an empty batch at its current offset still accounts for them).
    pub truncated: bool,
}

/// Where one stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStatus {
    /// The end offset: where the next batch continues.
    pub end: u64,
    /// How many bytes are stored (the file's length); below `end` only when truncated.
    pub stored: u64,
    /// The stream reached its cap.
    pub truncated: bool,
}

impl StreamStatus {
    /// How many bytes were counted and dropped past the cap.
    pub fn dropped(&self) -> u64 {
        self.end.saturating_sub(self.stored)
    }
}

/// Where a job's log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStatus {
    /// Standard output.
    pub stdout: StreamStatus,
    /// Standard error.
    pub stderr: StreamStatus,
    /// The job ended: no more output is taken.
    pub closed: bool,
}

impl LogStatus {
    /// One stream's status.
    pub fn stream(&self, stream: LogStream) -> &StreamStatus {
        match stream {
            LogStream::Stdout => &self.stdout,
            LogStream::Stderr => &self.stderr,
        }
    }
}

/// A stream cut at its cap, as a reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    /// The stream.
    pub stream: LogStream,
    /// How many bytes were stored before the cut.
    pub at: u64,
    /// How many bytes were dropped after it (so far, unless `final_count`).
    pub dropped: u64,
    /// The log is closed, so `dropped` will not grow.
    pub final_count: bool,
}

impl Truncation {
    /// The marker line a reader gets where the stream was cut.
    pub fn marker(&self) -> String {
        let so_far = if self.final_count { "" } else { " so far" };
        format!(
            "\n[hodei: {} truncated at {} bytes; {} further bytes dropped{so_far}]\n",
            self.stream, self.at, self.dropped
        )
    }
}

/// Bytes read from one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// The stream offset of the first byte.
    pub offset: u64,
    /// The stored bytes, followed by the truncation marker when `truncation` is set.
    pub bytes: Vec<u8>,
    /// Where the next read continues.
    pub next_offset: u64,
    /// Set when this chunk reached the cut: `bytes` ends with its marker.
    pub truncation: Option<Truncation>,
}

/// The store of every job's logs. One per directory: it holds a lock on `<data_dir>/logs`.
#[derive(Debug)]
pub struct LogStore {
    logs_dir: PathBuf,
    config: LogStoreConfig,
    /// Jobs with an open log, and closed ones while an operation is on them; closed jobs are
    /// dropped from here so that they hold no file handles.
    jobs: SyncMutex<HashMap<String, Arc<Job>>>,
    _lock: std::fs::File,
}

impl LogStore {
    /// Opens (or creates) the store under `<data_dir>/logs` with the default configuration.
    pub async fn open(data_dir: impl AsRef<Path>) -> Result<Self, LogStoreError> {
        Self::open_with_config(data_dir, LogStoreConfig::default()).await
    }

    /// Opens (or creates) the store under `<data_dir>/logs`.
    ///
    /// Fails with [`LogStoreError::Locked`] if another store has that directory open.
    pub async fn open_with_config(
        data_dir: impl AsRef<Path>,
        config: LogStoreConfig,
    ) -> Result<Self, LogStoreError> {
        let data_dir = data_dir.as_ref();
        let logs_dir = data_dir.join("logs");
        let existed = fs::try_exists(&logs_dir).await.map_err(io_error("looking for", &logs_dir))?;
        if !existed {
            fs::create_dir_all(&logs_dir).await.map_err(io_error("creating", &logs_dir))?;
            sync_dir(data_dir).await?;
        }
        let lock = lock_dir(logs_dir.clone()).await?;
        Ok(Self { logs_dir, config, jobs: SyncMutex::default(), _lock: lock })
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &LogStoreConfig {
        &self.config
    }

    /// Appends a batch of `stream` that starts at stream offset `offset`, and makes the
    /// stream durable: [`LogStore::write`] and a sync of that stream in one call, under one lock.
    ///
    /// Bytes the stream already has are compared and skipped; a batch past the end is a
    /// [`LogStoreError::Gap`] (except past the cap, where the bytes are dropped anyway).
    pub async fn append(
        &self,
        job: &str,
        stream: LogStream,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Ack, LogStoreError> {
        let bytes = Bytes::copy_from_slice(bytes);
        let handle = self.job(job)?;
        let result = async {
            let mut state = handle.lock().await?;
            let mut result = self.write_locked(job, &handle, &mut state, stream, offset, &bytes).await;
            if result.is_ok() {
                result = sync_locked(&handle.dir, &self.logs_dir, &mut state, stream).await;
            }
            handle.publish(&state);
            result.map(|()| state.stream_mut(stream).ack())
        }
        .await;
        self.release_if_closed(job, &handle);
        result
    }

    /// Writes a batch of `stream` that starts at stream offset `offset`, without making it
    /// durable: nothing of it is acknowledged, nor seen by readers, before a
    /// [`LogStore::sync`] (or [`LogStore::append`], [`LogStore::close`]) covers it.
    ///
    /// The bytes are written as they are, without a copy. Overlaps and gaps are handled as by
    /// [`LogStore::append`].
    pub async fn write(
        &self,
        job: &str,
        stream: LogStream,
        offset: u64,
        bytes: Bytes,
    ) -> Result<(), LogStoreError> {
        let handle = self.job(job)?;
        let result = async {
            let mut state = handle.lock().await?;
            let result = self.write_locked(job, &handle, &mut state, stream, offset, &bytes).await;
            handle.publish(&state);
            result
        }
        .await;
        self.release_if_closed(job, &handle);
        result
    }

    /// Makes everything written to the job's log so far durable, and returns where its streams
    /// stand: each stream's `end` is the offset that may be acknowledged.
    ///
    /// The fsync runs without holding the job's lock, so writes go on meanwhile; they are left
    /// for the next sync. If an fsync fails, the stream is cut back to what was durable before
    /// (the kernel may have dropped the pages it failed to write), so that those bytes are
    /// written again, not trusted.
    pub async fn sync(&self, job: &str) -> Result<LogStatus, LogStoreError> {
        let handle = self.job(job)?;
        let result = async {
            let mut due = Vec::new();
            {
                let mut state = handle.lock().await?;
                for stream in LogStream::ALL {
                    let s = state.stream_mut(stream);
                    if s.synced >= s.stored {
                        continue;
                    }
                    match &s.file {
                        Some(file) => due.push((stream, Arc::clone(file), s.stored, s.generation)),
                        // A failed write dropped the writer: reopening reconciles and syncs.
                        None => sync_locked(&handle.dir, &self.logs_dir, &mut state, stream).await?,
                    }
                }
                handle.publish(&state);
            }
            for (stream, file, upto, generation) in due {
                let synced = blocking({
                    let file = Arc::clone(&file);
                    move || file.sync_data()
                })
                .await;
                let mut state = handle.lock().await?;
                let s = state.stream_mut(stream);
                // A file cut or replaced meanwhile is not what this fsync covered.
                if s.generation == generation {
                    match synced {
                        Ok(()) => s.mark_synced(upto),
                        Err(error) => {
                            s.roll_back(&file).await;
                            return Err(io_error("syncing", &handle.dir.join(stream.file_name()))(error));
                        }
                    }
                }
                handle.publish(&state);
            }
            Ok(handle.lock().await?.status())
        }
        .await;
        self.release_if_closed(job, &handle);
        result
    }

    /// Closes the job's log: appends are refused from now on and followers reach the end.
    /// Closing a closed log does nothing.
    pub async fn close(&self, job: &str) -> Result<(), LogStoreError> {
        self.close_with(job, None).await
    }

    /// Stores the job's result (opaque bytes; the hub keeps the encoded wire result) and closes
    /// its log. The result is durable before this returns, so the hub acknowledges it to the
    /// agent only once it can no longer be lost, and a step that asks again after a restart
    /// finds it. A second result replaces the first.
    pub async fn finish(&self, job: &str, result: &[u8]) -> Result<(), LogStoreError> {
        self.close_with(job, Some(result)).await
    }

    /// The result stored by [`LogStore::finish`], if any.
    pub async fn result(&self, job: &str) -> Result<Option<Vec<u8>>, LogStoreError> {
        let path = self.logs_dir.join(encode_job_id(job)?).join(RESULT_FILE);
        match fs::read(&path).await {
            Ok(bytes) => match bytes.split_first() {
                Some((&RESULT_FORMAT, body)) => Ok(Some(body.to_vec())),
                Some((format, _)) => Err(LogStoreError::CorruptState {
                    path,
                    reason: format!("unknown result format {format}"),
                }),
                None => Err(LogStoreError::CorruptState { path, reason: "empty result file".to_owned() }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("reading", &path)(e)),
        }
    }

    async fn close_with(&self, job: &str, result: Option<&[u8]>) -> Result<(), LogStoreError> {
        let handle = self.job(job)?;
        let outcome = async {
            let mut state = handle.lock().await?;
            // A job without output still gets its directory, so that its end is recorded.
            state.ensure_dir(&handle.dir, &self.logs_dir).await?;
            // The log is complete before its end or result is recorded.
            for stream in LogStream::ALL {
                sync_locked(&handle.dir, &self.logs_dir, &mut state, stream).await?;
            }
            if let Some(result) = result {
                let mut record = Vec::with_capacity(result.len() + 1);
                record.push(RESULT_FORMAT);
                record.extend_from_slice(result);
                replace_file(&handle.dir, RESULT_FILE, &record).await?;
            }
            if state.closed {
                return Ok(());
            }
            let record = StateRecord { closed: true, ..state.record() };
            write_state(&handle.dir, &record).await?;
            state.closed = true;
            for stream in LogStream::ALL {
                state.stream_mut(stream).file = None;
            }
            handle.publish(&state);
            Ok(())
        }
        .await;
        self.release_if_closed(job, &handle);
        outcome
    }

    /// Where the job's log stands. A job without any log reads as empty and open.
    pub async fn status(&self, job: &str) -> Result<LogStatus, LogStoreError> {
        Ok(self.current(job).await?.1)
    }

    /// Reads up to `max_len` stored bytes of `stream` from `from_offset`.
    ///
    /// A read that reaches the cut of a truncated stream gets the marker appended (so it may
    /// be a little longer than `max_len`) and continues after the dropped bytes.
    pub async fn read(
        &self,
        job: &str,
        stream: LogStream,
        from_offset: u64,
        max_len: usize,
    ) -> Result<LogChunk, LogStoreError> {
        let (dir, status) = self.current(job).await?;
        let mut reader = StreamReader { path: dir.join(stream.file_name()), file: None };
        reader.read(&status, stream, from_offset, max_len).await
    }

    /// Follows `stream` from `from_offset`: first the stored bytes, then new ones as they are
    /// appended, until the log is closed.
    pub async fn follow(
        &self,
        job: &str,
        stream: LogStream,
        from_offset: u64,
    ) -> Result<LogFollower, LogStoreError> {
        let handle = self.job(job)?;
        let result = handle.lock().await.map(|_| LogFollower {
            job: job.to_owned(),
            stream,
            offset: from_offset,
            reader: StreamReader { path: handle.dir.join(stream.file_name()), file: None },
            status: handle.status.subscribe(),
            done: false,
        });
        self.release_if_closed(job, &handle);
        result
    }

    /// The ids of every job with a log on disk, sorted.
    pub async fn jobs(&self) -> Result<Vec<String>, LogStoreError> {
        let mut entries = fs::read_dir(&self.logs_dir).await.map_err(io_error("listing", &self.logs_dir))?;
        let mut ids = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_error("listing", &self.logs_dir))? {
            let name = entry.file_name();
            match name.to_str().and_then(decode_job_name) {
                Some(id) => ids.push(id),
                None if name == LOCK_FILE => {}
                None => {
                    tracing::warn!(name = ?name, "ignoring a file in the log directory that names no job")
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn job(&self, id: &str) -> Result<Arc<Job>, LogStoreError> {
        let dir = self.logs_dir.join(encode_job_id(id)?);
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Arc::clone(jobs.entry(id.to_owned()).or_insert_with(|| Arc::new(Job::new(dir)))))
    }

    fn release_if_closed(&self, id: &str, handle: &Arc<Job>) {
        if handle.status.borrow().closed {
            let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            if jobs.get(id).is_some_and(|j| Arc::ptr_eq(j, handle)) {
                jobs.remove(id);
            }
        }
    }

    /// The job's directory and status, without keeping a job that is not in memory there.
    async fn current(&self, id: &str) -> Result<(PathBuf, LogStatus), LogStoreError> {
        let dir = self.logs_dir.join(encode_job_id(id)?);
        let cached = self.jobs.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned();
        let status = match cached {
            Some(handle) => handle.lock().await?.status(),
            None => JobState::load(&dir).await?.status(),
        };
        Ok((dir, status))
    }

    async fn write_locked(
        &self,
        id: &str,
        handle: &Job,
        state: &mut JobState,
        stream: LogStream,
        offset: u64,
        bytes: &Bytes,
    ) -> Result<(), LogStoreError> {
        if state.closed {
            return Err(LogStoreError::Closed { job: id.to_owned() });
        }
        let batch_end =
            u64::try_from(bytes.len()).ok().and_then(|len| offset.checked_add(len)).ok_or_else(|| {
                LogStoreError::OffsetOverflow { job: id.to_owned(), stream, offset, len: bytes.len() }
            })?;
        let file = state.open_writer(&handle.dir, &self.logs_dir, stream).await?;
        let batch = Batch { job: id, stream, offset, end: batch_end, bytes };
        let result = self.write_batch(&handle.dir, state, &file, &batch).await;
        let s = state.stream_mut(stream);
        if let Err(LogStoreError::Io { .. }) = &result {
            // The file may hold part of a write: cut it back to what was written before, and
            // drop the writer so that the next append reconciles with the file whatever this
            // fails to cut.
            let stored = s.stored;
            let rolled_back = blocking(move || {
                if file.metadata()?.len() > stored {
                    file.set_len(stored)?;
                    file.sync_data()?;
                }
                Ok(())
            })
            .await;
            s.generation += 1;
            if let Err(error) = rolled_back {
                tracing::warn!(job = id, %stream, %error, "could not cut a failed append back");
            }
        } else {
            s.file = Some(file);
        }
        result
    }

    async fn write_batch(
        &self,
        dir: &Path,
        state: &mut JobState,
        file: &Arc<std::fs::File>,
        batch: &Batch<'_>,
    ) -> Result<(), LogStoreError> {
        let record = state.record();
        let path = dir.join(batch.stream.file_name());
        let s = state.stream_mut(batch.stream);
        if batch.offset > s.end && !s.truncated {
            return Err(LogStoreError::Gap {
                job: batch.job.to_owned(),
                stream: batch.stream,
                offset: batch.offset,
                expected: s.end,
            });
        }
        check_overlap(file, &path, s, batch).await?;
        if s.truncated {
            s.end = s.end.max(batch.end);
        } else if batch.end > s.end {
            let room = self.config.max_stream_bytes.saturating_sub(s.stored);
            let keep_end = batch.end.min(s.end.saturating_add(room));
            let kept = batch.range(s.end, keep_end);
            if !kept.is_empty() {
                let (file, at, len) = (Arc::clone(file), s.stored, kept.len() as u64);
                blocking(move || file.write_all_at(&kept, at)).await.map_err(io_error("writing", &path))?;
                s.stored += len;
                s.end = s.stored;
            }
            if keep_end < batch.end {
                // What is kept is durable before the cut is recorded: a crash after the record
                // must not leave a hole below the cut that the agent is told to skip.
                let synced = s.stored;
                blocking({
                    let file = Arc::clone(file);
                    move || file.sync_data()
                })
                .await
                .map_err(io_error("syncing", &path))?;
                s.mark_synced(synced);
                let cut = Cut { at: s.stored, end: batch.end };
                write_state(dir, &record.with_cut(batch.stream, Some(cut))).await?;
                tracing::warn!(
                    job = batch.job,
                    stream = %batch.stream,
                    at = s.stored,
                    "the log reached its cap; further output is counted and dropped"
                );
                s.truncated = true;
                s.end = batch.end;
            }
        }
        Ok(())
    }
}

/// Makes what `stream` has written durable, holding the job's lock: for appends and the close.
async fn sync_locked(
    dir: &Path,
    logs_dir: &Path,
    state: &mut JobState,
    stream: LogStream,
) -> Result<(), LogStoreError> {
    let s = state.stream_mut(stream);
    if s.synced >= s.stored {
        return Ok(());
    }
    // Opening a writer syncs the file, so a stream without one is durable once it has one.
    let reopened = s.file.is_none();
    let file = state.open_writer(dir, logs_dir, stream).await?;
    let s = state.stream_mut(stream);
    if !reopened {
        let synced = blocking({
            let file = Arc::clone(&file);
            move || file.sync_data()
        })
        .await;
        if let Err(error) = synced {
            s.roll_back(&file).await;
            return Err(io_error("syncing", &dir.join(stream.file_name()))(error));
        }
    }
    s.mark_synced(s.stored);
    s.file = Some(file);
    Ok(())
}

/// Compares a batch with the stored bytes it overlaps, and cuts a torn tail of zeros that it
/// contradicts.
async fn check_overlap(
    file: &Arc<std::fs::File>,
    path: &Path,
    s: &mut StreamState,
    batch: &Batch<'_>,
) -> Result<(), LogStoreError> {
    // The agent resends from offsets it had acknowledged, so everything below one was synced
    // by some run of this store; a batch that continues the stream starts past what is synced.
    if batch.offset <= s.stored {
        s.acked = s.acked.max(batch.offset.min(s.synced));
    }
    if batch.offset >= s.stored {
        return Ok(());
    }
    let upto = batch.end.min(s.stored);
    let ours = read_at(file, batch.offset, upto - batch.offset).await.map_err(io_error("reading", path))?;
    let theirs = batch.slice(batch.offset, upto);
    let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) else {
        return Ok(());
    };
    let at = batch.offset + i as u64;
    let torn = !s.truncated
        && at >= s.acked
        && ours.get(i..).unwrap_or_default().iter().all(|b| *b == 0)
        && is_zeros(file, upto, s.stored).await.map_err(io_error("reading", path))?;
    if !torn {
        return Err(LogStoreError::Mismatch { job: batch.job.to_owned(), stream: batch.stream, offset: at });
    }
    tracing::warn!(job = batch.job, stream = %batch.stream, at, "cutting a torn tail of zeros the resend contradicts");
    let cut = Arc::clone(file);
    blocking(move || {
        cut.set_len(at)?;
        cut.sync_data()
    })
    .await
    .map_err(io_error("cutting", path))?;
    s.generation += 1;
    s.stored = at;
    s.end = at;
    s.synced = s.synced.min(at);
    Ok(())
}

/// One write's arguments.
struct Batch<'a> {
    job: &'a str,
    stream: LogStream,
    offset: u64,
    end: u64,
    bytes: &'a Bytes,
}

impl Batch<'_> {
    fn index(&self, at: u64) -> usize {
        usize::try_from(at.max(self.offset).min(self.end) - self.offset).unwrap_or(0)
    }

    /// The batch's bytes between two stream offsets (clamped to the batch).
    fn slice(&self, from: u64, to: u64) -> &[u8] {
        self.bytes.get(self.index(from)..self.index(to)).unwrap_or_default()
    }

    /// The same as [`Batch::slice`], sharing the batch's buffer instead of borrowing it.
    fn range(&self, from: u64, to: u64) -> Bytes {
        let (from, to) = (self.index(from), self.index(to));
        if from < to { self.bytes.slice(from..to) } else { Bytes::new() }
    }
}

/// A job's log in memory.
#[derive(Debug)]
struct Job {
    dir: PathBuf,
    /// Held across the file operations of one append, so a job's appends run one at a time.
    state: Mutex<JobState>,
    /// What readers may see: published after every change, and what followers wake on.
    status: watch::Sender<LogStatus>,
}

impl Job {
    fn new(dir: PathBuf) -> Self {
        Self { dir, state: Mutex::new(JobState::default()), status: watch::Sender::new(LogStatus::default()) }
    }

    async fn lock(&self) -> Result<MutexGuard<'_, JobState>, LogStoreError> {
        let mut state = self.state.lock().await;
        if !state.loaded {
            *state = JobState::load(&self.dir).await?;
            self.publish(&state);
        }
        Ok(state)
    }

    fn publish(&self, state: &JobState) {
        let new = state.status();
        self.status.send_if_modified(|current| {
            let changed = *current != new;
            *current = new;
            changed
        });
    }
}

#[derive(Debug, Default)]
struct JobState {
    loaded: bool,
    closed: bool,
    dir_exists: bool,
    stdout: StreamState,
    stderr: StreamState,
}

#[derive(Debug, Default)]
struct StreamState {
    /// The file's length: every byte below is written, not necessarily synced.
    stored: u64,
    /// Every byte below is synced: what may be acknowledged and read.
    synced: u64,
    /// `stored`, plus the bytes dropped once truncated.
    end: u64,
    truncated: bool,
    /// Bytes below this were acknowledged and are never rewritten; above it (a tail found on
    /// disk, or left by a failed write) a resend may replace a torn tail of zeros.
    acked: u64,
    /// The writer, opened at the first append of this run; `None` after a failed write so
    /// that the next append reconciles with the file. Shared with syncs in flight.
    file: Option<Arc<std::fs::File>>,
    /// Bumped whenever the file is cut or its writer dropped, so that a sync that started
    /// before does not vouch for what is there now.
    generation: u64,
}

impl StreamState {
    /// What an acknowledgement may carry: the synced bytes, and past the cap the dropped ones
    /// counted after them (the cut is durable, and nothing is written past it).
    fn ack(&self) -> Ack {
        let offset = if self.truncated && self.synced == self.stored { self.end } else { self.synced };
        Ack { offset, truncated: self.truncated }
    }

    fn mark_synced(&mut self, upto: u64) {
        self.synced = self.synced.max(upto.min(self.stored));
        self.acked = self.acked.max(self.synced);
    }

    /// After a failed fsync: forgets what was not durable before, and the writer.
    async fn roll_back(&mut self, file: &Arc<std::fs::File>) {
        self.generation += 1;
        self.file = None;
        let (file, synced) = (Arc::clone(file), self.synced);
        if let Err(error) = blocking(move || file.set_len(synced)).await {
            tracing::warn!(%error, "could not cut an unsynced tail back after a failed sync");
        }
        self.stored = self.synced;
        if !self.truncated {
            self.end = self.stored;
        }
    }
}

impl JobState {
    async fn load(dir: &Path) -> Result<Self, LogStoreError> {
        let record = read_state(dir).await?;
        let dir_exists = fs::try_exists(dir).await.map_err(io_error("looking for", dir))?;
        let mut state = Self { loaded: true, closed: record.closed, dir_exists, ..Self::default() };
        for stream in LogStream::ALL {
            let path = dir.join(stream.file_name());
            let stored = match fs::metadata(&path).await {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(io_error("reading the length of", &path)(e)),
            };
            let s = state.stream_mut(stream);
            // Trusted as in the module documentation: each writer syncs the file it opens
            // before anything is acknowledged over it.
            s.stored = stored;
            s.synced = stored;
            s.end = stored;
            if let Some(cut) = record.cut(stream) {
                if cut.at != stored {
                    tracing::warn!(path = %path.display(), cut = cut.at, stored, "a truncated log's length moved");
                }
                s.truncated = true;
                s.end = cut.end.max(stored);
                s.acked = stored;
            }
        }
        Ok(state)
    }

    fn stream_mut(&mut self, stream: LogStream) -> &mut StreamState {
        match stream {
            LogStream::Stdout => &mut self.stdout,
            LogStream::Stderr => &mut self.stderr,
        }
    }

    /// What readers see: only synced bytes.
    fn status(&self) -> LogStatus {
        let view =
            |s: &StreamState| StreamStatus { end: s.ack().offset, stored: s.synced, truncated: s.truncated };
        LogStatus { stdout: view(&self.stdout), stderr: view(&self.stderr), closed: self.closed }
    }

    fn record(&self) -> StateRecord {
        let cut = |s: &StreamState| s.truncated.then_some(Cut { at: s.stored, end: s.end });
        StateRecord { closed: self.closed, stdout: cut(&self.stdout), stderr: cut(&self.stderr) }
    }

    async fn ensure_dir(&mut self, dir: &Path, logs_dir: &Path) -> Result<(), LogStoreError> {
        if !self.dir_exists {
            fs::create_dir_all(dir).await.map_err(io_error("creating", dir))?;
            sync_dir(logs_dir).await?;
            self.dir_exists = true;
        }
        Ok(())
    }

    /// Takes the stream's writer out, opening it (and reconciling with the file) if needed.
    ///
    /// Out, so that an append that fails or is cancelled midway leaves no writer behind and
    /// the next one starts from the file's real length.
    async fn open_writer(
        &mut self,
        dir: &Path,
        logs_dir: &Path,
        stream: LogStream,
    ) -> Result<Arc<std::fs::File>, LogStoreError> {
        if let Some(file) = self.stream_mut(stream).file.take() {
            return Ok(file);
        }
        self.ensure_dir(dir, logs_dir).await?;
        let path = dir.join(stream.file_name());
        let open_path = path.clone();
        // What is in the file may only be in the page cache (the last run died between a
        // write and its sync); it must be on disk before an ack covers it.
        let (file, len) = blocking(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&open_path)?;
            file.sync_data()?;
            let len = file.metadata()?.len();
            Ok((file, len))
        })
        .await
        .map_err(io_error("opening", &path))?;
        sync_dir(dir).await?;
        let s = self.stream_mut(stream);
        if len != s.stored {
            tracing::debug!(path = %path.display(), len, stored = s.stored, "log file length reconciled");
            s.stored = len;
            s.end = if s.truncated { s.end.max(len) } else { len };
            s.acked = s.acked.min(len);
        }
        s.synced = len;
        s.generation += 1;
        Ok(Arc::new(file))
    }
}

/// Reads one stream's file for [`LogStore::read`] and followers.
#[derive(Debug)]
struct StreamReader {
    path: PathBuf,
    file: Option<Arc<std::fs::File>>,
}

impl StreamReader {
    async fn read(
        &mut self,
        status: &LogStatus,
        stream: LogStream,
        from: u64,
        max_len: usize,
    ) -> Result<LogChunk, LogStoreError> {
        let s = status.stream(stream);
        let len = s.stored.saturating_sub(from).min(u64::try_from(max_len).unwrap_or(u64::MAX));
        let mut bytes = Vec::new();
        if len > 0 {
            let file = match &mut self.file {
                Some(file) => file,
                None => {
                    let path = self.path.clone();
                    let file = blocking(move || std::fs::File::open(path))
                        .await
                        .map_err(io_error("opening", &self.path))?;
                    self.file.insert(Arc::new(file))
                }
            };
            bytes = read_at(file, from, len).await.map_err(io_error("reading", &self.path))?;
        }
        let mut next_offset = from + len;
        let mut truncation = None;
        if s.truncated && next_offset == s.stored {
            let cut = Truncation { stream, at: s.stored, dropped: s.dropped(), final_count: status.closed };
            bytes.extend_from_slice(cut.marker().as_bytes());
            truncation = Some(cut);
            next_offset = s.end;
        } else if s.truncated && next_offset > s.stored {
            next_offset = next_offset.max(s.end);
        }
        Ok(LogChunk { offset: from, bytes, next_offset, truncation })
    }
}

/// New output of one stream as it is appended; see [`LogStore::follow`].
///
/// It reads from disk when the store announces a change, so it never polls, and it never
/// sees a byte before it is acknowledged.
#[derive(Debug)]
pub struct LogFollower {
    job: String,
    stream: LogStream,
    offset: u64,
    reader: StreamReader,
    status: watch::Receiver<LogStatus>,
    done: bool,
}

impl LogFollower {
    /// The next chunk, or `None` once the log is closed and everything was returned.
    ///
    /// Fails with [`LogStoreError::StoreDropped`] if the store goes away first.
    pub async fn next(&mut self) -> Option<Result<LogChunk, LogStoreError>> {
        while !self.done {
            // Marking the status seen before reading means a change after it wakes the wait
            // below, so no append can slip between the read and the wait.
            let status = *self.status.borrow_and_update();
            match self.reader.read(&status, self.stream, self.offset, FOLLOW_CHUNK).await {
                Ok(chunk) => {
                    self.offset = chunk.next_offset;
                    if !chunk.bytes.is_empty() {
                        return Some(Ok(chunk));
                    }
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            }
            if status.closed {
                self.done = true;
            } else if self.status.changed().await.is_err() {
                self.done = true;
                return Some(Err(LogStoreError::StoreDropped { job: self.job.clone() }));
            }
        }
        None
    }

    /// The offset the next chunk starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// Where a stream was cut, and how far its dropped output reached when this was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    at: u64,
    end: u64,
}

/// The contents of a job's `state` file: a header line, `closed <0|1>`, and a line
/// `<stream> <cut> <end>` for each truncated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct StateRecord {
    closed: bool,
    stdout: Option<Cut>,
    stderr: Option<Cut>,
}

impl StateRecord {
    fn cut(&self, stream: LogStream) -> Option<Cut> {
        match stream {
            LogStream::Stdout => self.stdout,
            LogStream::Stderr => self.stderr,
        }
    }

    fn with_cut(mut self, stream: LogStream, cut: Option<Cut>) -> Self {
        match stream {
            LogStream::Stdout => self.stdout = cut,
            LogStream::Stderr => self.stderr = cut,
        }
        self
    }

    fn encode(&self) -> String {
        let mut text = format!("{STATE_HEADER}\nclosed {}\n", u8::from(self.closed));
        for stream in LogStream::ALL {
            if let Some(cut) = self.cut(stream) {
                let _ = writeln!(text, "{stream} {} {}", cut.at, cut.end);
            }
        }
        text
    }

    fn decode(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(STATE_HEADER) {
            return Err(format!("the first line is not `{STATE_HEADER}`"));
        }
        let mut record = Self::default();
        for line in lines {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let number = |s: &str| s.parse::<u64>().map_err(|e| format!("bad number in `{line}`: {e}"));
            match fields.as_slice() {
                ["closed", "0"] => record.closed = false,
                ["closed", "1"] => record.closed = true,
                [name, at, end] => {
                    let stream =
                        LogStream::parse(name).ok_or_else(|| format!("unknown stream in `{line}`"))?;
                    record = record.with_cut(stream, Some(Cut { at: number(at)?, end: number(end)? }));
                }
                [] => {}
                _ => return Err(format!("unknown line `{line}`")),
            }
        }
        Ok(record)
    }
}

async fn read_state(dir: &Path) -> Result<StateRecord, LogStoreError> {
    let path = dir.join(STATE_FILE);
    match fs::read(&path).await {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| LogStoreError::CorruptState {
                path: path.clone(),
                reason: "it is not UTF-8".into(),
            })?;
            StateRecord::decode(&text).map_err(|reason| LogStoreError::CorruptState { path, reason })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateRecord::default()),
        Err(e) => Err(io_error("reading", &path)(e)),
    }
}

/// Replaces the state file so that a crash leaves either the old one or the new one.
async fn write_state(dir: &Path, record: &StateRecord) -> Result<(), LogStoreError> {
    replace_file(dir, STATE_FILE, record.encode().as_bytes()).await
}

/// Replaces `dir/name` by write, fsync and rename, so that a crash leaves the old or the new.
async fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> Result<(), LogStoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    async {
        let mut file = File::create(&tmp).await?;
        file.write_all(contents).await?;
        file.flush().await?;
        file.sync_all().await
    }
    .await
    .map_err(io_error("writing", &tmp))?;
    fs::rename(&tmp, &path).await.map_err(io_error("replacing", &path))?;
    sync_dir(dir).await
}

/// Makes the entries of a directory (files created, renamed into it) durable.
async fn sync_dir(dir: &Path) -> Result<(), LogStoreError> {
    File::open(dir)
        .await
        .map_err(io_error("opening", dir))?
        .sync_all()
        .await
        .map_err(io_error("syncing", dir))
}

async fn lock_dir(logs_dir: PathBuf) -> Result<std::fs::File, LogStoreError> {
    let path = logs_dir.join(LOCK_FILE);
    let join_path = path.clone();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(LogStoreError::Locked { path: logs_dir }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_error("locking", &path)(e)),
        }
    })
    .await
    .map_err(|e| io_error("locking", &join_path)(io::Error::other(e)))?
}

/// Runs blocking file work off the reactor threads. The `std` file API takes the bytes where
/// they are (positional reads and writes, no seek); tokio's file would copy every write into a
/// buffer of its own first.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

async fn read_at(file: &Arc<std::fs::File>, at: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let file = Arc::clone(file);
    blocking(move || {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, at)?;
        Ok(buf)
    })
    .await
}

async fn is_zeros(file: &Arc<std::fs::File>, from: u64, to: u64) -> io::Result<bool> {
    let mut at = from;
    while at < to {
        let piece = (to - at).min(FOLLOW_CHUNK as u64);
        if read_at(file, at, piece).await?.iter().any(|b| *b != 0) {
            return Ok(false);
        }
        at += piece;
    }
    Ok(true)
}

fn is_plain(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_'
}

fn encode_job_id(id: &str) -> Result<String, LogStoreError> {
    let invalid = |reason| LogStoreError::InvalidJobId { id: id.to_owned(), reason };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    let mut name = String::with_capacity(id.len());
    for byte in id.bytes() {
        if is_plain(byte) {
            name.push(char::from(byte));
        } else {
            let _ = write!(name, "%{byte:02X}");
        }
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("escaped for the file system it is longer than 255 bytes"));
    }
    Ok(name)
}

/// The job id a directory name stands for, if it is exactly what [`encode_job_id`] makes.
fn decode_job_name(name: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = tail.get(2..)?;
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    let id = String::from_utf8(bytes).ok()?;
    // Only the canonical spelling names a job, so that one id has one directory.
    (encode_job_id(&id).ok()? == name).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_escape_to_safe_names_and_back() {
        for id in ["saga-id/3", "../../etc/passwd", ".", "..", "Job A", "ünï/çødé", "a%2Fb", "x\0y"] {
            let name = encode_job_id(id).expect("encodable");
            assert!(name.bytes().all(|b| is_plain(b) || b == b'%' || b.is_ascii_hexdigit()), "{name}");
            assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
            assert_eq!(decode_job_name(&name).as_deref(), Some(id));
        }
        assert_eq!(encode_job_id("saga-id/3").expect("encodable"), "saga-id%2F3");
    }

    #[test]
    fn only_canonical_names_decode() {
        for name in ["saga-id%2f3", "%61", "%+F", "%4", "%", "A", ".lock", "%FF"] {
            assert_eq!(decode_job_name(name), None, "{name}");
        }
    }

    #[test]
    fn empty_and_overlong_ids_are_refused() {
        assert!(matches!(encode_job_id(""), Err(LogStoreError::InvalidJobId { .. })));
        assert!(encode_job_id(&"a".repeat(255)).is_ok());
        assert!(matches!(encode_job_id(&"/".repeat(86)), Err(LogStoreError::InvalidJobId { .. })));
    }

    #[test]
    fn state_records_round_trip() {
        let records = [
            StateRecord::default(),
            StateRecord { closed: true, stdout: Some(Cut { at: 10, end: 25 }), stderr: None },
            StateRecord {
                closed: false,
                stdout: None,
                stderr: Some(Cut { at: u64::MAX - 1, end: u64::MAX }),
            },
        ];
        for record in records {
            assert_eq!(StateRecord::decode(&record.encode()), Ok(record));
        }
    }

    #[test]
    fn corrupt_state_records_are_refused() {
        for text in
            ["", "closed 1\n", "hodei-logstore-state 1\nclosed 2\n", "hodei-logstore-state 1\nstdout 1\n"]
        {
            assert!(StateRecord::decode(text).is_err(), "{text:?}");
        }
        assert!(StateRecord::decode("hodei-logstore-state 1\nstderr x 2\n").is_err());
    }

    #[test]
    fn the_marker_says_where_and_how_much() {
        let cut = Truncation { stream: LogStream::Stdout, at: 100, dropped: 7, final_count: true };
        assert_eq!(cut.marker(), "\n[hodei: stdout truncated at 100 bytes; 7 further bytes dropped]\n");
        let running = Truncation { final_count: false, ..cut };
        assert!(running.marker().ends_with("7 further bytes dropped so far]\n"));
    }

    #[test]
    fn batch_slices_clamp_to_the_batch() {
        let bytes = Bytes::from_static(b"abcd");
        let batch = Batch { job: "j", stream: LogStream::Stdout, offset: 10, end: 14, bytes: &bytes };
        assert_eq!(batch.slice(12, 20), b"cd");
        assert_eq!(batch.range(12, 20), &b"cd"[..]);
        assert!(batch.range(14, 20).is_empty());
        assert_eq!(batch.slice(0, 11), b"a");
        assert_eq!(batch.slice(14, 14), b"");
    }
}
