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
//! A job's directory and a new log file are created without syncing the directories that hold
//! them: their entries are synced by the first sync that an acknowledgement or a recorded end
//! rests on, at the same time as the data, so that neither the dispatch nor the first write
//! waits for an fsync of its own. Closing stages the result and state records (each written to
//! a `.tmp` file and synced) while the log's last sync runs, renames both into place, then
//! syncs the job's directory once: a short job's end costs two fsync latencies, not five.
//!
//! A write or sync that fails is not acknowledged: the stream is cut back to what was synced
//! before (the kernel may have dropped the pages a failed fsync could not write). A full disk
//! is such a failure ([`LogStoreError::is_no_space`]): nothing of the batch or result that did
//! not fit stays, and the same store takes the agent's resend once there is room.
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
//! The state and result files are replaced by write, fsync, rename and a sync of their
//! directory, so each is either the old or the new one; a leftover `.tmp` is ignored.
//!
//! A tail found on disk at start is not acknowledged, nor announced to an agent as where to
//! resume, until the agent's resend has matched it or cut its zeros: were a sync to
//! acknowledge it first, the resend over a torn tail would meet bytes already acknowledged and
//! be refused, and the zeros would stay.
//!
//! There is no combined stdout/stderr view: the two streams' offsets are independent and the
//! agent sends no ordering between them.

mod batch;
mod config;
mod dir_lock;
mod disk;
mod error;
mod follower;
mod group_commit;
mod holder;
mod job;
mod job_id;
mod lifecycle;
mod listing;
mod overlap;
mod reader;
#[cfg(feature = "postgres")]
mod shared;
mod state_record;
mod status;
mod store;
mod stream;
mod stream_state;
mod truncation;
mod writer;

/// The shared byte buffers [`LogStore::write`] takes (the `bytes` crate's, as prost decodes
/// log batches into), re-exported so that callers need no dependency of their own for it.
pub use prost::bytes::Bytes;

pub use config::{DEFAULT_MAX_STREAM_BYTES, LogStoreConfig};
pub use error::LogStoreError;
pub use follower::LogFollower;
pub use holder::JobHolder;
pub use reader::LogChunk;
pub use status::{Ack, LogStatus, StreamStatus};
pub use store::LogStore;
pub use stream::LogStream;
pub use truncation::Truncation;
