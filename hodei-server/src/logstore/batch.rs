//! One write's arguments, and the parts of its bytes that fall between two stream offsets.

use prost::bytes::Bytes;

use super::error::LogStoreError;
use super::stream::LogStream;

/// Where a batch of `len` bytes at `offset` ends, refused if past `u64::MAX`.
pub(super) fn batch_end(job: &str, stream: LogStream, offset: u64, len: usize) -> Result<u64, LogStoreError> {
    u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .ok_or_else(|| LogStoreError::OffsetOverflow { job: job.to_owned(), stream, offset, len })
}

/// One write's arguments.
pub(super) struct Batch<'a> {
    pub(super) job: &'a str,
    pub(super) stream: LogStream,
    pub(super) offset: u64,
    pub(super) end: u64,
    pub(super) bytes: &'a Bytes,
}

impl Batch<'_> {
    fn index(&self, at: u64) -> usize {
        usize::try_from(at.max(self.offset).min(self.end) - self.offset).unwrap_or(0)
    }

    /// The batch's bytes between two stream offsets (clamped to the batch).
    pub(super) fn slice(&self, from: u64, to: u64) -> &[u8] {
        self.bytes.get(self.index(from)..self.index(to)).unwrap_or_default()
    }

    /// The same as [`Batch::slice`], sharing the batch's buffer instead of borrowing it.
    pub(super) fn range(&self, from: u64, to: u64) -> Bytes {
        let (from, to) = (self.index(from), self.index(to));
        if from < to { self.bytes.slice(from..to) } else { Bytes::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_slices_clamp_to_the_batch() {
        let bytes = Bytes::from_static(b"abcd");
        let batch = Batch { job: "j", stream: LogStream::Stdout, offset: 10, end: 14, bytes: &bytes };
        assert_eq!(batch.slice(12, 20), b"cd");
        assert_eq!(batch.range(12, 20), &b"cd"[..]);
        assert!(batch.range(14, 20).is_empty());
        assert_eq!(batch.slice(0, 11), b"a");
        assert_eq!(batch.slice(14, 14), b"");
    }
}
