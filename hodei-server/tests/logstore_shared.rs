//! The log store of control planes sharing a PostgreSQL database (`LogStore::open_shared`)
//! against the file store's contract, with the output of one job arriving at several control
//! planes: exact bytes, resends stored once whichever plane gets them, gaps and differing
//! resends refused, the cap's one marker, nothing read before it is committed, followers on one
//! plane seeing what another appended, and results any of them reads. Each plane has a
//! `PostgresStore` of its own on one schema, as each engine process has.

#[path = "../../hodei-core/src/store/postgres/test_database.rs"]
mod test_database;

use std::sync::Arc;
use std::time::Duration;

// `PostgresOptions`: `test_database` names it from this crate's root.
use hodei_core::{PostgresOptions, PostgresStore};
use hodei_server::logstore::{
    Bytes, JobHolder, LogFollower, LogStore, LogStoreConfig, LogStoreError, LogStream,
};
use test_database::TestDatabase;

#[path = "support/log_data.rs"]
mod log_data;

use log_data::{Rng, next_batch, numbered_lines, read_all};

const OUT: LogStream = LogStream::Stdout;
const ERR: LogStream = LogStream::Stderr;

/// Control planes' log stores on one database.
struct Planes {
    _db: TestDatabase,
    _dirs: Vec<tempfile::TempDir>,
    stores: Vec<LogStore>,
}

impl Planes {
    async fn open(test: &str, n: usize, cap: Option<u64>) -> Option<Self> {
        let db = TestDatabase::new(test)?;
        let mut stores = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..n {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
            let config = cap.map_or_else(LogStoreConfig::default, |cap| {
                LogStoreConfig::default().with_max_stream_bytes(cap)
            });
            stores.push(LogStore::open_shared(dir.path(), config, store).await.unwrap());
            dirs.push(dir);
        }
        Some(Self { _db: db, _dirs: dirs, stores })
    }

    fn plane(&self, n: usize) -> &LogStore {
        &self.stores[n]
    }
}

#[tokio::test]
async fn a_log_begun_on_one_plane_continues_on_another_byte_for_byte() {
    let Some(planes) = Planes::open("shared_logs_continue", 2, None).await else { return };
    let (a, b) = (planes.plane(0), planes.plane(1));
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    bytes.extend_from_slice(b"\xC3\x28 \xA0\xA1 \xF0\x28\x8C\xBC \xFF\xFE\0\r\n");
    assert_eq!(a.append("saga-1/0", OUT, 0, &bytes[..3000]).await.unwrap().offset, 3000);
    // The agent's next session is with the other plane, resending from before its last ack.
    assert_eq!(b.append("saga-1/0", OUT, 2500, &bytes[2500..]).await.unwrap().offset, 5016);
    b.append("saga-1/0", ERR, 0, b"only on stderr").await.unwrap();

    for plane in [a, b] {
        assert_eq!(read_all(plane, "saga-1/0", OUT, 1 << 20).await, bytes);
        assert_eq!(read_all(plane, "saga-1/0", OUT, 7).await, bytes);
        assert_eq!(read_all(plane, "saga-1/0", ERR, 100).await, b"only on stderr");
        let status = plane.status("saga-1/0").await.unwrap();
        assert_eq!((status.stdout.end, status.stdout.stored, status.stdout.truncated), (5016, 5016, false));
        assert_eq!(status.stderr.end, 14);
        assert!(!status.closed);
    }
    let middle = b.read("saga-1/0", OUT, 4000, 10).await.unwrap();
    assert_eq!((middle.bytes.as_slice(), middle.next_offset), (&bytes[4000..4010], 4010));
    assert!(a.exists("saga-1/0").await.unwrap());
    assert!(!a.exists("saga-1/1").await.unwrap());
    assert_eq!(b.jobs().await.unwrap(), ["saga-1/0"]);
}

#[tokio::test]
async fn gaps_and_resends_that_differ_are_refused_and_change_nothing() {
    let Some(planes) = Planes::open("shared_logs_refusals", 2, None).await else { return };
    let (a, b) = (planes.plane(0), planes.plane(1));
    a.append("j", OUT, 0, b"abcdef").await.unwrap();
    match b.append("j", OUT, 9, b"xyz").await {
        Err(LogStoreError::Gap { offset: 9, expected: 6, .. }) => {}
        other => panic!("expected a gap at 9 resuming from 6, got {other:?}"),
    }
    match b.append("j", OUT, 2, b"cdXfgh").await {
        Err(LogStoreError::Mismatch { offset: 4, .. }) => {}
        other => panic!("expected a mismatch at offset 4, got {other:?}"),
    }
    assert_eq!(read_all(a, "j", OUT, 64).await, b"abcdef");
    assert_eq!(b.append("j", OUT, 6, b"g").await.unwrap().offset, 7);
    let long = "x".repeat(300);
    assert!(matches!(a.append(&long, OUT, 0, b"x").await, Err(LogStoreError::InvalidJobId { .. })));
}

#[tokio::test]
async fn random_batches_with_resends_across_planes_end_up_byte_identical() {
    const LINES: usize = 20_000;
    let Some(planes) = Planes::open("shared_logs_random", 3, None).await else { return };
    let seed = 0x5EED_1066;
    let mut rng = Rng(seed);
    let sources = [numbered_lines(LINES, &mut rng), numbered_lines(LINES / 2, &mut rng)];
    let mut acked = [0usize; 2];
    let mut plane = 0;
    while acked.iter().zip(&sources).any(|(a, s)| *a < s.len()) {
        let which = rng.below(2) as usize;
        let (stream, source) = (LogStream::ALL[which], &sources[which]);
        if acked[which] == source.len() {
            continue;
        }
        if rng.below(20) == 0 {
            // The agent's session moves to another control plane: its acks are all it has.
            plane = (plane + 1 + rng.below(2) as usize) % 3;
        }
        let store = planes.plane(plane);
        let (start, end) = next_batch(&mut rng, acked[which], source.len());
        let ack = store.append("big", stream, start as u64, &source[start..end]).await.expect("append");
        assert_eq!(ack.offset, end.max(acked[which]) as u64, "seed {seed}");
        acked[which] = ack.offset as usize;
    }
    for store in &planes.stores {
        let (stdout, stderr) =
            (read_all(store, "big", OUT, 1 << 20).await, read_all(store, "big", ERR, 1 << 16).await);
        assert!(stdout == sources[0] && stderr == sources[1], "seed {seed}: not byte-identical");
    }
}

#[tokio::test]
async fn the_same_batches_from_two_planes_at_once_are_stored_once() {
    let Some(planes) = Planes::open("shared_logs_race", 2, None).await else { return };
    let source = numbered_lines(5_000, &mut Rng(11));
    // A session that only seemed dead and its successor on another plane send the same output
    // at the same time; the job's row lock orders them and the later one finds it stored.
    async fn send(store: &LogStore, source: &[u8]) -> hodei_server::logstore::LogStatus {
        for (i, piece) in source.chunks(1000).enumerate() {
            let offset = (i * 1000) as u64;
            store.write("j", OUT, offset, Bytes::copy_from_slice(piece)).await.unwrap();
            if i % 7 == 0 {
                store.sync("j").await.unwrap();
            }
        }
        store.sync("j").await.unwrap()
    }
    let (a, b) = tokio::join!(send(planes.plane(0), &source), send(planes.plane(1), &source));
    assert_eq!((a.stdout.end, b.stdout.end), (source.len() as u64, source.len() as u64));
    assert_eq!(read_all(planes.plane(0), "j", OUT, 1 << 20).await, source);
}

#[tokio::test]
async fn the_cap_gives_one_marker_on_every_plane_with_the_final_count_after_close() {
    let Some(planes) = Planes::open("shared_logs_cap", 2, Some(1000)).await else { return };
    let (a, b) = (planes.plane(0), planes.plane(1));
    let source = numbered_lines(300, &mut Rng(7));
    let total = source.len() as u64;
    for (i, piece) in source.chunks(100).enumerate() {
        a.append("j", OUT, (i * 100) as u64, piece).await.unwrap();
    }
    let ack = b.append("j", OUT, 500, &source[500..1500]).await.expect("resend past the cap");
    assert_eq!((ack.offset, ack.truncated), (total, true));
    // Past the cap the agent may skip bytes: the offset alone accounts for them.
    assert_eq!(b.append("j", OUT, total + 50, b"").await.unwrap().offset, total + 50);
    a.append("j", ERR, 0, b"the error that explains it\n").await.unwrap();
    let marker =
        format!("\n[hodei: stdout truncated at 1000 bytes; {} further bytes dropped so far]\n", total - 950);
    assert_eq!(read_all(b, "j", OUT, 64).await, [&source[..1000], marker.as_bytes()].concat());
    assert_eq!(read_all(a, "j", ERR, 64).await, b"the error that explains it\n");

    a.close("j").await.unwrap();
    let status = b.status("j").await.unwrap();
    assert!(status.closed);
    assert_eq!(
        (status.stdout.stored, status.stdout.end, status.stdout.dropped()),
        (1000, total + 50, total - 950)
    );
    let final_marker =
        format!("\n[hodei: stdout truncated at 1000 bytes; {} further bytes dropped]\n", total - 950);
    assert_eq!(read_all(b, "j", OUT, 1 << 20).await, [&source[..1000], final_marker.as_bytes()].concat());
}

#[tokio::test]
async fn written_bytes_are_read_and_acknowledged_only_once_a_sync_covers_them() {
    let Some(planes) = Planes::open("shared_logs_sync", 2, None).await else { return };
    let (a, b) = (planes.plane(0), planes.plane(1));
    a.write("j", OUT, 0, Bytes::from_static(b"first ")).await.unwrap();
    a.write("j", OUT, 6, Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(b.status("j").await.unwrap().stdout.end, 0);
    assert_eq!(read_all(b, "j", OUT, 64).await, b"");
    let status = a.sync("j").await.unwrap();
    assert_eq!(status.stdout.end, 12);
    assert_eq!(read_all(b, "j", OUT, 64).await, b"first second");
    // A sync sends its batches in stream order, whatever order they were queued in (an earlier
    // session's may interleave with the resend of the next), and stops at the first it
    // refuses: what came before is committed, nothing after.
    a.write("j", OUT, 25, Bytes::from_static(b" fifth")).await.unwrap();
    a.write("j", OUT, 12, Bytes::from_static(b" third")).await.unwrap();
    a.write("j", OUT, 40, Bytes::from_static(b"gap")).await.unwrap();
    a.write("j", OUT, 18, Bytes::from_static(b" fourth")).await.unwrap();
    match a.sync("j").await {
        Err(error @ LogStoreError::Gap { offset: 40, expected: 31, .. }) => {
            assert!(error.calls_for_resend(), "a gap is for the agent's resend to fill");
        }
        other => panic!("expected a gap at 40 resuming from 31, got {other:?}"),
    }
    assert_eq!(read_all(b, "j", OUT, 64).await, b"first second third fourth fifth");
}

async fn collect(mut follower: LogFollower) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset = follower.offset();
    while let Some(chunk) = follower.next().await {
        let chunk = chunk.expect("chunk");
        assert_eq!(chunk.offset, offset, "no gap, no overlap");
        offset = chunk.next_offset;
        out.extend_from_slice(&chunk.bytes);
    }
    out
}

#[tokio::test]
async fn a_follower_on_one_plane_sees_what_another_appends_once_through_close() {
    let Some(planes) = Planes::open("shared_logs_follow", 2, None).await else { return };
    let (a, b) = (planes.plane(0), planes.plane(1));
    let source = numbered_lines(2_000, &mut Rng(3));
    a.append("j", OUT, 0, &source[..100]).await.unwrap();
    let remote = b.follow("j", OUT, 0).await.unwrap();
    let local = a.follow("j", OUT, 40).await.unwrap();
    let followed = tokio::spawn(async move { tokio::join!(collect(remote), collect(local)) });
    for (i, piece) in source[100..].chunks(700).enumerate() {
        a.append("j", OUT, 100 + (i * 700) as u64, piece).await.unwrap();
    }
    a.finish("j", b"the result").await.unwrap();
    let (remote, local) = followed.await.unwrap();
    assert_eq!(remote, source);
    assert_eq!(local, &source[40..]);
    assert_eq!(b.result("j").await.unwrap().as_deref(), Some(&b"the result"[..]));
    assert!(matches!(
        b.append("j", OUT, source.len() as u64, b"late").await,
        Err(LogStoreError::Closed { .. })
    ));
    // A second result replaces the first, even with output resent after the close (its
    // acknowledgement lost with a session) queued before it; closing again keeps it.
    b.write("j", OUT, 0, Bytes::copy_from_slice(&source[..10])).await.unwrap();
    b.finish("j", b"the second result").await.unwrap();
    a.close("j").await.unwrap();
    assert_eq!(a.result("j").await.unwrap().as_deref(), Some(&b"the second result"[..]));
    assert_eq!(a.result("never-ran").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_counts_while_its_session_lasts_and_for_the_worker_wait_after() {
    let Some(db) = TestDatabase::new("shared_logs_holder") else { return };
    let mut planes = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
        // Each control plane beside an engine on the same store, whose lease says it is alive.
        let engine = hodei_core::Engine::builder().store(store.clone()).start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open_shared(dir.path(), LogStoreConfig::default(), store.clone()).await.unwrap();
        planes.push((dir, store, engine, logs));
    }
    let (a, b) = (&planes[0].3, &planes[1].3);
    let a_id = planes[0].1.engine_id().to_owned();
    let jobs = |ids: &[&str]| ids.iter().map(|id| (*id).to_owned()).collect::<Vec<_>>();
    let long = Duration::from_secs(3600);

    a.begin("s/0#1").await.unwrap();
    assert_eq!(b.holder(&jobs(&["s/0#1"]), long).await.unwrap(), None, "nobody holds it yet");
    a.attach("s/0#1", "w1", 1).await.unwrap();
    let held = JobHolder { job: "s/0#1".into(), worker: "w1".into(), member: Some(a_id.clone()) };
    // Newest attempt first: the first of them that is held.
    assert_eq!(b.holder(&jobs(&["s/0#2", "s/0#1"]), Duration::ZERO).await.unwrap(), Some(held.clone()));

    // Between sessions: held for the worker wait, then not.
    // The end of another session of the same worker detaches nothing.
    a.detach("w1", &jobs(&["s/0#1"]), 0).await.unwrap();
    assert_eq!(b.holder(&jobs(&["s/0#1"]), Duration::ZERO).await.unwrap(), Some(held.clone()));
    a.detach("w1", &jobs(&["s/0#1"]), 1).await.unwrap();
    let between = JobHolder { member: None, ..held.clone() };
    assert_eq!(b.holder(&jobs(&["s/0#1"]), long).await.unwrap(), Some(between));
    assert_eq!(b.holder(&jobs(&["s/0#1"]), Duration::ZERO).await.unwrap(), None);

    // Its next session is with the other control plane; once the result is stored, nobody
    // holds it any more.
    b.attach("s/0#1", "w1", 1).await.unwrap();
    assert_eq!(
        a.holder(&jobs(&["s/0#1"]), Duration::ZERO).await.unwrap().and_then(|h| h.member),
        Some(planes[1].1.engine_id().to_owned())
    );
    b.finish("s/0#1", b"result").await.unwrap();
    assert_eq!(a.holder(&jobs(&["s/0#1"]), long).await.unwrap(), None);

    // A control plane that dies detaches nobody: its lease's end starts the worker wait.
    a.attach("s/1#1", "w2", 2).await.unwrap();
    db.lapse(&a_id).await;
    assert_eq!(b.holder(&jobs(&["s/1#1"]), Duration::ZERO).await.unwrap(), None);
    let orphaned = b.holder(&jobs(&["s/1#1"]), long).await.unwrap();
    assert_eq!(orphaned.map(|h| (h.worker, h.member)), Some(("w2".to_owned(), Some(a_id))));

    for (_dir, _store, engine, _logs) in planes {
        engine.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}
