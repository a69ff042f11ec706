//! Streaming secret masking.
//!
//! One Aho-Corasick automaton (leftmost-longest) covers every secret and every derived form of
//! it, so the cost per output byte does not grow with the number of secrets.

use std::fmt;

use aho_corasick::{AhoCorasick, MatchKind};

use super::encoding::{
    BASE64_STANDARD, BASE64_URL_SAFE, JsonStyle, base64_aligned, json_escape, percent_encode,
};
use super::error::RunnerError;
use super::spec::Secrets;

/// What every masked occurrence is replaced with.
pub const MASK: &[u8] = b"***";

/// Derived forms (encodings, single lines) shorter than this are not masked: fragments that short
/// turn up by chance in ordinary output (hashes, ids, base64 blobs), so masking them would garble
/// unrelated logs while hiding almost nothing. The raw value is always masked, whatever its
/// length.
pub const MIN_DERIVED_LEN: usize = 6;

/// Replaces secrets in a byte stream that arrives in arbitrary chunks.
///
/// Masked are, for each non-empty secret value:
/// - the value itself;
/// - each line of a multi-line value (without its `\r`), so that a value printed line by line
///   with other text between, or re-wrapped with CRLF, is still hidden;
/// - its base64 encoding, standard and URL-safe alphabets, at each of the three alignments the
///   value can have inside a longer encoded string (as in HTTP basic auth `user:token`), keeping
///   only the characters fully determined by the value (the GitHub runner's "shifted" base64);
/// - its URL (percent) encoding, uppercase hex, every byte outside `A-Za-z0-9-._~` escaped;
/// - its JSON string escaping (`\"`, `\\`, `\n`, `\r`, `\t`, `\u00XX`) in each way common encoders
///   differ: backspace and form feed as `\b`, `\f` or as `\u0008`, `\u000c`; `<`, `>`, `&`,
///   U+2028 and U+2029 escaped as Go writes them for HTML or not; non-ASCII characters as
///   `\uXXXX` as Python writes them or not.
///
/// Derived forms shorter than [`MIN_DERIVED_LEN`] are skipped. A derived form is only found
/// where it appears as such: a value printed as hex, or piped through some other transformation,
/// is not recognised.
///
/// Every occurrence of every form is found, overlapping ones included, and each run of
/// overlapping occurrences becomes one [`MASK`]: two secrets that share bytes (`abcdef`,
/// `defghi` in `abcdefghi`) leave nothing of either visible.
///
/// Streaming: bytes that could still be the start of an occurrence (from the first position
/// whose suffix is a proper prefix of some pattern) are held back until the next chunk or
/// [`finish`](Self::finish); everything before them is final and emitted. So the output is
/// exactly what masking the whole stream at once would give, wherever the chunk boundaries fall,
/// and fewer than [`max_pattern_len`](Self::max_pattern_len) bytes are ever held.
#[derive(Clone)]
pub struct Masker {
    patterns: Option<Patterns>,
    /// Input not yet final.
    pending: Vec<u8>,
    /// How many leading bytes of `pending` are already hidden by an emitted mask; they are kept
    /// only so that an occurrence starting among them is still found and merged.
    covered: usize,
    scratch: Vec<(usize, usize)>,
}

#[derive(Clone)]
struct Patterns {
    automaton: AhoCorasick,
    list: Vec<Vec<u8>>,
    /// Which bytes begin some pattern: most positions are ruled out by one lookup.
    first_bytes: [bool; 256],
    max_len: usize,
}

impl Masker {
    /// A masker for these secrets. With no (non-empty) secret it passes bytes through.
    pub fn new(secrets: &Secrets) -> Result<Self, RunnerError> {
        let mut list: Vec<Vec<u8>> = secrets.values().flat_map(forms).collect();
        list.sort_unstable();
        list.dedup();
        let patterns = if list.is_empty() {
            None
        } else {
            // Standard match semantics: the only kind that reports overlapping occurrences.
            let automaton = AhoCorasick::builder().match_kind(MatchKind::Standard).build(&list)?;
            let mut first_bytes = [false; 256];
            for p in &list {
                first_bytes[usize::from(p[0])] = true;
            }
            let max_len = list.iter().map(Vec::len).max().unwrap_or(0);
            Some(Patterns { automaton, list, first_bytes, max_len })
        };
        Ok(Self { patterns, pending: Vec::new(), covered: 0, scratch: Vec::new() })
    }

    /// The length of the longest masked pattern (0 without secrets).
    pub fn max_pattern_len(&self) -> usize {
        self.patterns.as_ref().map_or(0, |p| p.max_len)
    }

    /// How many input bytes are held back, waiting to see whether they start a secret.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Takes the next chunk of the stream and appends what is final to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let Some(patterns) = &self.patterns else {
            out.extend_from_slice(chunk);
            return;
        };
        if self.pending.is_empty() {
            // The common case: nothing held, so the chunk is scanned in place, without a copy.
            let (kept, covered) = patterns.scan(chunk, 0, false, &mut self.scratch, out);
            self.pending.extend_from_slice(&chunk[kept..]);
            self.covered = covered;
        } else {
            self.pending.extend_from_slice(chunk);
            let (kept, covered) = patterns.scan(&self.pending, self.covered, false, &mut self.scratch, out);
            self.pending.drain(..kept);
            self.covered = covered;
        }
    }

    /// Ends the stream: appends everything still held, masked, to `out`. The masker can then
    /// take a new stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(patterns) = &self.patterns {
            patterns.scan(&self.pending, self.covered, true, &mut self.scratch, out);
        }
        super::spec::wipe(&mut self.pending);
        self.pending.clear();
        self.covered = 0;
    }
}

impl Patterns {
    /// Appends the final part of `buf` to `out`, masked, given that its first `covered` bytes
    /// are already hidden. Returns where the part still held begins and how much of it is
    /// hidden.
    fn scan(
        &self,
        buf: &[u8],
        covered: usize,
        at_end: bool,
        scratch: &mut Vec<(usize, usize)>,
        out: &mut Vec<u8>,
    ) -> (usize, usize) {
        let hold = if at_end { buf.len() } else { self.hold_point(buf) };
        // Occurrences starting before the hold point are all known, and cannot change with more
        // input; those starting at or after it are found again in the next scan.
        scratch.clear();
        scratch.extend(
            self.automaton
                .find_overlapping_iter(buf)
                .map(|m| (m.start(), m.end()))
                .filter(|&(s, _)| s < hold),
        );
        scratch.sort_unstable();
        let mut hidden_to = covered;
        for &(start, end) in scratch.iter() {
            if start < hidden_to {
                hidden_to = hidden_to.max(end);
            } else {
                out.extend_from_slice(&buf[hidden_to..start]);
                out.extend_from_slice(MASK);
                hidden_to = end;
            }
        }
        if hold > hidden_to {
            out.extend_from_slice(&buf[hidden_to..hold]);
        }
        (hold, hidden_to.saturating_sub(hold))
    }

    /// The first position whose suffix is a proper prefix of some pattern: only from there on
    /// can more input turn bytes into (part of) an occurrence.
    fn hold_point(&self, buf: &[u8]) -> usize {
        let earliest = buf.len().saturating_sub(self.max_len - 1);
        (earliest..buf.len())
            .find(|&q| {
                let tail = &buf[q..];
                self.first_bytes[usize::from(tail[0])]
                    && self.list.iter().any(|p| p.len() > tail.len() && p.starts_with(tail))
            })
            .unwrap_or(buf.len())
    }
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The patterns are the secrets: only their shape is shown.
        f.debug_struct("Masker")
            .field("patterns", &self.patterns.as_ref().map_or(0, |p| p.list.len()))
            .field("max_pattern_len", &self.max_pattern_len())
            .field("pending_len", &self.pending.len())
            .finish()
    }
}

impl Drop for Masker {
    fn drop(&mut self) {
        super::spec::wipe(&mut self.pending);
    }
}

impl Drop for Patterns {
    fn drop(&mut self) {
        for p in &mut self.list {
            super::spec::wipe(p);
        }
    }
}

/// Every form of one value that is masked (see [`Masker`]).
fn forms(value: &[u8]) -> Vec<Vec<u8>> {
    if value.is_empty() {
        return Vec::new();
    }
    let mut derived = Vec::new();
    if value.contains(&b'\n') {
        for line in value.split(|&b| b == b'\n') {
            derived.push(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
        }
    }
    for alphabet in [BASE64_STANDARD, BASE64_URL_SAFE] {
        for shift in 0..3 {
            derived.push(base64_aligned(value, shift, alphabet));
        }
    }
    derived.push(percent_encode(value));
    derived.extend(JsonStyle::ALL.iter().filter_map(|&style| json_escape(value, style)));
    derived.retain(|d| d.len() >= MIN_DERIVED_LEN);
    derived.push(value.to_vec());
    derived
}

#[cfg(test)]
mod tests {
    use super::super::encoding::base64_padded;
    use super::*;

    #[test]
    fn shifted_base64_forms_occur_in_encodings_of_longer_strings() {
        let secret = b"s3cr3t-token";
        for prefix in [&b""[..], b"a", b"ab", b"user:", b"xy:"] {
            let mut whole = prefix.to_vec();
            whole.extend_from_slice(secret);
            whole.extend_from_slice(b"@host");
            let mut encoded = Vec::new();
            base64_padded(&whole, &mut encoded);
            let form = base64_aligned(secret, prefix.len() % 3, BASE64_STANDARD);
            assert!(form.len() >= MIN_DERIVED_LEN);
            assert!(
                encoded.windows(form.len()).any(|w| w == form),
                "{:?} not in {:?}",
                String::from_utf8_lossy(&form),
                String::from_utf8_lossy(&encoded)
            );
        }
    }

    fn masked(secrets: &[&[u8]], stream: &[u8]) -> Vec<u8> {
        let mut all = Secrets::new();
        for (i, value) in secrets.iter().enumerate() {
            all.insert(format!("S{i}"), value.to_vec()).unwrap();
        }
        let mut masker = Masker::new(&all).unwrap();
        let mut out = Vec::new();
        masker.feed(stream, &mut out);
        masker.finish(&mut out);
        out
    }

    /// Found by the `masker` fuzz target: a secret with a backspace, printed by serde_json
    /// (`\b`, not `\u0008`), went through unmasked.
    #[test]
    fn json_with_short_escapes_for_backspace_and_form_feed_is_masked() {
        let secret = b"\x01e\x03\0a\0\x08a\x01\0\0\0";
        let printed = br"\u0001e\u0003\u0000a\u0000\ba\u0001\u0000\u0000\u0000";
        assert_eq!(masked(&[secret, b""], &[&printed[..], b"la"].concat()), b"***la");
        assert_eq!(masked(&[b"feed\x0cme"], br#"{"key":"feed\fme"}"#), br#"{"key":"***"}"#);
        assert_eq!(masked(&[b"feed\x0cme"], br#"{"key":"feed\u000cme"}"#), br#"{"key":"***"}"#);
    }

    #[test]
    fn json_as_go_and_python_write_it_is_masked() {
        let secret = "pa<ss>&wörd😀".as_bytes();
        // json.Marshal in Go, json.dumps in Python, and Go's output read back by Python.
        let go = r#"{"password":"pa\u003css\u003e\u0026wörd😀"}"#;
        let python = r#"{"password": "pa<ss>&w\u00f6rd\ud83d\ude00"}"#;
        let both = r#"{"password": "pa\u003css\u003e\u0026w\u00f6rd\ud83d\ude00"}"#;
        assert_eq!(masked(&[secret], go.as_bytes()), br#"{"password":"***"}"#);
        assert_eq!(masked(&[secret], python.as_bytes()), br#"{"password": "***"}"#);
        assert_eq!(masked(&[secret], both.as_bytes()), br#"{"password": "***"}"#);
    }

    #[test]
    fn short_secrets_mask_only_their_raw_value() {
        assert_eq!(forms(b"abc"), vec![b"abc".to_vec()]);
        assert!(forms(b"").is_empty());
    }
}
