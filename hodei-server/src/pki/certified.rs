//! Which workers hold a certificate from this CA, and until when, persisted next to it.
//!
//! A control plane restarted after a crash finds workers its predecessor provisioned. One that
//! registered holds a certificate, reconnects by itself, and may be running a job; one that had
//! not registered yet never will (its token died with the old control plane) and runs nothing,
//! since jobs are assigned only over mutual TLS. This record tells them apart.
//!
//! The file, [`CERTIFIED_FILE`], is a header line then one `<worker id> <not after>` line per
//! certificate issued (the end of its validity, in seconds since the Unix epoch), appended and
//! synced before the certificate is handed out, so that a worker holding a certificate is always
//! in it. A line cut short by a crash (no final newline) belongs to a certificate never handed
//! out: it is dropped. Lines of certificates that have expired, and those a rotation superseded,
//! are dropped whenever the file is rewritten (atomically): at open, once it has grown to twice
//! its live entries (plus some slack), and after a failed append.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{PkiError, Result, io_error, validate_worker_id};

/// The record of certified workers in the PKI directory.
pub const CERTIFIED_FILE: &str = "certified.txt";

/// The first line: the format and its version. Another version is refused, not guessed at.
const HEADER: &str = "hodei certified workers v1";
const HEADER_PREFIX: &str = "hodei certified workers ";

/// Rewrites stay rare: only once the file holds this many lines more than twice the live ones.
const SLACK_LINES: usize = 64;

#[derive(Debug)]
pub(super) struct Certified {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The latest end of validity of each worker's certificates.
    until: HashMap<String, u64>,
    /// Entry lines in the file.
    lines: usize,
    /// The file is rewritten, with expired entries dropped, once it holds this many lines.
    compact_at: usize,
    /// Open for appending, once the file exists and is whole.
    file: Option<File>,
    /// The file must be rewritten before anything is appended: it does not exist yet, ends with
    /// a torn line, or an append failed midway.
    rewrite: bool,
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

impl Certified {
    /// Loads the record from `dir`; no file is an empty record. Entries that expired by `now`
    /// are forgotten.
    pub(super) fn load(dir: &Path, now: SystemTime) -> Result<Self> {
        let path = dir.join(CERTIFIED_FILE);
        let mut state = State { rewrite: true, ..State::default() };
        if let Some(text) = crate::files::read_optional(&path)? {
            state = parse(&text, &path)?;
        }
        let certified = Self { path, state: Mutex::new(state) };
        {
            let mut state = certified.lock();
            let before = state.until.len();
            state.until.retain(|_, until| *until >= seconds(now));
            if state.until.len() < before || state.lines > state.until.len() {
                state.rewrite = true;
            }
            if state.rewrite && state.lines > 0 {
                certified.rewrite(&mut state)?;
            }
            state.compact_at = 2 * state.until.len() + SLACK_LINES;
        }
        Ok(certified)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `worker_id` holds a certificate valid until `not_after`, durably, before
    /// returning.
    pub(super) fn record(&self, worker_id: &str, not_after: SystemTime, now: SystemTime) -> Result<()> {
        let not_after = seconds(not_after);
        let mut state = self.lock();
        let previous = state.until.get(worker_id).copied();
        if previous.is_some_and(|previous| previous >= not_after) {
            // A rotation never shortens; an equal one is recorded already.
            return Ok(());
        }
        if state.lines >= state.compact_at {
            // Mostly lines of expired certificates, or of rotations, by now: a rewrite keeps one
            // line per live entry.
            let now = seconds(now);
            state.until.retain(|_, until| *until >= now);
            state.rewrite = true;
        }
        state.until.insert(worker_id.to_owned(), not_after);
        let result = if state.rewrite {
            self.rewrite(&mut state)
        } else {
            self.append(&mut state, worker_id, not_after)
        };
        if result.is_err() {
            // Not durable, so not recorded: the caller hands out no certificate.
            match previous {
                Some(previous) => state.until.insert(worker_id.to_owned(), previous),
                None => state.until.remove(worker_id),
            };
        }
        result
    }

    fn append(&self, state: &mut State, worker_id: &str, not_after: u64) -> Result<()> {
        if state.file.is_none() {
            let file =
                OpenOptions::new().append(true).open(&self.path).map_err(io_error("open", &self.path))?;
            state.file = Some(file);
        }
        let Some(file) = state.file.as_mut() else { return Ok(()) };
        let written =
            file.write_all(format!("{worker_id} {not_after}\n").as_bytes()).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // Part of the line may be in the file: the next record rewrites it whole.
            state.file = None;
            state.rewrite = true;
            return Err(io_error("append to", &self.path)(e));
        }
        state.lines += 1;
        Ok(())
    }

    /// Replaces the file with the live entries, atomically.
    fn rewrite(&self, state: &mut State) -> Result<()> {
        let mut entries: Vec<(&String, &u64)> = state.until.iter().collect();
        entries.sort();
        let mut text = format!("{HEADER}\n");
        for (id, until) in entries {
            text.push_str(&format!("{id} {until}\n"));
        }
        if let Some(dir) = self.path.parent() {
            crate::files::create_private_dir(dir)?;
        }
        state.file = None;
        crate::files::write_atomically(&self.path, text.as_bytes(), 0o600)?;
        state.lines = state.until.len();
        state.compact_at = 2 * state.lines + SLACK_LINES;
        state.rewrite = false;
        Ok(())
    }

    /// Whether `worker_id` holds a certificate still valid at `now`: as at the handshake, in
    /// whole seconds, up to and including its last second.
    pub(super) fn holds_certificate(&self, worker_id: &str, now: SystemTime) -> bool {
        self.lock().until.get(worker_id).is_some_and(|until| *until >= seconds(now))
    }

    /// When the last certificate of `worker_id` recorded expires.
    #[cfg(test)]
    fn until(&self, worker_id: &str) -> Option<SystemTime> {
        let until = *self.lock().until.get(worker_id)?;
        UNIX_EPOCH.checked_add(std::time::Duration::from_secs(until))
    }
}

/// Reads the file's text. A last line without its newline was being appended when the process
/// died: it is left out, and the file marked for a rewrite.
fn parse(text: &str, path: &Path) -> Result<State> {
    let mut state = State::default();
    let whole = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    state.rewrite = whole.len() != text.len();
    let mut lines = whole.lines();
    let corrupt = |number: usize, reason: String| PkiError::CorruptFile {
        path: path.to_owned(),
        reason: format!(
            "line {number}: {reason} (remove the file to start over: workers of earlier runs then \
             count as never registered, and are destroyed rather than adopted)"
        ),
    };
    match lines.next() {
        // Empty, or the header itself was cut short: nothing was ever recorded.
        None => {
            state.rewrite = true;
            return Ok(state);
        }
        Some(HEADER) => {}
        Some(other) if other.starts_with(HEADER_PREFIX) => {
            return Err(corrupt(1, format!("{other:?} is a format this version does not read")));
        }
        Some(other) => return Err(corrupt(1, format!("{other:?} is not the header {HEADER:?}"))),
    }
    for (index, line) in lines.enumerate() {
        let number = index + 2;
        let (id, until) = line
            .split_once(' ')
            .ok_or_else(|| corrupt(number, format!("{line:?} is not `<worker id> <not after>`")))?;
        validate_worker_id(id).map_err(|e| corrupt(number, e.to_string()))?;
        let until: u64 = until.parse().map_err(|_| corrupt(number, format!("{until:?} is not a time")))?;
        let entry = state.until.entry(id.to_owned()).or_default();
        *entry = (*entry).max(until);
        state.lines += 1;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(CERTIFIED_FILE)).unwrap()
    }

    #[test]
    fn entries_survive_a_reload_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let certified = Certified::load(dir.path(), now()).unwrap();
        assert!(!dir.path().join(CERTIFIED_FILE).exists(), "nothing written before a record");
        certified.record("w-1", now() + HOUR, now()).unwrap();
        certified.record("w-2", now() + 2 * HOUR, now()).unwrap();
        // A rotation extends; an older certificate never shortens.
        certified.record("w-1", now() + 3 * HOUR, now()).unwrap();
        certified.record("w-1", now() + HOUR, now()).unwrap();
        assert_eq!(certified.until("w-1"), Some(now() + 3 * HOUR));

        let reloaded = Certified::load(dir.path(), now()).unwrap();
        assert!(reloaded.holds_certificate("w-1", now()));
        assert!(reloaded.holds_certificate("w-2", now()));
        assert!(!reloaded.holds_certificate("w-3", now()));
        assert!(reloaded.holds_certificate("w-2", now() + 2 * HOUR), "its last second");
        assert!(!reloaded.holds_certificate("w-2", now() + 2 * HOUR + Duration::from_secs(1)), "expired");
        assert_eq!(reloaded.until("w-1"), Some(now() + 3 * HOUR));

        // Reopened after w-2's certificate expired: it is forgotten, and the file compacted.
        let later = Certified::load(dir.path(), now() + 2 * HOUR + Duration::from_secs(1)).unwrap();
        assert!(!later.holds_certificate("w-2", now()));
        assert!(later.holds_certificate("w-1", now() + 3 * HOUR));
        assert_eq!(text(dir.path()), format!("{HEADER}\nw-1 {}\n", seconds(now() + 3 * HOUR)));
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_file_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let until = seconds(now() + HOUR);
        std::fs::write(dir.path().join(CERTIFIED_FILE), format!("{HEADER}\nw-1 {until}\nw-2 {}", until / 10))
            .unwrap();
        let certified = Certified::load(dir.path(), now()).unwrap();
        assert!(certified.holds_certificate("w-1", now()));
        assert!(!certified.holds_certificate("w-2", now()));
        certified.record("w-3", now() + HOUR, now()).unwrap();
        assert_eq!(text(dir.path()), format!("{HEADER}\nw-1 {until}\nw-3 {until}\n"));

        // A header cut short: nothing was recorded yet.
        std::fs::write(dir.path().join(CERTIFIED_FILE), &HEADER[..5]).unwrap();
        let certified = Certified::load(dir.path(), now()).unwrap();
        certified.record("w-4", now() + HOUR, now()).unwrap();
        assert_eq!(text(dir.path()), format!("{HEADER}\nw-4 {until}\n"));
    }

    #[test]
    fn another_version_or_a_bad_line_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        for (bad, line) in [
            ("hodei certified workers v2\nw-1 5\n", "line 1"),
            ("certified\n", "line 1"),
            (&format!("{HEADER}\nw-1\n"), "line 2"),
            (&format!("{HEADER}\nw-1 5\na/b 5\n"), "line 3"),
            (&format!("{HEADER}\nw-1 soon\n"), "line 2"),
        ] {
            std::fs::write(dir.path().join(CERTIFIED_FILE), bad).unwrap();
            let err = Certified::load(dir.path(), now()).unwrap_err();
            assert!(
                matches!(err, PkiError::CorruptFile { ref reason, .. } if reason.starts_with(line)),
                "{err}"
            );
        }
    }

    #[test]
    fn the_file_is_compacted_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let certified = Certified::load(dir.path(), now()).unwrap();
        // Short-lived workers, one after the other: each expired before the next.
        for n in 0..200u64 {
            let at = now() + Duration::from_secs(10 * n);
            certified.record(&format!("w-{n}"), at + Duration::from_secs(5), at).unwrap();
        }
        let lines = text(dir.path()).lines().count();
        assert!(lines <= 2 + 2 * SLACK_LINES, "{lines} lines");
        assert!(certified.holds_certificate("w-199", now() + Duration::from_secs(1990)));
    }
}
