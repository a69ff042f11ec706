//! Whether the sled store takes writes: a full filesystem, and a sled that failed a write.
//!
//! What sled 0.34 does on a full filesystem (`tests/full_disk.rs` found it, on a small tmpfs):
//! - A write whose log buffer fails to reach the file (ENOSPC) sets an error inside sled that
//!   every later write and flush returns, for as long as that sled lives: freeing space does not
//!   help, only opening the directory again. Nothing acknowledged is lost, and the directory
//!   opens again with every acknowledged write.
//! - A write that sled puts in a blob file of its own (a node of the tree over a quarter of a
//!   segment, 128 KiB: one large payload, or a leaf holding several smaller ones) and that fails
//!   with ENOSPC returns the error, but leaves the log buffer it had claimed unfinished: every
//!   later flush waits for it forever, and so does dropping the last handle, since sled flushes
//!   then. Without this module, the flusher thread hung and with it every write of the engine,
//!   and its shutdown.
//!
//! So the store keeps sled away from a full filesystem. Every write first looks at the space
//! free on it (statvfs), and is refused while that is under the reserve
//! ([`SledOptions::free_space_reserve`](super::SledOptions::free_space_reserve)) with
//! [`SledError::NoSpace`] and nothing written; the writes already in sled still get their flush,
//! which is what the reserve is for. Once there is room again the store takes writes again, with
//! no restart: the next write that finds room says so, and so does a probe thread that looks at
//! the free space while writes are refused (the filesystem gives no event when space is freed),
//! so that the engine resumes the sagas the refusal stopped ([`EventStore::writable`]).
//!
//! Should sled fail a write anyway (another process took the reserve between the look and
//! sled's write, or the device failed), the store is **failed**: it refuses every write with
//! [`SledError::Failed`], answers every writer waiting for a flush with the failure, and calls
//! no flush again, since one may never return. What was acknowledged is on disk; what was not
//! is not acknowledged, and may or may not be found by the next open, which is what takes
//! writes again.
//!
//! [`EventStore::writable`]: crate::store::EventStore::writable

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::StorageError;

/// The shortest and the longest pause of the probe that looks for free space again.
const PROBE_PAUSES: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Why the sled store refused a write: the source of the [`Error::Storage`] it returns
/// (`std::error::Error::source`, then `downcast_ref::<SledError>()`).
///
/// [`Error::Storage`]: crate::Error::Storage
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SledError {
    /// The filesystem of the data directory has less space free than the store keeps in
    /// reserve. Nothing was written; the store takes writes again once there is room, without
    /// a restart.
    #[error(
        "the filesystem of {} has {available} bytes free, under the reserve of {reserve} bytes: nothing was written",
        path.display()
    )]
    NoSpace {
        /// The data directory.
        path: PathBuf,
        /// The bytes free for this process, when the write was refused.
        available: u64,
        /// [`SledOptions::free_space_reserve`](super::SledOptions::free_space_reserve).
        reserve: u64,
    },
    /// sled failed an earlier write or flush. Nothing was written: the store takes no more
    /// writes until its directory is opened again (a restart of the process), which reads
    /// everything that was acknowledged.
    #[error(
        "sled failed an earlier write ({cause}); the store takes no more writes until its directory is opened again"
    )]
    Failed {
        /// The first failure.
        #[source]
        cause: StorageError,
    },
}

/// What decides whether the store takes a write; shared by the store and its flusher thread.
#[derive(Debug)]
pub(super) struct Health {
    dir: PathBuf,
    reserve: u64,
    /// `false` while writes are refused. Never `true` again once `failed` is set.
    writable: watch::Sender<bool>,
    /// The first write or flush sled failed.
    failed: OnceLock<StorageError>,
    /// Set when sled failed a write, not a flush: it may have left a log buffer unfinished,
    /// which no flush gets past.
    write_failed: AtomicBool,
    /// Set while a probe thread looks for free space.
    probing: AtomicBool,
}

impl Health {
    pub(super) fn new(dir: &Path, reserve: u64) -> Arc<Self> {
        Arc::new(Self {
            dir: dir.to_path_buf(),
            reserve,
            writable: watch::Sender::new(true),
            failed: OnceLock::new(),
            write_failed: AtomicBool::new(false),
            probing: AtomicBool::new(false),
        })
    }

    /// Whether the store takes writes, now and from now on.
    pub(super) fn writable(&self) -> watch::Receiver<bool> {
        self.writable.subscribe()
    }

    /// The failure that ended the store's writes, if sled failed one.
    pub(super) fn failure(&self) -> Option<SledError> {
        self.failed.get().map(|cause| SledError::Failed { cause: cause.clone() })
    }

    /// Refuses a write once sled failed one, and while the filesystem has less than the
    /// reserve free.
    pub(super) fn room(self: &Arc<Self>) -> Result<(), SledError> {
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        match self.available() {
            Some(available) if available < self.reserve => {
                self.refusing();
                Err(SledError::NoSpace { path: self.dir.clone(), available, reserve: self.reserve })
            }
            _ => {
                if !*self.writable.borrow() {
                    self.takes_writes();
                }
                Ok(())
            }
        }
    }

    /// Ends the store's writes: sled failed one.
    pub(super) fn fail_write(&self, cause: StorageError) {
        self.write_failed.store(true, Ordering::Release);
        self.fail(cause);
    }

    /// Whether sled failed a write (see `write_failed`).
    pub(super) fn write_failed(&self) -> bool {
        self.write_failed.load(Ordering::Acquire)
    }

    /// Ends the store's writes: a flush failed (sled's, or the record of its number).
    pub(super) fn fail(&self, cause: StorageError) {
        if self.failed.set(cause.clone()).is_ok() {
            tracing::error!(
                path = %self.dir.display(), error = %cause,
                "sled failed a write: the store takes no more writes until its directory is opened again"
            );
        }
        self.writable.send_replace(false);
    }

    /// The space free for this process, or `None` if the filesystem does not say: the write
    /// goes ahead then, and sled's own error stops the store should the filesystem be full.
    fn available(&self) -> Option<u64> {
        if self.reserve == 0 {
            return None;
        }
        match fs2::available_space(&self.dir) {
            Ok(available) => Some(available),
            Err(error) => {
                tracing::warn!(path = %self.dir.display(), %error, "cannot tell the free space of the data directory");
                None
            }
        }
    }

    fn takes_writes(&self) {
        // Under the watch's lock, so that a failure set meanwhile is seen: its `false` is sent
        // after it is set, and a `true` sent before it is overwritten.
        self.writable.send_if_modified(|writable| {
            if *writable || self.failed.get().is_some() {
                return false;
            }
            tracing::info!(path = %self.dir.display(), "the data directory has room again; the store takes writes");
            *writable = true;
            true
        });
    }

    fn refusing(self: &Arc<Self>) {
        if self.writable.send_replace(false) {
            tracing::warn!(
                path = %self.dir.display(), reserve = self.reserve,
                "the data directory's filesystem is under the store's free space reserve: writes are refused until there is room"
            );
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let health = Arc::downgrade(self);
        let spawned =
            std::thread::Builder::new().name("hodei-space-probe".into()).spawn(move || probe(&health));
        if let Err(error) = spawned {
            // The next write that finds room says so instead.
            tracing::warn!(%error, "could not start the free space probe");
            self.probing.store(false, Ordering::Release);
        }
    }
}

/// Looks at the free space, more and more rarely, until there is room (or the store is gone,
/// or failed).
fn probe(health: &Weak<Health>) {
    let mut pause = PROBE_PAUSES.0;
    loop {
        std::thread::sleep(pause);
        pause = (pause * 2).min(PROBE_PAUSES.1);
        let Some(health) = health.upgrade() else { return };
        if health.failed.get().is_some() {
            health.probing.store(false, Ordering::Release);
            return;
        }
        if health.available().is_none_or(|available| available >= health.reserve) {
            health.probing.store(false, Ordering::Release);
            health.takes_writes();
            return;
        }
    }
}
