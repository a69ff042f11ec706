//! The job log store's recovery from what a crash, a full disk or an operator can leave in its
//! directory: truncated, corrupted, missing or stray files, found when the store opens or
//! changed under it while it runs. Every call returns a value or a typed error, never a panic;
//! a status never shows bytes past the stored ones; bytes acknowledged by an open store read
//! back unchanged for as long as it stays open, and still do after it is reopened; a closed
//! log's follower ends, with the bytes a read gives.
//!
//! Input: the cap, the files of job `job-a` (each present or not: `state`, `stdout.log`,
//! `stderr.log`, `result`, `state.tmp`), a stray entry in the log directory, then operations
//! on `job-a` and `job-b` until the input ends (see `Op`).

#![no_main]

use std::path::{Path, PathBuf};

use hodei_fuzz::{Cursor, ScratchDir};
use hodei_server::logstore::{Bytes, LogStatus, LogStore, LogStoreConfig, LogStream};
use libfuzzer_sys::fuzz_target;

const JOBS: [&str; 2] = ["job-a", "job-b"];

/// The bytes of each job's streams that the open store acknowledged: they must read back
/// unchanged. Indexed by job, then stream.
type Acknowledged = [[Vec<u8>; 2]; 2];

struct Harness<'a> {
    dir: &'a Path,
    config: LogStoreConfig,
    store: Option<LogStore>,
    acknowledged: Acknowledged,
}

fn stream_file(dir: &Path, job: &str, stream: LogStream) -> PathBuf {
    dir.join("logs").join(job).join(format!("{stream}.log"))
}

fn stream_index(stream: LogStream) -> usize {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
    }
}

fn check_status(status: &LogStatus) {
    for stream in LogStream::ALL {
        let s = status.stream(stream);
        assert!(s.end >= s.stored, "{stream}: end {} before the stored {}", s.end, s.stored);
        assert!(
            s.truncated || s.end == s.stored,
            "{stream}: uncut, yet end {} and stored {}",
            s.end,
            s.stored
        );
    }
}

impl Harness<'_> {
    async fn open(&mut self) {
        self.store = LogStore::open_with_config(self.dir, self.config.clone()).await.ok();
    }

    /// What a stream reads from its start, if it reads.
    async fn read_all(&self, job: &str, stream: LogStream) -> Option<Vec<u8>> {
        let store = self.store.as_ref()?;
        store.read(job, stream, 0, usize::MAX).await.ok().map(|chunk| chunk.bytes)
    }

    /// Checks that what each stream acknowledged still reads back.
    async fn check_acknowledged(&self) {
        for (j, job) in JOBS.iter().enumerate() {
            for stream in LogStream::ALL {
                let acknowledged = &self.acknowledged[j][stream_index(stream)];
                if acknowledged.is_empty() {
                    continue;
                }
                if let Some(bytes) = self.read_all(job, stream).await {
                    let differs = acknowledged.iter().zip(&bytes).position(|(a, b)| a != b);
                    assert!(
                        bytes.starts_with(acknowledged),
                        "{job} {stream}: {} bytes acknowledged, {} read, the first differing at {differs:?}",
                        acknowledged.len(),
                        bytes.len()
                    );
                }
            }
        }
    }

    /// Records what an acknowledgement up to `status` covers of `stream`.
    async fn acknowledge(&mut self, j: usize, stream: LogStream, status: &LogStatus) {
        check_status(status);
        let s = status.stream(stream);
        let Some(bytes) = self.read_all(JOBS[j], stream).await else { return };
        // A tail found on disk that no resend confirmed is not acknowledged, whatever is stored.
        assert!(s.confirmed <= s.end, "{stream}: confirmed {} past the end {}", s.confirmed, s.end);
        let upto = usize::try_from(s.confirmed.min(s.stored)).expect("small files").min(bytes.len());
        let acknowledged = &mut self.acknowledged[j][stream_index(stream)];
        if upto > acknowledged.len() {
            *acknowledged = bytes[..upto].to_vec();
        }
    }

    async fn offset(&self, job: &str, stream: LogStream, input: &mut Cursor<'_>) -> u64 {
        let end = match &self.store {
            Some(store) => store.status(job).await.map_or(0, |s| s.stream(stream).end),
            None => 0,
        };
        match input.u8() % 4 {
            0 => end,
            1 => end.saturating_sub(u64::from(input.u8())),
            2 => end.saturating_add(u64::from(input.u8())),
            _ => input.u64(),
        }
    }

    async fn step(&mut self, input: &mut Cursor<'_>) {
        let op = input.u8();
        let j = usize::from(op >> 7);
        let job = JOBS[j];
        let stream = if op & 0x40 == 0 { LogStream::Stdout } else { LogStream::Stderr };
        match op & 0x3F {
            0..8 => {
                let offset = self.offset(job, stream, input).await;
                let bytes = Bytes::copy_from_slice(input.short());
                if let Some(store) = &self.store {
                    let _ = store.write(job, stream, offset, bytes).await;
                }
            }
            8..12 => {
                let Some(store) = &self.store else { return };
                if let Ok(status) = store.sync(job).await {
                    for stream in LogStream::ALL {
                        self.acknowledge(j, stream, &status).await;
                    }
                }
            }
            12..20 => {
                let offset = self.offset(job, stream, input).await;
                let bytes = input.short();
                let Some(store) = &self.store else { return };
                if let Ok(ack) = store.append(job, stream, offset, bytes).await
                    && let Ok(status) = store.status(job).await
                {
                    assert!(ack.offset <= status.stream(stream).end, "acknowledged past the end");
                    self.acknowledge(j, stream, &status).await;
                }
            }
            20..24 => {
                let (from, max_len) = (u64::from(input.u16()), usize::from(input.u16()));
                let Some(store) = &self.store else { return };
                if let Ok(chunk) = store.read(job, stream, from, max_len).await {
                    assert_eq!(chunk.offset, from);
                    assert!(chunk.next_offset >= from, "a read went back");
                    if chunk.truncation.is_none() {
                        assert!(
                            chunk.bytes.len() <= max_len,
                            "read {} bytes of {max_len}",
                            chunk.bytes.len()
                        );
                    }
                }
            }
            24..26 => {
                let Some(store) = &self.store else { return };
                let _ = store.close(job).await;
            }
            26..28 => {
                let result = input.short();
                let Some(store) = &self.store else { return };
                if store.finish(job, result).await.is_ok() {
                    assert_eq!(store.result(job).await.ok().flatten().as_deref(), Some(result));
                }
            }
            28..30 => {
                let Some(store) = &self.store else { return };
                let _ = store.result(job).await;
                let _ = store.exists(job).await;
                if let Ok(jobs) = store.jobs().await {
                    assert!(jobs.windows(2).all(|w| w[0] < w[1]), "jobs unsorted: {jobs:?}");
                }
            }
            30..32 => {
                let Some(store) = &self.store else { return };
                if let Ok(status) = store.status(job).await {
                    check_status(&status);
                }
                let _ = store.begin(job).await;
            }
            32..36 => self.follow_closed(job, stream).await,
            36..44 => {
                // A restart: what was acknowledged is on disk and reads back, but the new store
                // knows nothing of what the agent was told, so a resend may cut a torn tail.
                self.store = None;
                self.open().await;
                self.check_acknowledged().await;
                self.acknowledged = Acknowledged::default();
            }
            _ => self.damage(job, stream, input),
        }
    }

    async fn follow_closed(&self, job: &str, stream: LogStream) {
        let Some(store) = &self.store else { return };
        if !store.status(job).await.is_ok_and(|status| status.closed) {
            return;
        }
        let Ok(read) = store.read(job, stream, 0, usize::MAX).await else { return };
        let Ok(mut follower) = store.follow(job, stream, 0).await else { return };
        let mut followed = Vec::new();
        while let Some(chunk) = follower.next().await {
            let Ok(chunk) = chunk else { return };
            followed.extend_from_slice(&chunk.bytes);
            assert!(read.bytes.starts_with(&followed), "{job} {stream}: a follower and a read disagree");
        }
        assert_eq!(followed, read.bytes, "{job} {stream}: a follower ended short of a read");
    }

    /// Changes a file behind the store's back, as a crash, a full disk or an operator may.
    fn damage(&mut self, job: &str, stream: LogStream, input: &mut Cursor<'_>) {
        let j = JOBS.iter().position(|j| *j == job).expect("a known job");
        let path = stream_file(self.dir, job, stream);
        let acknowledged = &mut self.acknowledged[j][stream_index(stream)];
        match input.u8() % 4 {
            0 => {
                let len = input.u16();
                if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path) {
                    let _ = file.set_len(u64::from(len));
                }
                acknowledged.truncate(usize::from(len));
            }
            1 => {
                let at = usize::from(input.u16());
                let mask = input.u8() | 1;
                if let Ok(mut bytes) = std::fs::read(&path)
                    && at < bytes.len()
                {
                    bytes[at] ^= mask;
                    let _ = std::fs::write(&path, bytes);
                    acknowledged.truncate(at);
                }
            }
            2 => {
                let contents = input.short();
                let _ = std::fs::write(self.dir.join("logs").join(job).join("state"), contents);
            }
            _ => {
                let _ = std::fs::remove_file(self.dir.join("logs").join(job).join("result"));
                let _ = std::fs::write(self.dir.join("logs").join(job).join("result"), input.short());
            }
        }
    }
}

/// Lays out `job-a`'s files, and a stray entry, as the input says.
fn lay_out(dir: &Path, input: &mut Cursor<'_>) {
    let present = input.u8();
    let job = dir.join("logs").join(JOBS[0]);
    let files = [(1, "state"), (2, "stdout.log"), (4, "stderr.log"), (8, "result"), (16, "state.tmp")];
    if present & 31 != 0 {
        std::fs::create_dir_all(&job).expect("the job's directory");
    }
    for (bit, name) in files {
        if present & bit != 0 {
            std::fs::write(job.join(name), input.long()).expect("a job file");
        }
    }
    if present & 32 != 0 {
        // Whatever an operator or another program left there, named as it may be.
        let name: String =
            String::from_utf8_lossy(input.short()).chars().filter(|c| *c != '/' && *c != '\0').collect();
        if !name.is_empty() && name != "." && name != ".." {
            let _ = std::fs::create_dir_all(dir.join("logs").join(name));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = hodei_fuzz::runtime();
    }
    let mut input = Cursor::new(data);
    let cap = match input.u8() {
        0 => LogStoreConfig::default(),
        cap => LogStoreConfig::default().with_max_stream_bytes(u64::from(cap) * 8),
    };
    let scratch = ScratchDir::new();
    lay_out(scratch.path(), &mut input);
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let mut harness = Harness {
                dir: scratch.path(),
                config: cap,
                store: None,
                acknowledged: Acknowledged::default(),
            };
            harness.open().await;
            while !input.is_empty() {
                harness.step(&mut input).await;
                harness.check_acknowledged().await;
            }
        })
    });
});
