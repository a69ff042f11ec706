//! The job log store on a full disk: its directory on a small tmpfs, filled by a job's output.
//!
//! The write that does not fit fails with a typed error and leaves nothing of itself (no torn
//! tail: the file is cut back to the acknowledged offset); what was acknowledged reads back, in
//! this store and in one reopened on the same directory, full or not; a result that does not
//! fit is not stored, nor half of it; and once space is freed the same store takes the agent's
//! resend from its acknowledged offset, then the result.
//!
//! Mounting takes root: without it the tests print that they were skipped, unless
//! `HODEI_REQUIRE_MOUNT=1` (set by `.ci/run`).
//! `cargo test -p hodei-server --test logstore_full_disk`.
#![cfg(target_os = "linux")]

#[path = "../../hodei-core/tests/support/tmpfs.rs"]
mod tmpfs;

#[path = "support/log_data.rs"]
mod log_data;

use std::path::Path;

use hodei_server::logstore::{LogStore, LogStoreError, LogStream};
use log_data::read_all;
use tmpfs::Tmpfs;

const OUT: LogStream = LogStream::Stdout;
const JOB: &str = "saga-1/build";
/// The filesystem: a few dozen batches fill it.
const FILESYSTEM: u64 = 2 << 20;
/// Taken by a file before the job writes, and freed by the test.
const FILLER: usize = 512 << 10;
const BATCH: usize = 48 * 1024;

/// Batch `n` of the job's output: numbered lines, so that a byte out of place shows.
fn batch(n: usize) -> Vec<u8> {
    let line = format!("batch {n:06} of the job's output, padded to a line of sixty-four bytes\n");
    line.as_bytes()[..64].iter().copied().cycle().take(BATCH).collect()
}

fn assert_no_space(error: &LogStoreError) {
    assert!(error.is_no_space(), "expected the store to be out of space, got {error:?}");
}

/// What the agent has: the output it sent, and the offset the store acknowledged.
#[derive(Default)]
struct Agent {
    sent: Vec<u8>,
    acked: u64,
    batches: usize,
}

impl Agent {
    /// Appends the next batch from the acknowledged offset.
    async fn send(&mut self, store: &LogStore) -> Result<(), LogStoreError> {
        let bytes = batch(self.batches);
        let ack = store.append(JOB, OUT, self.acked, &bytes).await?;
        assert_eq!(ack.offset, self.acked + bytes.len() as u64);
        self.acked = ack.offset;
        self.sent.extend_from_slice(&bytes);
        self.batches += 1;
        Ok(())
    }

    /// Sends batches until the store refuses one, then takes the rest of the filesystem too
    /// (`rest`; the space to free later is in `filler`).
    async fn fill(&mut self, store: &LogStore, disk: &Tmpfs) {
        disk.fill("filler", FILLER);
        let refused = loop {
            if let Err(refused) = self.send(store).await {
                break refused;
            }
        };
        assert_no_space(&refused);
        assert!(self.batches > 4, "only {} batches fit", self.batches);
        disk.fill_up("rest");
    }
}

/// Only the acknowledged bytes, in the store's view and in the file: nothing of a failed
/// write is left behind.
async fn assert_acknowledged_only(store: &LogStore, data: &Path, agent: &Agent) {
    let status = store.status(JOB).await.unwrap();
    assert_eq!(status.stdout.end, agent.acked);
    assert!(!status.closed);
    assert_eq!(read_all(store, JOB, OUT, 1 << 20).await, agent.sent);
    let file = data.join("logs").join("saga-1%2Fbuild").join("stdout.log");
    assert_eq!(std::fs::metadata(file).unwrap().len(), agent.acked);
    assert_eq!(store.result(JOB).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_log_writes_loses_nothing_acknowledged_and_the_same_store_goes_on() {
    let Some(disk) = Tmpfs::mount(FILESYSTEM) else { return };
    let data = disk.path().join("data");
    let store = LogStore::open(&data).await.unwrap();
    let mut agent = Agent::default();
    agent.fill(&store, &disk).await;

    // Full: the agent's resend is refused, as are a batch written for the group commit and the
    // result, and none leaves anything of itself.
    assert_no_space(&agent.send(&store).await.unwrap_err());
    assert_no_space(&store.write(JOB, OUT, agent.acked, batch(agent.batches).into()).await.unwrap_err());
    assert_no_space(&store.finish(JOB, b"exit 0").await.unwrap_err());
    assert_acknowledged_only(&store, &data, &agent).await;

    // Room again: the same store takes the resend, more output, and the result.
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    for _ in 0..4 {
        agent.send(&store).await.unwrap();
    }
    store.finish(JOB, b"exit 0").await.unwrap();
    assert_eq!(read_all(&store, JOB, OUT, 1 << 20).await, agent.sent);
    drop(store);

    let store = LogStore::open(&data).await.unwrap();
    assert_eq!(read_all(&store, JOB, OUT, 1 << 20).await, agent.sent);
    assert_eq!(store.result(JOB).await.unwrap().as_deref(), Some(&b"exit 0"[..]));
    assert!(store.status(JOB).await.unwrap().closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_store_reopened_on_a_full_disk_reads_everything_acknowledged() {
    let Some(disk) = Tmpfs::mount(FILESYSTEM) else { return };
    let data = disk.path().join("data");
    let store = LogStore::open(&data).await.unwrap();
    let mut agent = Agent::default();
    agent.fill(&store, &disk).await;
    drop(store);

    let store = LogStore::open(&data).await.unwrap();
    assert_acknowledged_only(&store, &data, &agent).await;
    assert_no_space(&agent.send(&store).await.unwrap_err());
    assert_acknowledged_only(&store, &data, &agent).await;

    std::fs::remove_file(disk.path().join("filler")).unwrap();
    agent.send(&store).await.unwrap();
    store.finish(JOB, b"exit 0").await.unwrap();
    assert_eq!(read_all(&store, JOB, OUT, 1 << 20).await, agent.sent);
    assert_eq!(store.result(JOB).await.unwrap().as_deref(), Some(&b"exit 0"[..]));
}
