//! A job's `state` file: whether its log is closed, and where each stream was cut.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use tokio::fs;

use super::disk::replace_file;
use super::error::{LogStoreError, io_error};
use super::stream::LogStream;

pub(super) const STATE_FILE: &str = "state";
const STATE_HEADER: &str = "hodei-logstore-state 1";

/// Where a stream was cut, and how far its dropped output reached when this was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cut {
    pub(super) at: u64,
    pub(super) end: u64,
}

/// The contents of a job's `state` file: a header line, `closed <0|1>`, and a line
/// `<stream> <cut> <end>` for each truncated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct StateRecord {
    pub(super) closed: bool,
    pub(super) stdout: Option<Cut>,
    pub(super) stderr: Option<Cut>,
}

impl StateRecord {
    pub(super) fn cut(&self, stream: LogStream) -> Option<Cut> {
        match stream {
            LogStream::Stdout => self.stdout,
            LogStream::Stderr => self.stderr,
        }
    }

    pub(super) fn with_cut(mut self, stream: LogStream, cut: Option<Cut>) -> Self {
        match stream {
            LogStream::Stdout => self.stdout = cut,
            LogStream::Stderr => self.stderr = cut,
        }
        self
    }

    pub(super) fn encode(&self) -> String {
        let mut text = format!("{STATE_HEADER}\nclosed {}\n", u8::from(self.closed));
        for stream in LogStream::ALL {
            if let Some(cut) = self.cut(stream) {
                let _ = writeln!(text, "{stream} {} {}", cut.at, cut.end);
            }
        }
        text
    }

    fn decode(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(STATE_HEADER) {
            return Err(format!("the first line is not `{STATE_HEADER}`"));
        }
        let mut record = Self::default();
        for line in lines {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let number = |s: &str| s.parse::<u64>().map_err(|e| format!("bad number in `{line}`: {e}"));
            match fields.as_slice() {
                ["closed", "0"] => record.closed = false,
                ["closed", "1"] => record.closed = true,
                [name, at, end] => {
                    let stream =
                        LogStream::parse(name).ok_or_else(|| format!("unknown stream in `{line}`"))?;
                    record = record.with_cut(stream, Some(Cut { at: number(at)?, end: number(end)? }));
                }
                [] => {}
                _ => return Err(format!("unknown line `{line}`")),
            }
        }
        Ok(record)
    }
}

pub(super) async fn read_state(dir: &Path) -> Result<StateRecord, LogStoreError> {
    let path = dir.join(STATE_FILE);
    match fs::read(&path).await {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| LogStoreError::CorruptState {
                path: path.clone(),
                reason: "it is not UTF-8".into(),
            })?;
            StateRecord::decode(&text).map_err(|reason| LogStoreError::CorruptState { path, reason })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateRecord::default()),
        Err(e) => Err(io_error("reading", &path)(e)),
    }
}

/// Replaces the state file so that a crash leaves either the old one or the new one.
pub(super) async fn write_state(dir: &Path, record: &StateRecord) -> Result<(), LogStoreError> {
    replace_file(dir, STATE_FILE, record.encode().as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_records_round_trip() {
        let records = [
            StateRecord::default(),
            StateRecord { closed: true, stdout: Some(Cut { at: 10, end: 25 }), stderr: None },
            StateRecord {
                closed: false,
                stdout: None,
                stderr: Some(Cut { at: u64::MAX - 1, end: u64::MAX }),
            },
        ];
        for record in records {
            assert_eq!(StateRecord::decode(&record.encode()), Ok(record));
        }
    }

    #[test]
    fn corrupt_state_records_are_refused() {
        for text in
            ["", "closed 1\n", "hodei-logstore-state 1\nclosed 2\n", "hodei-logstore-state 1\nstdout 1\n"]
        {
            assert!(StateRecord::decode(text).is_err(), "{text:?}");
        }
        assert!(StateRecord::decode("hodei-logstore-state 1\nstderr x 2\n").is_err());
    }
}
