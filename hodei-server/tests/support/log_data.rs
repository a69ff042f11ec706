//! What the log store's tests write and read back: reproducible bytes, numbered lines, and a
//! stream read whole. Shared by `tests/logstore.rs` and `tests/logstore_shared.rs`.

#![allow(dead_code)]

use hodei_server::logstore::{LogStore, LogStream};

/// splitmix64: deterministic, so a failure reproduces from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The next batch an agent sends of a source of `len` bytes of which `acked` are
/// acknowledged: from there, or one time in four a resend from up to 16 KiB before.
pub fn next_batch(rng: &mut Rng, acked: usize, len: usize) -> (usize, usize) {
    let start =
        if rng.below(4) == 0 { acked - rng.below(acked.min(16 * 1024) as u64 + 1) as usize } else { acked };
    (start, (start + 1 + rng.below(8192) as usize).min(len))
}

/// Lines `<seq> <payload>\n` whose payloads hold arbitrary bytes other than newline.
pub fn numbered_lines(count: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for seq in 0..count {
        out.extend_from_slice(format!("{seq:08} ").as_bytes());
        for _ in 0..rng.below(40) {
            let byte = rng.below(256) as u8;
            out.push(if byte == b'\n' { 0xFF } else { byte });
        }
        out.push(b'\n');
    }
    out
}

/// Everything a reader gets from offset 0 on, in `piece`-sized reads.
pub async fn read_all(store: &LogStore, job: &str, stream: LogStream, piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let chunk = store.read(job, stream, offset, piece).await.expect("read");
        assert_eq!(chunk.offset, offset);
        if chunk.bytes.is_empty() {
            return out;
        }
        out.extend_from_slice(&chunk.bytes);
        offset = chunk.next_offset;
    }
}
