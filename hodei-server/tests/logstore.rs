//! The log store against its contract: exact bytes, overlaps stored once, gaps refused, a
//! visible cap, followers without gaps or duplicates, and recovery from the files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hodei_server::logstore::{Bytes, LogFollower, LogStore, LogStoreConfig, LogStoreError, LogStream};

#[path = "support/log_data.rs"]
mod log_data;

use log_data::{Rng, next_batch, numbered_lines, read_all};

const OUT: LogStream = LogStream::Stdout;
const ERR: LogStream = LogStream::Stderr;

/// A store in a fresh directory; `cap` is the per-stream cap, `None` the defaults.
async fn fresh(cap: Option<u64>) -> (tempfile::TempDir, PathBuf, LogStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let store = open(&data, cap).await;
    (dir, data, store)
}

async fn open(data: &Path, cap: Option<u64>) -> LogStore {
    let store = match cap {
        Some(cap) => {
            LogStore::open_with_config(data, LogStoreConfig::default().with_max_stream_bytes(cap)).await
        }
        None => LogStore::open(data).await,
    };
    store.expect("open")
}

fn stream_file(data: &Path, job_dir: &str, stream: LogStream) -> PathBuf {
    data.join("logs").join(job_dir).join(format!("{stream}.log"))
}

/// Appends `data` from offset 0 in batches of `batch` bytes, checking every ack.
async fn append_all(store: &LogStore, job: &str, stream: LogStream, data: &[u8], batch: usize) {
    for (i, piece) in data.chunks(batch).enumerate() {
        let offset = (i * batch) as u64;
        let ack = store.append(job, stream, offset, piece).await.expect("append");
        assert_eq!(ack.offset, offset + piece.len() as u64);
    }
}

fn assert_numbered(bytes: &[u8], count: usize) {
    let lines: Vec<&[u8]> =
        bytes.strip_suffix(b"\n").expect("ends with a newline").split(|b| *b == b'\n').collect();
    assert_eq!(lines.len(), count);
    for (expected, line) in lines.iter().enumerate() {
        let seq = std::str::from_utf8(&line[..8]).expect("sequence number");
        assert_eq!(seq.parse::<usize>().expect("number"), expected);
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

#[tokio::test]
async fn in_order_appends_round_trip_arbitrary_bytes() {
    let (_dir, _, store) = fresh(None).await;
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    bytes.extend_from_slice(b"\xC3\x28 \xA0\xA1 \xF0\x28\x8C\xBC \xFF\xFE\0\r\n");
    append_all(&store, "saga-1/0", OUT, &bytes, 333).await;
    append_all(&store, "saga-1/0", ERR, b"only on stderr", 5).await;

    assert_eq!(read_all(&store, "saga-1/0", OUT, 1 << 20).await, bytes);
    assert_eq!(read_all(&store, "saga-1/0", OUT, 7).await, bytes);
    assert_eq!(read_all(&store, "saga-1/0", ERR, 100).await, b"only on stderr");
    let status = store.status("saga-1/0").await.expect("status");
    assert_eq!((status.stdout.end, status.stdout.stored, status.stdout.truncated), (5016, 5016, false));
    assert_eq!(status.stderr.end, 14);
    assert!(!status.closed);
    let middle = store.read("saga-1/0", OUT, 4000, 10).await.expect("read");
    assert_eq!((middle.bytes.as_slice(), middle.next_offset), (&bytes[4000..4010], 4010));
}

#[tokio::test]
async fn an_overlapping_resend_is_stored_once() {
    let (_dir, data, store) = fresh(None).await;
    assert_eq!(store.append("j", OUT, 0, b"hello ").await.expect("append").offset, 6);
    assert_eq!(store.append("j", OUT, 3, b"lo world").await.expect("append").offset, 11);
    assert_eq!(store.append("j", OUT, 0, b"hello world").await.expect("append").offset, 11);
    assert_eq!(store.append("j", OUT, 6, b"wor").await.expect("append").offset, 11);
    assert_eq!(store.append("j", OUT, 0, b"hello world!!").await.expect("append").offset, 13);
    assert_eq!(read_all(&store, "j", OUT, 64).await, b"hello world!!");
    assert_eq!(std::fs::read(stream_file(&data, "j", OUT)).expect("file"), b"hello world!!");
}

#[tokio::test]
async fn a_gap_is_refused_with_the_expected_offset() {
    let (_dir, _, store) = fresh(None).await;
    store.append("j", OUT, 0, b"12345").await.expect("append");
    for (offset, bytes) in [(7, &b"89"[..]), (6, b""), (u64::MAX - 1, b"x")] {
        let result = store.append("j", OUT, offset, bytes).await;
        let gap = matches!(result, Err(LogStoreError::Gap { offset: at, expected: 5, stream: OUT, .. }) if at == offset);
        assert!(gap, "{result:?}");
    }
    assert!(matches!(
        store.append("j", OUT, u64::MAX, b"xy").await,
        Err(LogStoreError::OffsetOverflow { len: 2, .. })
    ));
    assert_eq!(store.status("j").await.expect("status").stdout.end, 5);
    assert_eq!(store.append("j", OUT, 5, b"67").await.expect("append").offset, 7);
    assert_eq!(read_all(&store, "j", OUT, 64).await, b"1234567");
}

#[tokio::test]
async fn a_resend_that_differs_from_acknowledged_bytes_is_refused() {
    let (_dir, _, store) = fresh(None).await;
    store.append("j", OUT, 0, b"abcdef").await.expect("append");
    let result = store.append("j", OUT, 1, b"bcXefgh").await;
    assert!(
        matches!(result, Err(LogStoreError::Mismatch { offset: 3, .. })),
        "expected a mismatch: {result:?}"
    );
    assert_eq!(read_all(&store, "j", OUT, 64).await, b"abcdef");
    assert_eq!(store.append("j", OUT, 6, b"g").await.expect("append").offset, 7);
}

#[tokio::test]
async fn random_batches_with_resends_and_restarts_end_up_byte_identical() {
    const LINES: usize = 100_000;
    let seed = 0x5EED_1065;
    let mut rng = Rng(seed);
    let sources = [numbered_lines(LINES, &mut rng), numbered_lines(LINES / 2, &mut rng)];
    let (_dir, data, mut store) = fresh(None).await;
    let mut acked = [0usize; 2];
    // What the store itself has confirmed: after a restart, none of what it finds on disk
    // until a resend reaches it (the agent's acks stay with the agent).
    let mut confirmed = [0usize; 2];
    let mut appends = 0;
    while acked.iter().zip(&sources).any(|(a, s)| *a < s.len()) {
        let which = rng.below(2) as usize;
        let (stream, source) = (LogStream::ALL[which], &sources[which]);
        if acked[which] == source.len() {
            continue;
        }
        appends += 1;
        if appends % 300 == 0 {
            // A restart: the agent's acks are all it has to go on.
            drop(store);
            store = open(&data, None).await;
            confirmed = [0; 2];
        }
        if rng.below(25) == 0 {
            let ahead = acked[which] as u64 + 1 + rng.below(100);
            let result = store.append("big", stream, ahead, b"x").await;
            let gap =
                matches!(result, Err(LogStoreError::Gap { expected, .. }) if expected == acked[which] as u64);
            assert!(gap, "seed {seed}: {result:?}");
            continue;
        }
        let (start, end) = next_batch(&mut rng, acked[which], source.len());
        let ack = store.append("big", stream, start as u64, &source[start..end]).await.expect("append");
        // The resend vouches for what lies below its start, and matches what it overlaps.
        confirmed[which] = confirmed[which].max(start).max(end.min(acked[which]));
        if confirmed[which] >= acked[which] {
            confirmed[which] = end.max(acked[which]);
        }
        assert_eq!(ack.offset, confirmed[which] as u64, "seed {seed}");
        acked[which] = acked[which].max(ack.offset as usize);
    }
    let (stdout, stderr) =
        (read_all(&store, "big", OUT, 1 << 20).await, read_all(&store, "big", ERR, 1 << 16).await);
    assert_numbered(&stdout, LINES);
    assert_numbered(&stderr, LINES / 2);
    assert!(stdout == sources[0] && stderr == sources[1], "seed {seed}: not byte-identical");
}

#[tokio::test]
async fn the_cap_writes_one_visible_marker_and_keeps_acknowledging() {
    let (_dir, data, store) = fresh(Some(1000)).await;
    let source: Vec<u8> = numbered_lines(300, &mut Rng(7));
    let total = source.len() as u64;
    append_all(&store, "j", OUT, &source, 100).await;
    let ack = store.append("j", OUT, 500, &source[500..1500]).await.expect("resend past the cap");
    assert_eq!((ack.offset, ack.truncated), (total, true));
    // Past the cap the agent may skip bytes: the offset alone accounts for them.
    assert_eq!(store.append("j", OUT, total + 50, b"").await.expect("skip").offset, total + 50);
    store.append("j", ERR, 0, b"the error that explains it\n").await.expect("stderr");

    let visible = read_all(&store, "j", OUT, 1 << 20).await;
    let marker =
        format!("\n[hodei: stdout truncated at 1000 bytes; {} further bytes dropped so far]\n", total - 950);
    assert_eq!(visible, [&source[..1000], marker.as_bytes()].concat());
    assert_eq!(count(&read_all(&store, "j", OUT, 64).await, b"[hodei:"), 1);
    assert_eq!(std::fs::metadata(stream_file(&data, "j", OUT)).expect("file").len(), 1000);
    assert_eq!(read_all(&store, "j", ERR, 64).await, b"the error that explains it\n");

    store.close("j").await.expect("close");
    drop(store);
    let store = open(&data, Some(1000)).await;
    let status = store.status("j").await.expect("status");
    assert_eq!(
        (status.stdout.stored, status.stdout.end, status.stdout.dropped()),
        (1000, total + 50, total - 950)
    );
    let final_marker =
        format!("\n[hodei: stdout truncated at 1000 bytes; {} further bytes dropped]\n", total - 950);
    assert_eq!(
        read_all(&store, "j", OUT, 1 << 20).await,
        [&source[..1000], final_marker.as_bytes()].concat()
    );
}

#[tokio::test]
async fn the_cut_survives_a_crash_before_close() {
    let (_dir, data, store) = fresh(Some(10)).await;
    assert!(store.append("j", OUT, 0, b"0123456789abc").await.expect("append").truncated);
    store.append("j", OUT, 13, b"defg").await.expect("append");
    drop(store);
    let store = open(&data, Some(10)).await;
    // The cut is durable; the later dropped count comes back with the agent's next offset.
    let status = store.status("j").await.expect("status").stdout;
    assert_eq!((status.stored, status.end, status.truncated), (10, 13, true));
    assert_eq!(store.append("j", OUT, 17, b"hi").await.expect("resume").offset, 19);
    let visible = read_all(&store, "j", OUT, 64).await;
    assert_eq!(
        visible,
        b"0123456789\n[hodei: stdout truncated at 10 bytes; 9 further bytes dropped so far]\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_from_zero_sees_every_byte_once_through_close() {
    let (_dir, _data, store) = fresh(None).await;
    let store = Arc::new(store);
    let source = numbered_lines(20_000, &mut Rng(11));
    let half = source.len() / 2;
    append_all(&store, "j", OUT, &source[..half], 4096).await;

    let from_zero = store.follow("j", OUT, 0).await.expect("follow");
    let from_middle = store.follow("j", OUT, 12_345).await.expect("follow");
    let writer = tokio::spawn({
        let (store, source) = (Arc::clone(&store), source.clone());
        async move {
            let mut rng = Rng(3);
            let mut acked = half;
            while acked < source.len() {
                let start = acked - rng.below(300).min(acked as u64) as usize;
                let end = (start + 1 + rng.below(3000) as usize).min(source.len());
                let ack = store.append("j", OUT, start as u64, &source[start..end]).await.expect("append");
                acked = ack.offset as usize;
            }
            store.close("j").await.expect("close");
        }
    });
    let (zero, middle) = (tokio::spawn(collect(from_zero, 0)), tokio::spawn(collect(from_middle, 12_345)));
    // The writer first: if it fails, the followers would wait for a close that never comes.
    writer.await.expect("writer");
    let (zero, middle) = (zero.await.expect("follower"), middle.await.expect("follower"));
    assert_eq!(zero, source);
    assert_eq!(middle, &source[12_345..]);
    let late = store.follow("j", OUT, 0).await.expect("follow a closed log");
    assert_eq!(collect(late, 0).await, source);
}

/// Everything a follower yields until the end, checking that chunks join without a gap.
async fn collect(mut follower: LogFollower, mut expected_offset: u64) -> Vec<u8> {
    let mut seen = Vec::new();
    // Only a watchdog: a follower that is never woken fails the test instead of hanging it.
    let watchdog = std::time::Duration::from_secs(60);
    while let Some(chunk) = tokio::time::timeout(watchdog, follower.next()).await.expect("never woken") {
        let chunk = chunk.expect("chunk");
        assert_eq!(chunk.offset, expected_offset, "no gap, no overlap");
        assert!(!chunk.bytes.is_empty());
        seen.extend_from_slice(&chunk.bytes);
        expected_offset = chunk.next_offset;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_gets_the_marker_once_and_ends_at_close() {
    let (_dir, _data, store) = fresh(Some(100)).await;
    let store = Arc::new(store);
    let follower = store.follow("j", OUT, 0).await.expect("follow");
    let writer = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            append_all(&store, "j", OUT, &[b'a'; 1000], 30).await;
            store.close("j").await.expect("close");
        }
    });
    let seen = tokio::spawn(collect(follower, 0));
    writer.await.expect("writer");
    let seen = seen.await.expect("follower");
    assert_eq!(&seen[..100], &[b'a'; 100]);
    assert_eq!(count(&seen, b"[hodei: stdout truncated at 100 bytes; "), 1);
    assert!(seen.ends_with(b"]\n"));
}

#[tokio::test]
async fn closing_ends_followers_and_refuses_appends_for_good() {
    let (_dir, data, store) = fresh(None).await;
    // A job that never wrote a byte still ends its followers.
    let silent = store.follow("silent", ERR, 0).await.expect("follow");
    store.close("silent").await.expect("close");
    assert_eq!(collect(silent, 0).await, b"");

    store.append("j", OUT, 0, b"done\n").await.expect("append");
    store.close("j").await.expect("close");
    store.close("j").await.expect("closing twice");
    assert!(matches!(store.append("j", OUT, 5, b"more").await, Err(LogStoreError::Closed { .. })));
    drop(store);
    let store = open(&data, None).await;
    assert!(store.status("j").await.expect("status").closed);
    assert!(matches!(store.append("j", ERR, 0, b"late").await, Err(LogStoreError::Closed { .. })));
    assert_eq!(collect(store.follow("j", OUT, 0).await.expect("follow"), 0).await, b"done\n");
    assert_eq!(read_all(&store, "j", OUT, 64).await, b"done\n");
}

#[tokio::test]
async fn dropping_the_store_ends_followers_with_an_error() {
    let (_dir, _, store) = fresh(None).await;
    store.append("j", OUT, 0, b"partial").await.expect("append");
    let mut follower = store.follow("j", OUT, 0).await.expect("follow");
    assert_eq!(follower.next().await.expect("chunk").expect("chunk").bytes, b"partial");
    drop(store);
    assert!(matches!(follower.next().await, Some(Err(LogStoreError::StoreDropped { .. }))));
    assert!(follower.next().await.is_none());
}

#[tokio::test]
async fn reopening_after_a_drop_continues_at_the_right_offsets() {
    let (_dir, data, store) = fresh(None).await;
    append_all(&store, "saga-7/2", OUT, b"first run, stdout; ", 4).await;
    append_all(&store, "saga-7/2", ERR, b"first run, stderr; ", 6).await;
    drop(store);

    let store = open(&data, None).await;
    assert_eq!(store.jobs().await.expect("jobs"), ["saga-7/2"]);
    let status = store.status("saga-7/2").await.expect("status");
    assert_eq!((status.stdout.end, status.stderr.end), (19, 19));
    let result = store.append("saga-7/2", OUT, 25, b"ahead").await;
    assert!(matches!(result, Err(LogStoreError::Gap { expected: 19, .. })), "expected a gap: {result:?}");
    // The agent resends from its last ack, which may be behind the store's end.
    assert_eq!(store.append("saga-7/2", OUT, 11, b"stdout; second").await.expect("append").offset, 25);
    assert_eq!(store.append("saga-7/2", ERR, 19, b"second").await.expect("append").offset, 25);
    assert_eq!(read_all(&store, "saga-7/2", OUT, 64).await, b"first run, stdout; second");
    // A resend that contradicts recovered output is refused, not written over it.
    let result = store.append("saga-7/2", ERR, 11, b"STDERR").await;
    assert!(
        matches!(result, Err(LogStoreError::Mismatch { offset: 11, .. })),
        "expected a mismatch: {result:?}"
    );
    assert_eq!(read_all(&store, "saga-7/2", ERR, 64).await, b"first run, stderr; second");
}

#[tokio::test]
async fn written_bytes_are_read_and_acknowledged_only_once_a_sync_covers_them() {
    let (_dir, data, store) = fresh(None).await;
    let mut follower = store.follow("j", OUT, 0).await.expect("follow");
    store.write("j", OUT, 0, Bytes::from_static(b"hello ")).await.expect("write");
    store.write("j", OUT, 6, Bytes::from_static(b"world")).await.expect("write");
    store.write("j", ERR, 0, Bytes::from_static(b"oops")).await.expect("write");
    let status = store.status("j").await.expect("status");
    assert_eq!((status.stdout.end, status.stderr.end), (0, 0), "nothing is durable yet");
    assert!(store.read("j", OUT, 0, 64).await.expect("read").bytes.is_empty());
    // The stream goes on from where it was written, not from where it is durable.
    let result = store.write("j", OUT, 12, Bytes::from_static(b"!")).await;
    assert!(matches!(result, Err(LogStoreError::Gap { expected: 11, .. })), "expected a gap: {result:?}");

    let status = store.sync("j").await.expect("sync");
    assert_eq!((status.stdout.end, status.stderr.end), (11, 4));
    assert_eq!(store.status("j").await.expect("status"), status);
    let chunk = follower.next().await.expect("a chunk").expect("readable");
    assert_eq!((chunk.offset, chunk.bytes.as_slice()), (0, &b"hello world"[..]));
    assert_eq!(read_all(&store, "j", ERR, 64).await, b"oops");

    // A new session resends from the last ack over bytes written and not yet synced: they are
    // compared, not doubled. Closing syncs what is left.
    store.write("j", OUT, 11, Bytes::from_static(b"; more")).await.expect("write");
    store.write("j", OUT, 11, Bytes::from_static(b"; more, again")).await.expect("overlapping write");
    store.close("j").await.expect("close");
    assert_eq!(store.status("j").await.expect("status").stdout.end, 24);
    drop(follower);
    drop(store);
    let store = open(&data, None).await;
    assert_eq!(read_all(&store, "j", OUT, 5).await, b"hello world; more, again");
}

/// The state of a store that crashed after acknowledging `acked` and then part-wrote `tail`.
async fn crashed_with_tail(acked: &[u8], tail: &[u8]) -> (tempfile::TempDir, LogStore) {
    let (dir, data, store) = fresh(None).await;
    store.append("j", OUT, 0, acked).await.expect("append");
    drop(store);
    let mut file = std::fs::OpenOptions::new().append(true).open(stream_file(&data, "j", OUT)).expect("file");
    std::io::Write::write_all(&mut file, tail).expect("torn write");
    (dir, open(&data, None).await)
}

#[tokio::test]
async fn a_torn_tail_after_a_crash_is_neither_duplicated_nor_kept_as_garbage() {
    let batch = b"the batch in flight\n";
    for (name, tail) in [("prefix", &batch[..7]), ("zeros", &[0u8; 7][..]), ("long garbage", &[0u8; 64][..])]
    {
        let (_dir, store) = crashed_with_tail(b"acknowledged\n", tail).await;
        // Nothing on disk was confirmed in this run: a hub tells the agent to resend from its
        // own last acknowledgement, so that the resend reaches the tail.
        let loaded = store.status("j").await.expect(name).stdout;
        assert_eq!((loaded.end, loaded.confirmed), (13 + tail.len() as u64, 0), "{name}");
        let ack = store.append("j", OUT, 13, batch).await.expect(name);
        assert_eq!(store.status("j").await.expect(name).stdout.confirmed, ack.offset, "{name}");
        assert_eq!(ack.offset, 13 + batch.len() as u64, "{name}");
        assert_eq!(read_all(&store, "j", OUT, 64).await, [&b"acknowledged\n"[..], batch].concat(), "{name}");
        // Once the resend is acknowledged, those bytes are as fixed as any others.
        assert!(matches!(store.append("j", OUT, 13, b"XXX").await, Err(LogStoreError::Mismatch { .. })));
    }
}

#[tokio::test]
async fn a_recovered_tail_that_is_not_zeros_is_never_written_over() {
    let (_dir, store) = crashed_with_tail(b"acknowledged\n", b"the batch IN flight").await;
    let result = store.append("j", OUT, 13, b"the batch in flight\n").await;
    assert!(
        matches!(result, Err(LogStoreError::Mismatch { offset: 23, .. })),
        "expected a mismatch: {result:?}"
    );
    assert_eq!(read_all(&store, "j", OUT, 64).await, b"acknowledged\nthe batch IN flight");
}

#[tokio::test]
async fn a_file_cut_below_the_ack_asks_for_a_resend_from_its_end() {
    let (_dir, data, store) = fresh(None).await;
    store.append("j", OUT, 0, b"0123456789").await.expect("append");
    drop(store);
    let file = std::fs::OpenOptions::new().write(true).open(stream_file(&data, "j", OUT)).expect("file");
    file.set_len(4).expect("cut");
    let store = open(&data, None).await;
    let result = store.append("j", OUT, 10, b"abc").await;
    assert!(matches!(result, Err(LogStoreError::Gap { expected: 4, .. })), "expected a gap: {result:?}");
}

#[tokio::test]
async fn a_leftover_temporary_state_is_ignored_and_a_corrupt_one_reported() {
    let (_dir, data, store) = fresh(Some(4)).await;
    store.append("j", OUT, 0, b"abcdefgh").await.expect("append");
    drop(store);
    let job_dir = data.join("logs").join("j");
    std::fs::write(job_dir.join("state.tmp"), b"half a st").expect("leftover");
    let store = open(&data, Some(4)).await;
    assert_eq!(store.status("j").await.expect("status").stdout.end, 8);
    drop(store);
    std::fs::write(job_dir.join("state"), b"not a state file").expect("corrupt");
    let store = open(&data, Some(4)).await;
    assert!(matches!(store.status("j").await, Err(LogStoreError::CorruptState { .. })));
    assert!(matches!(store.append("j", OUT, 8, b"x").await, Err(LogStoreError::CorruptState { .. })));
}

#[tokio::test]
async fn job_ids_cannot_escape_the_log_directory() {
    let (dir, data, store) = fresh(None).await;
    let absolute = format!("{}/outside", dir.path().display());
    let ids =
        ["../outside", "../../outside", "..", ".", "a/../../outside", absolute.as_str(), "saga-id/3", "Ünï"];
    for id in ids {
        store.append(id, OUT, 0, id.as_bytes()).await.expect(id);
        store.close(id).await.expect(id);
    }
    for id in ids {
        assert_eq!(read_all(&store, id, OUT, 1024).await, id.as_bytes(), "{id}");
    }
    let mut listed = store.jobs().await.expect("jobs");
    let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    listed.sort();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(entries(dir.path()), ["data"]);
    assert_eq!(entries(&data), ["logs"]);
    assert!(entries(&data.join("logs")).contains(&"saga-id%2F3".to_string()));
    for id in ["", &"/".repeat(100)] {
        assert!(matches!(store.append(id, OUT, 0, b"x").await, Err(LogStoreError::InvalidJobId { .. })));
        assert!(matches!(store.read(id, OUT, 0, 1).await, Err(LogStoreError::InvalidJobId { .. })));
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".lock")
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_second_store_on_the_same_directory_is_refused() {
    let (_dir, data, store) = fresh(None).await;
    assert!(matches!(LogStore::open(&data).await, Err(LogStoreError::Locked { .. })));
    drop(store);
    LogStore::open(&data).await.expect("open after the first is gone");
}

#[tokio::test]
async fn a_finished_job_keeps_its_result_across_a_reopen_and_takes_no_more_output() {
    let (_dir, data, store) = fresh(None).await;
    assert_eq!(store.result("saga-9/0#1").await.expect("result"), None, "no result before the end");
    append_all(&store, "saga-9/0#1", OUT, b"done\n", 5).await;
    store.finish("saga-9/0#1", b"\x08\x00opaque result").await.expect("finish");
    drop(store);

    let store = open(&data, None).await;
    assert_eq!(
        store.result("saga-9/0#1").await.expect("result").as_deref(),
        Some(&b"\x08\x00opaque result"[..])
    );
    assert!(store.status("saga-9/0#1").await.expect("status").closed, "finishing closes the log");
    let late = store.append("saga-9/0#1", OUT, 5, b"late").await;
    assert!(matches!(late, Err(LogStoreError::Closed { .. })), "{late:?}");
    // A job with no output at all still gets its result stored.
    store.finish("saga-9/1#1", b"empty").await.expect("finish");
    assert_eq!(store.result("saga-9/1#1").await.expect("result").as_deref(), Some(&b"empty"[..]));
    assert_eq!(read_all(&store, "saga-9/1#1", OUT, 64).await, b"");
}

#[tokio::test]
async fn a_result_file_of_an_unknown_format_is_reported_not_misread() {
    let (_dir, data, store) = fresh(None).await;
    store.finish("saga-10/0#1", b"result").await.expect("finish");
    let job_dir = data.join("logs").join("saga-10%2F0%231");
    std::fs::write(job_dir.join("result"), b"\x09from the future").expect("overwrite");
    let read = store.result("saga-10/0#1").await;
    assert!(matches!(read, Err(LogStoreError::CorruptState { .. })), "{read:?}");
}
