//! The file operations the store builds on: blocking work off the reactor, positional reads,
//! durable replacement of small files and of directory entries.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use std::io::Write as _;

use tokio::fs::{self, File};

use super::error::{LogStoreError, io_error};

/// Replaces `dir/name` by write, fsync and rename, so that a crash leaves the old or the new.
pub(super) async fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> Result<(), LogStoreError> {
    stage_files(dir, &[(name, contents)]).await?;
    commit_files(dir, &[name]).await
}

/// The first half of replacing files: each `dir/name.tmp` written and synced, all at once, so
/// that their fsyncs (and whatever else the caller syncs meanwhile) share journal commits
/// instead of waiting for one another.
pub(super) async fn stage_files(dir: &Path, files: &[(&str, &[u8])]) -> Result<(), LogStoreError> {
    let staging: Vec<_> = files
        .iter()
        .map(|(name, contents)| {
            let tmp = dir.join(format!("{name}.tmp"));
            let (path, contents) = (tmp.clone(), contents.to_vec());
            let task = tokio::task::spawn_blocking(move || {
                let mut file = std::fs::File::create(&path)?;
                file.write_all(&contents)?;
                file.sync_all()
            });
            (tmp, task)
        })
        .collect();
    for (tmp, task) in staging {
        task.await.unwrap_or_else(|e| Err(io::Error::other(e))).map_err(io_error("writing", &tmp))?;
    }
    Ok(())
}

/// The second half: the staged files renamed into place, then one sync of the directory.
pub(super) async fn commit_files(dir: &Path, names: &[&str]) -> Result<(), LogStoreError> {
    for name in names {
        let path = dir.join(name);
        fs::rename(dir.join(format!("{name}.tmp")), &path).await.map_err(io_error("replacing", &path))?;
    }
    sync_dir(dir).await
}

/// Makes the entries of a directory (files created, renamed into it) durable.
pub(super) async fn sync_dir(dir: &Path) -> Result<(), LogStoreError> {
    File::open(dir)
        .await
        .map_err(io_error("opening", dir))?
        .sync_all()
        .await
        .map_err(io_error("syncing", dir))
}

/// Runs blocking file work off the reactor threads. The `std` file API takes the bytes where
/// they are (positional reads and writes, no seek); tokio's file would copy every write into a
/// buffer of its own first.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

pub(super) async fn read_at(file: &Arc<std::fs::File>, at: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let file = Arc::clone(file);
    blocking(move || {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, at)?;
        Ok(buf)
    })
    .await
}
