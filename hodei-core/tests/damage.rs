//! Damage to a data directory is never silent: after a flipped bit or a truncation anywhere in
//! it, a `SledStore` either still reads every acknowledged event, or refuses with a typed error.
//!
//! The directory is a real one: an engine ran sagas on it, some to their end, some to a signal
//! wait where they are still in flight, and shut down. Each trial copies it, damages one file,
//! opens the copy and reads everything an engine would: the in-flight index, every record and
//! every journal.
#![cfg(feature = "sled")]

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{
    Engine, EngineEventKind, Error, Event, EventStore, Outcome, RecordedEvent, SagaDefinition, SagaId,
    SagaRun, SledStore, StepError,
};

const COMPLETED: u32 = 12;
const WAITING: u32 = 6;

fn definition() -> SagaDefinition {
    SagaDefinition::new("release", 1, |ctx, n: u64| async move {
        let mut total = n;
        for stage in ["checkout", "build", "test"] {
            total = ctx
                .step(stage)
                .input(total)
                .run(|_, t: u64| async move { Ok::<_, StepError>(t + 1) })
                .await?;
        }
        if n % 2 == 1 {
            let approver: String = ctx.wait_signal("approve").await?;
            total += approver.len() as u64;
        }
        ctx.step("deploy").input(total).run(|_, t: u64| async move { Ok::<_, StepError>(t * 10) }).await
    })
}

/// What an engine would read of a store: in-flight ids, every record's status, every journal.
#[derive(Debug, PartialEq)]
struct Contents {
    in_flight: Vec<String>,
    journals: BTreeMap<String, Vec<RecordedEvent>>,
}

fn ids() -> impl Iterator<Item = SagaId> {
    (0..COMPLETED + WAITING).map(|i| SagaId::new(format!("run-{i}")).unwrap())
}

fn read(store: &SledStore) -> Result<Contents, Error> {
    let mut in_flight: Vec<String> = store.in_flight()?.into_iter().map(|r| r.id.to_string()).collect();
    in_flight.sort();
    store.records()?;
    let mut journals = BTreeMap::new();
    for id in ids() {
        journals.insert(id.to_string(), store.history(&id)?);
    }
    Ok(Contents { in_flight, journals })
}

/// Runs the sagas on `dir`. With `crashed`, the directory is copied to `image` while the store
/// is still open, as a SIGKILL would leave it (everything acknowledged is in the files, nothing
/// of a clean close); otherwise after a clean close.
async fn build_directory(dir: &Path, image: &Path, crashed: bool) -> Contents {
    let store = Arc::new(SledStore::open(dir).unwrap());
    let engine = Engine::builder().store(store.clone()).register(definition()).start().await.unwrap();
    let mut events = engine.subscribe();
    let mut waiting = HashSet::new();
    for i in 0..COMPLETED + WAITING {
        // The first ones run to the end; the others wait for an approval that never comes.
        let n = if i < COMPLETED { 2 * u64::from(i) } else { 2 * u64::from(i) + 1 };
        let run = engine.start(SagaRun::new("release", format!("run-{i}"), &n).unwrap()).await.unwrap();
        if i < COMPLETED {
            assert_eq!(run.outcome::<u64>().await.unwrap(), Outcome::Completed((n + 3) * 10));
        } else {
            waiting.insert(run.id().clone());
        }
    }
    while !waiting.is_empty() {
        let event = events.recv().await.unwrap();
        if let EngineEventKind::Journaled(recorded) = &event.kind
            && matches!(recorded.event, Event::SignalWaitStarted { .. })
        {
            waiting.remove(&event.saga_id);
        }
    }
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(engine);
    let contents = read(&store).unwrap();
    assert_eq!(contents.in_flight.len(), WAITING as usize);
    if crashed {
        copy_dir(dir, image);
        drop(store);
    } else {
        drop(store);
        copy_dir(dir, image);
    }
    contents
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// How one damaged copy opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    /// Every acknowledged event read back, nothing else changed.
    Intact,
    /// The store refused to open with `Error::Damaged`.
    Refused,
    /// The store refused to open with another typed error.
    OtherError,
    /// It opened, and reading some of it failed with a typed error.
    ReadError,
    /// It opened and read without error, but acknowledged events were missing or different.
    SilentLoss,
}

/// Opens a damaged copy and reads it. With `exact`, it must hold exactly `expected`; without,
/// each acknowledged journal must be a prefix of what is found (writes nobody was told about may
/// have survived too).
fn judge(dir: &Path, expected: &Contents, exact: bool) -> (Verdict, String) {
    let store = match SledStore::open(dir) {
        Ok(store) => store,
        Err(e @ Error::Damaged { .. }) => return (Verdict::Refused, e.to_string()),
        Err(e) => return (Verdict::OtherError, e.to_string()),
    };
    let found = match read(&store) {
        Ok(found) => found,
        Err(e) => return (Verdict::ReadError, e.to_string()),
    };
    let intact = if exact {
        &found == expected
    } else {
        expected
            .journals
            .iter()
            .all(|(id, events)| found.journals.get(id).is_some_and(|f| f.starts_with(events)))
    };
    if intact {
        return (Verdict::Intact, String::new());
    }
    let lost: usize = expected
        .journals
        .iter()
        .map(|(id, events)| events.len().saturating_sub(found.journals.get(id).map_or(0, Vec::len)))
        .sum();
    (Verdict::SilentLoss, format!("{lost} events lost, in flight now {:?}", found.in_flight))
}

struct Tally {
    counts: BTreeMap<Verdict, usize>,
    silent: Vec<String>,
}

impl Tally {
    fn new() -> Self {
        Self { counts: BTreeMap::new(), silent: Vec::new() }
    }

    fn add(&mut self, what: String, (verdict, detail): (Verdict, String)) {
        *self.counts.entry(verdict).or_default() += 1;
        if verdict == Verdict::SilentLoss {
            self.silent.push(format!("{what}: {detail}"));
        }
    }
}

/// Every `stride`-th position of every file, and the file's last byte.
fn positions(len: u64, stride: u64) -> impl Iterator<Item = u64> {
    (0..len).step_by(stride as usize).chain(len.checked_sub(1))
}

/// Flips one bit at every `stride`-th byte of every file of `image`, and truncates each file
/// at every `stride`-th length; returns the tallies.
fn damage_everywhere(image: &Path, scratch: &Path, expected: &Contents, stride: u64) -> (Tally, Tally) {
    let mut flips = Tally::new();
    let mut truncations = Tally::new();
    for file in files(image) {
        let relative = file.strip_prefix(image).unwrap().to_path_buf();
        let len = fs::metadata(&file).unwrap().len();
        for (n, offset) in positions(len, stride).enumerate() {
            let trial = scratch.join("trial");
            copy_dir(image, &trial);
            let mut bytes = fs::read(trial.join(&relative)).unwrap();
            bytes[offset as usize] ^= 1 << (n % 8);
            fs::write(trial.join(&relative), &bytes).unwrap();
            flips.add(
                format!("bit {} of byte {offset} of {}", n % 8, relative.display()),
                judge(&trial, expected, true),
            );
            fs::remove_dir_all(&trial).unwrap();

            copy_dir(image, &trial);
            fs::OpenOptions::new().write(true).open(trial.join(&relative)).unwrap().set_len(offset).unwrap();
            truncations
                .add(format!("{} truncated to {offset}", relative.display()), judge(&trial, expected, true));
            fs::remove_dir_all(&trial).unwrap();
        }
    }
    (flips, truncations)
}

fn stride() -> u64 {
    std::env::var("HODEI_DAMAGE_STRIDE").ok().and_then(|s| s.parse().ok()).unwrap_or(97)
}

async fn never_silent(crashed: bool) {
    let scratch = tempfile::tempdir().unwrap();
    let image = scratch.path().join("image");
    let expected = build_directory(&scratch.path().join("live"), &image, crashed).await;
    for file in files(&image) {
        println!(
            "{} is {} bytes",
            file.strip_prefix(&image).unwrap().display(),
            fs::metadata(&file).unwrap().len()
        );
    }
    let (flips, truncations) = damage_everywhere(&image, scratch.path(), &expected, stride());
    println!("flipped bits: {:?}", flips.counts);
    println!("truncations: {:?}", truncations.counts);
    let silent: Vec<_> = flips.silent.iter().chain(&truncations.silent).collect();
    assert!(silent.is_empty(), "{} silent losses:\n{silent:#?}", silent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_after_a_crash_is_never_silent() {
    never_silent(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_after_a_clean_close_is_never_silent() {
    never_silent(false).await;
}

/// A crash leaves writes nobody was told about at the end of sled's log, cut anywhere: that
/// torn tail opens with every acknowledged event. A cut into what was acknowledged is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_opens_and_a_cut_into_acknowledged_writes_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let (live, image) = (scratch.path().join("live"), scratch.path().join("image"));
    let acknowledged = build_directory(&live, &image, true).await;
    fs::remove_dir_all(&image).unwrap();
    let db = |dir: &Path| dir.join("journal").join("db");
    let acknowledged_len = fs::metadata(db(&live)).unwrap().len();
    // Signals for the waiting sagas, written but never made durable: what a process has in
    // flight when it dies. The clean close below writes them, as sled would have, partway.
    let store = SledStore::open(&live).unwrap();
    for id in acknowledged.in_flight.iter().map(|id| SagaId::new(id.clone()).unwrap()) {
        let next = store.history(&id).unwrap().len() as u64;
        let signals: Vec<_> = (0..20)
            .map(|i| RecordedEvent {
                seq: next + i,
                at: hodei_core::Timestamp::now(),
                event: Event::SignalReceived { name: format!("note-{i}"), payload: vec![7; 100] },
            })
            .collect();
        for signal in signals.chunks(1) {
            store.append(&id, signal, None).unwrap();
        }
    }
    drop(store);
    // sled sizes its file by whole segments on a clean close; the log ends at its last byte.
    let bytes = fs::read(db(&live)).unwrap();
    let full_len = bytes.iter().rposition(|b| *b != 0).map_or(0, |last| last as u64 + 1);
    assert!(full_len > acknowledged_len + 2_000, "the tail is {} bytes", full_len - acknowledged_len);
    let (mut torn, mut cut) = (Tally::new(), Tally::new());
    for len in positions(full_len, 23) {
        copy_dir(&live, &image);
        fs::OpenOptions::new().write(true).open(db(&image)).unwrap().set_len(len).unwrap();
        let verdict = judge(&image, &acknowledged, false);
        if len >= acknowledged_len {
            torn.add(format!("torn at {len}"), verdict);
        } else {
            cut.add(format!("cut at {len}"), verdict);
        }
        fs::remove_dir_all(&image).unwrap();
    }
    println!("torn tails ({acknowledged_len} to {full_len} bytes): {:?}", torn.counts);
    println!("cuts into acknowledged writes: {:?}", cut.counts);
    assert_eq!(torn.counts.keys().collect::<Vec<_>>(), [&Verdict::Intact], "every torn tail opens intact");
    assert!(cut.silent.is_empty(), "silent losses: {:#?}", cut.silent);
    assert!(cut.counts.get(&Verdict::Refused).is_some_and(|n| *n > 0));
}
