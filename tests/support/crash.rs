//! The crash harness: a test binary re-runs itself as a child process, filtered to one child
//! test, and kills it with SIGKILL after it has reported a chosen number of side effects.
//!
//! The child prints [`READY`] once its engine has started, [`EFFECT`] after each side effect,
//! and [`DONE`] when it has finished its work. The lines are matched with `contains`, because
//! libtest prints `test <name> ...` without a newline right before the test's own output.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use hodei::{Event, RecordedEvent};

pub const READY: &str = "hodei-crash: ready";
pub const EFFECT: &str = "hodei-crash: effect";
pub const DONE: &str = "hodei-crash: done";

/// How one run of the child ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Run {
    Killed,
    Finished,
}

/// In the child, after printing an [`EFFECT`] line: waits until the parent has read it and
/// decided not to kill here, so that a kill lands exactly after the chosen effect however busy
/// the machine is (a child racing ahead would make the kill points depend on the load).
pub fn wait_for_parent() {
    let mut line = String::new();
    // An error or EOF means the parent is gone; the child then simply goes on.
    let _ = std::io::stdin().read_line(&mut line);
}

/// Runs the child test `test` once with `env`. It is killed when it has printed `kill_after`
/// effect lines (0: as soon as it is ready), unless it finishes first. After each effect line
/// it is not killed for, the child is told to go on ([`wait_for_parent`]).
pub fn run_child(test: &str, env: &[(&str, String)], kill_after: u64) -> Run {
    let mut child = Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut go_on = child.stdin.take();
    let (mut effects, mut kill_sent, mut finished) = (0, false, false);
    // Read to the end even after the kill: a child that finished first must not die of a
    // closed pipe, and its done line decides how it ended.
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child stdout line");
        if line.contains(DONE) {
            finished = true;
        }
        let counted = if line.contains(EFFECT) {
            effects += 1;
            true
        } else {
            line.contains(READY)
        };
        if counted && !kill_sent && !finished && effects >= kill_after {
            child.kill().expect("SIGKILL the child");
            kill_sent = true;
            go_on = None;
        } else if line.contains(EFFECT)
            && let Some(stdin) = go_on.as_mut()
        {
            // A child that has finished or died no longer reads; that is not an error here.
            let _ = stdin.write_all(b"\n").and_then(|()| stdin.flush());
        }
    }
    let status = child.wait().expect("wait for the child");
    match (status.signal(), status.success() && finished) {
        (Some(9), _) if kill_sent => Run::Killed,
        (_, true) => Run::Finished,
        _ => panic!("the child {test} exited with {status} (done: {finished})"),
    }
}

/// xorshift64: reproducible kill points from a printed seed, without a dependency.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn below(&mut self, bound: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % bound
    }
}

/// What an effect line reports: a step body or a compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Step,
    Comp,
}

/// An effect's identity: what ran, in which saga, for which step.
pub type Key = (Kind, String, u32);

/// How often each key ran.
pub fn count(keys: impl IntoIterator<Item = Key>) -> HashMap<Key, usize> {
    let mut counts = HashMap::new();
    for key in keys {
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Appends one line with a single O_APPEND write, so that lines of concurrent steps never
/// interleave.
pub fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    OpenOptions::new().create(true).append(true).open(path)?.write_all(format!("{line}\n").as_bytes())
}

/// The lines of a file written by [`append_line`]; none if it does not exist. A torn last line
/// fails the test: an effect must be written whole before it is reported.
pub fn read_lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            assert!(text.is_empty() || text.ends_with('\n'), "torn line in {}", path.display());
            text.lines().map(str::to_owned).collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

/// A journal, one event a line with its time, for failure messages.
pub fn format_journal(history: &[RecordedEvent]) -> String {
    history.iter().fold(String::new(), |mut out, r| {
        let _ = writeln!(out, "  {:>3} {:>13} {:?}", r.seq, r.at.0, r.event);
        out
    })
}

/// Nothing whose end a journal recorded (`settled`, with how often it had run then) ran again.
pub fn check_not_rerun(
    counts: &HashMap<Key, usize>,
    settled: &HashMap<Key, usize>,
    journal: impl Fn(&str) -> String,
) {
    for (key, before) in settled {
        let now = counts.get(key).copied().unwrap_or(0);
        assert_eq!(
            now,
            *before,
            "{key:?} ran again after its end was recorded; journal:\n{}",
            journal(&key.1)
        );
    }
}

/// The attempts of one step or compensation that ran, in file order, against those the journal
/// started. An attempt is journaled before it runs, so none may run twice or unjournaled; once
/// the thing has `finished`, its recorded end belongs to the last attempt journaled, which ran.
pub fn check_attempts(what: &str, ran: &[u32], journaled: &[u32], finished: bool, journal: &str) {
    assert!(ran.windows(2).all(|w| w[0] < w[1]), "{what} ran attempts {ran:?}; journal:\n{journal}");
    assert!(
        ran.iter().all(|a| journaled.contains(a)),
        "{what} ran attempts {ran:?}, journaled {journaled:?}; journal:\n{journal}"
    );
    if finished {
        assert_eq!(ran.last(), journaled.iter().max(), "{what}: last attempt; journal:\n{journal}");
    }
}

/// Adds to `settled` each step and compensation of `saga` whose end `history` records, with how
/// often it has run so far (`counts`): none of them may run again. Each must have run at least
/// once; `silent` steps leave no effect lines and are skipped.
pub fn settle(
    saga: &str,
    history: &[RecordedEvent],
    counts: &HashMap<Key, usize>,
    silent: impl Fn(u32) -> bool,
    settled: &mut HashMap<Key, usize>,
) {
    for recorded in history {
        let key = match recorded.event {
            Event::StepCompleted { step, .. } | Event::StepFailed { step, .. } if !silent(step) => {
                (Kind::Step, saga.to_owned(), step)
            }
            Event::CompensationCompleted { step } if !silent(step) => (Kind::Comp, saga.to_owned(), step),
            _ => continue,
        };
        let ran = counts.get(&key).copied().unwrap_or(0);
        assert!(
            ran > 0,
            "{key:?} is recorded as finished but never ran; journal:\n{}",
            format_journal(history)
        );
        settled.insert(key, ran);
    }
}
