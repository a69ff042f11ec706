//! A job's log in memory: its lock, what it publishes to followers, its streams' writers.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::fs;
use tokio::sync::{Mutex, MutexGuard, watch};

use super::disk::{blocking, sync_dir};
use super::error::{LogStoreError, io_error};
use super::state_record::{Cut, StateRecord, read_state};
use super::status::{LogStatus, StreamStatus};
use super::stream::LogStream;
use super::stream_state::StreamState;

/// A job's log in memory.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) dir: PathBuf,
    /// Held across the file operations of one append, so a job's appends run one at a time.
    pub(super) state: Mutex<JobState>,
    /// What readers may see: published after every change, and what followers wake on.
    pub(super) status: watch::Sender<LogStatus>,
}

impl Job {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self { dir, state: Mutex::new(JobState::default()), status: watch::Sender::new(LogStatus::default()) }
    }

    pub(super) async fn lock(&self) -> Result<MutexGuard<'_, JobState>, LogStoreError> {
        let mut state = self.state.lock().await;
        if !state.loaded {
            *state = JobState::load(&self.dir).await?;
            self.publish(&state);
        }
        Ok(state)
    }

    pub(super) fn publish(&self, state: &JobState) {
        let new = state.status();
        self.status.send_if_modified(|current| {
            let changed = *current != new;
            *current = new;
            changed
        });
    }
}

#[derive(Debug, Default)]
pub(super) struct JobState {
    loaded: bool,
    pub(super) closed: bool,
    dir_exists: bool,
    /// Directory entries this run made and has not synced yet. They are synced with the first
    /// fsync that anything is acknowledged over, at the same time, rather than on the dispatch
    /// path or before each first write.
    unsynced: UnsyncedEntries,
    /// Bumped whenever an entry is made, so that a sync that ran outside the job's lock clears
    /// only what it covered. Until one has, every sync syncs them: an acknowledgement must not
    /// rest on another caller's directory sync that is still under way.
    unsynced_generation: u64,
    stdout: StreamState,
    stderr: StreamState,
}

impl JobState {
    pub(super) async fn load(dir: &Path) -> Result<Self, LogStoreError> {
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
            // Trusted as in the logstore module documentation: each writer syncs the file it opens
            // before anything is acknowledged over it.
            s.stored = stored;
            s.synced = stored;
            s.end = stored;
            s.unconfirmed_to = stored;
            if let Some(cut) = record.cut(stream) {
                if cut.at != stored {
                    tracing::warn!(path = %path.display(), cut = cut.at, stored, "a truncated log's length moved");
                }
                s.truncated = true;
                s.end = cut.end.max(stored);
                // The cut was recorded after what is below it was synced and kept.
                s.acked = stored;
            }
        }
        Ok(state)
    }

    pub(super) fn stream_mut(&mut self, stream: LogStream) -> &mut StreamState {
        match stream {
            LogStream::Stdout => &mut self.stdout,
            LogStream::Stderr => &mut self.stderr,
        }
    }

    /// What readers see: only synced bytes.
    pub(super) fn status(&self) -> LogStatus {
        let view = |s: &StreamState| StreamStatus {
            end: s.ack().offset,
            stored: s.synced,
            truncated: s.truncated,
            confirmed: s.confirmed().offset,
        };
        LogStatus { stdout: view(&self.stdout), stderr: view(&self.stderr), closed: self.closed }
    }

    /// [`JobState::status`], given to a caller who may acknowledge it (see
    /// [`StreamState::acknowledge`]).
    pub(super) fn acknowledge(&mut self) -> LogStatus {
        for stream in LogStream::ALL {
            self.stream_mut(stream).acknowledge();
        }
        self.status()
    }

    pub(super) fn record(&self) -> StateRecord {
        let cut = |s: &StreamState| s.truncated.then_some(Cut { at: s.stored, end: s.end });
        StateRecord { closed: self.closed, stdout: cut(&self.stdout), stderr: cut(&self.stderr) }
    }

    pub(super) async fn ensure_dir(&mut self, dir: &Path) -> Result<(), LogStoreError> {
        if !self.dir_exists {
            fs::create_dir_all(dir).await.map_err(io_error("creating", dir))?;
            self.dir_exists = true;
            self.unsynced.logs_dir = true;
            self.unsynced_generation += 1;
        }
        Ok(())
    }

    /// The unsynced entries, for a sync that makes them durable outside the job's lock and
    /// then reports with [`JobState::entries_synced`].
    pub(super) fn unsynced_entries(&self) -> (UnsyncedEntries, u64) {
        (self.unsynced, self.unsynced_generation)
    }

    /// The entries as they were at `generation` are durable.
    pub(super) fn entries_synced(&mut self, generation: u64) {
        if self.unsynced_generation == generation {
            self.unsynced = UnsyncedEntries::default();
        }
    }

    /// Makes the unsynced entries durable, holding the job's lock.
    pub(super) async fn sync_entries(&mut self, dir: &Path, logs_dir: &Path) -> Result<(), LogStoreError> {
        let (entries, generation) = self.unsynced_entries();
        entries.sync(dir, logs_dir).await?;
        self.entries_synced(generation);
        Ok(())
    }

    /// Takes the stream's writer out, opening it (and reconciling with the file) if needed.
    ///
    /// Out, so that an append that fails or is cancelled midway leaves no writer behind and
    /// the next one starts from the file's real length.
    pub(super) async fn open_writer(
        &mut self,
        dir: &Path,
        stream: LogStream,
    ) -> Result<Arc<std::fs::File>, LogStoreError> {
        if let Some(file) = self.stream_mut(stream).file.take() {
            return Ok(file);
        }
        self.ensure_dir(dir).await?;
        let path = dir.join(stream.file_name());
        let open_path = path.clone();
        // What is in the file may only be in the page cache (the last run died between a
        // write and its sync); it must be on disk before an ack covers it. Its entry, which
        // may be new, is synced with the first fsync of what is written to it.
        let (file, len) = blocking(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&open_path)?;
            let len = file.metadata()?.len();
            if len > 0 {
                file.sync_data()?;
            }
            Ok((Arc::new(file), len))
        })
        .await
        .map_err(io_error("opening", &path))?;
        self.unsynced.job_dir = true;
        self.unsynced_generation += 1;
        let s = self.stream_mut(stream);
        if len != s.stored {
            tracing::debug!(path = %path.display(), len, stored = s.stored, "log file length reconciled");
            // Bytes that appeared behind the store's back (a failed write it could not cut
            // back) are a tail like one found at start.
            s.unconfirmed_to = if len > s.stored && !s.truncated { len } else { s.unconfirmed_to.min(len) };
            s.stored = len;
            s.end = if s.truncated { s.end.max(len) } else { len };
            s.acked = s.acked.min(len);
        }
        s.synced = len;
        s.generation += 1;
        Ok(file)
    }
}

/// Which directories hold entries this run made and has not synced.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UnsyncedEntries {
    /// The job's directory: a log file created in it.
    job_dir: bool,
    /// The logs directory: the job's directory created in it.
    logs_dir: bool,
}

impl UnsyncedEntries {
    pub(super) const ALL: Self = Self { job_dir: true, logs_dir: true };

    /// Syncs both directories at once.
    pub(super) async fn sync(self, dir: &Path, logs_dir: &Path) -> Result<(), LogStoreError> {
        let job_dir = async { if self.job_dir { sync_dir(dir).await } else { Ok(()) } };
        let logs = async { if self.logs_dir { sync_dir(logs_dir).await } else { Ok(()) } };
        tokio::try_join!(job_dir, logs).map(drop)
    }
}
