//! A resend over stored bytes: compared, and a torn tail of zeros it contradicts cut.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::batch::Batch;
use super::disk::{blocking, read_at};
use super::error::{LogStoreError, io_error};
use super::follower::FOLLOW_CHUNK;
use super::stream_state::StreamState;

/// Compares a batch with the stored bytes it overlaps, and cuts a torn tail of zeros that it
/// contradicts.
pub(super) async fn check_overlap(
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

#[cfg(test)]
mod tests {
    use crate::logstore::{LogStore, LogStoreError, LogStream};

    /// Found by the `logstore_recovery` fuzz target: a store opened on a stream whose file ends
    /// in zeros acknowledged them through a sync, and a resend from below took them for a torn
    /// tail and cut them: acknowledged output rewritten.
    #[tokio::test]
    async fn zeros_a_sync_acknowledged_are_no_torn_tail() {
        let data = tempfile::tempdir().unwrap();
        let job = data.path().join("logs").join("job-a");
        std::fs::create_dir_all(&job).unwrap();
        std::fs::write(job.join("stdout.log"), [0u8; 64]).unwrap();
        let store = LogStore::open(data.path()).await.unwrap();
        assert_eq!(store.sync("job-a").await.unwrap().stdout.end, 64);

        let resend = store.append("job-a", LogStream::Stdout, 40, b"not zeros").await;
        assert!(matches!(resend, Err(LogStoreError::Mismatch { offset: 40, .. })), "{resend:?}");
        let stored = store.read("job-a", LogStream::Stdout, 0, 1024).await.unwrap();
        assert_eq!(stored.bytes, [0u8; 64]);
    }
}
