//! The last lines of a failed job's output, for its error.

use crate::logstore::{LogStore, LogStream};

/// Lines of each stream a failed job's error shows, at most.
const TAIL_LINES: usize = 10;
/// Bytes read from the end of each stream to find them.
const TAIL_BYTES: u64 = 4096;

/// The last [`TAIL_LINES`] lines of the job's stderr, then of its stdout, each under a heading;
/// empty when both are empty or cannot be read (the error is then the result alone).
pub(super) async fn output_tail(logs: &LogStore, job_id: &str) -> String {
    let Ok(status) = logs.status(job_id).await else { return String::new() };
    let mut tail = String::new();
    for stream in [LogStream::Stderr, LogStream::Stdout] {
        let end = status.stream(stream).end;
        let from = end.saturating_sub(TAIL_BYTES);
        let Ok(chunk) = logs.read(job_id, stream, from, TAIL_BYTES as usize).await else { continue };
        let text = String::from_utf8_lossy(&chunk.bytes);
        let mut lines: Vec<&str> = text.lines().collect();
        if from > 0 && !lines.is_empty() {
            // The first line read may be the end of a longer one.
            lines.remove(0);
        }
        let last = &lines[lines.len().saturating_sub(TAIL_LINES)..];
        if last.iter().all(|line| line.trim().is_empty()) {
            continue;
        }
        tail.push_str(&format!("last lines of {stream}:\n"));
        for line in last {
            tail.push_str("  ");
            tail.push_str(line);
            tail.push('\n');
        }
    }
    tail.truncate(tail.trim_end().len());
    tail
}
