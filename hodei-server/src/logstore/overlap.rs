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
        s.matched(upto);
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
    s.matched(at);
    s.cut_at(at);
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
    /// tail and cut them: acknowledged output rewritten. A sync no longer acknowledges a tail
    /// found on disk; once a resend has matched it, it is as fixed as any other output.
    #[tokio::test]
    async fn zeros_a_resend_confirmed_are_no_torn_tail() {
        let data = tempfile::tempdir().unwrap();
        let job = data.path().join("logs").join("job-a");
        std::fs::create_dir_all(&job).unwrap();
        std::fs::write(job.join("stdout.log"), [0u8; 64]).unwrap();
        let store = LogStore::open(data.path()).await.unwrap();
        let loaded = store.sync("job-a").await.unwrap().stdout;
        assert_eq!((loaded.end, loaded.confirmed), (64, 0), "a sync acknowledged a tail no agent confirmed");

        assert_eq!(store.append("job-a", LogStream::Stdout, 0, &[0u8; 64]).await.unwrap().offset, 64);
        let resend = store.append("job-a", LogStream::Stdout, 40, b"not zeros").await;
        assert!(matches!(resend, Err(LogStoreError::Mismatch { offset: 40, .. })), "{resend:?}");
        let stored = store.read("job-a", LogStream::Stdout, 0, 1024).await.unwrap();
        assert_eq!(stored.bytes, [0u8; 64]);
    }

    /// What the restart test caught on CI: the agent resends a recovered tail in several
    /// batches, and the hub syncs between them. That sync must not acknowledge the zeros the
    /// next batch has yet to reach, or the resend over them is refused as a mismatch and the
    /// zeros stay in the log for good.
    #[tokio::test]
    async fn a_sync_between_resent_batches_leaves_the_torn_tail_to_the_resend() {
        let data = tempfile::tempdir().unwrap();
        let job = data.path().join("logs").join("job-a");
        std::fs::create_dir_all(&job).unwrap();
        let output: Vec<u8> = (0..300u32).flat_map(|n| format!("line {n}\n").into_bytes()).collect();
        // Acknowledged up to 1,000; written up to 1,500 when the control plane was killed; then
        // a torn tail of zeros.
        std::fs::write(job.join("stdout.log"), [&output[..1500], &[0u8; 4096][..]].concat()).unwrap();
        let store = LogStore::open(data.path()).await.unwrap();

        let first = store.write("job-a", LogStream::Stdout, 1000, output[1000..1200].to_vec().into()).await;
        first.unwrap();
        let synced = store.sync("job-a").await.unwrap().stdout;
        assert_eq!(synced.confirmed, 1200, "only what the resend matched is confirmed");
        store.write("job-a", LogStream::Stdout, 1200, output[1200..].to_vec().into()).await.unwrap();
        let synced = store.sync("job-a").await.unwrap().stdout;
        assert_eq!((synced.end, synced.confirmed), (output.len() as u64, output.len() as u64));
        let stored = store.read("job-a", LogStream::Stdout, 0, 1 << 20).await.unwrap();
        assert_eq!(stored.bytes, output, "the zeros were replaced by the resend");
    }
}
