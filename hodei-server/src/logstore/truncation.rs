//! The marker a reader gets where a stream was cut at its cap.

use super::stream::LogStream;

/// A stream cut at its cap, as a reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    /// The stream.
    pub stream: LogStream,
    /// How many bytes were stored before the cut.
    pub at: u64,
    /// How many bytes were dropped after it (so far, unless `final_count`).
    pub dropped: u64,
    /// The log is closed, so `dropped` will not grow.
    pub final_count: bool,
}

impl Truncation {
    /// The marker line a reader gets where the stream was cut.
    pub fn marker(&self) -> String {
        let so_far = if self.final_count { "" } else { " so far" };
        format!(
            "\n[hodei: {} truncated at {} bytes; {} further bytes dropped{so_far}]\n",
            self.stream, self.at, self.dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_says_where_and_how_much() {
        let cut = Truncation { stream: LogStream::Stdout, at: 100, dropped: 7, final_count: true };
        assert_eq!(cut.marker(), "\n[hodei: stdout truncated at 100 bytes; 7 further bytes dropped]\n");
        let running = Truncation { final_count: false, ..cut };
        assert!(running.marker().ends_with("7 further bytes dropped so far]\n"));
    }
}
