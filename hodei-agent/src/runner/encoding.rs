//! The encodings a secret may appear in: base64 (standard and URL-safe, padded or as the part
//! that does not depend on its neighbours), percent-encoding and JSON strings. The masker looks
//! for each; the stdin header of a program that is not a shell uses padded base64.

pub(super) const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
pub(super) const BASE64_URL_SAFE: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The characters of the base64 encoding of `value` that do not depend on its neighbours, when
/// it starts `shift` bytes into a 3-byte group.
pub(super) fn base64_aligned(value: &[u8], shift: usize, alphabet: &[u8; 64]) -> Vec<u8> {
    let prefix = [0u8; 2];
    let mut complete = Vec::new();
    base64_complete_chars(prefix[..shift].iter().chain(value).copied(), alphabet, &mut complete);
    // Characters carrying any bit of the prefix are dropped: ceil(8 * shift / 6) of them.
    let skip = (8 * shift).div_ceil(6);
    complete.get(skip..).map(<[u8]>::to_vec).unwrap_or_default()
}

/// Base64 characters whose six bits all come from `bytes`; the trailing partial one is left out.
fn base64_complete_chars(bytes: impl Iterator<Item = u8>, alphabet: &[u8; 64], out: &mut Vec<u8>) {
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(alphabet[((acc >> bits) & 63) as usize]);
        }
        acc &= (1 << bits) - 1;
    }
}

/// Appends standard padded base64, as written in the stdin header, to `out`.
pub(super) fn base64_padded(value: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    base64_complete_chars(value.iter().copied(), BASE64_STANDARD, out);
    // The trailing partial character, then padding to a multiple of four.
    let rem_bits = (value.len() * 8) % 6;
    if rem_bits != 0 {
        let last = value[value.len() - 1];
        let low = u32::from(last) & ((1 << rem_bits) - 1);
        out.push(BASE64_STANDARD[(low << (6 - rem_bits)) as usize]);
    }
    while !(out.len() - start).is_multiple_of(4) {
        out.push(b'=');
    }
}

pub(super) fn percent_encode(value: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    out
}

/// How a JSON encoder writes backspace and form feed: RFC 8259 allows either, and encoders
/// differ (serde_json, JavaScript's and Python's write the short escapes, others `\u00XX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum JsonControls {
    /// `\b` and `\f`.
    Short,
    /// `\u0008` and `\u000c`, like every other control character.
    Unicode,
}

pub(super) fn json_escape(value: &[u8], controls: JsonControls) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 if controls == JsonControls::Short => out.extend_from_slice(b"\\b"),
            0x0C if controls == JsonControls::Short => out.extend_from_slice(b"\\f"),
            0..0x20 => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_padded_matches_known_vectors() {
        for (input, expected) in [
            (&b""[..], &b""[..]),
            (b"f", b"Zg=="),
            (b"fo", b"Zm8="),
            (b"foo", b"Zm9v"),
            (b"foob", b"Zm9vYg=="),
            (b"fooba", b"Zm9vYmE="),
            (b"foobar", b"Zm9vYmFy"),
            (&[0xfb, 0xff], b"+/8="),
        ] {
            let mut out = b"x".to_vec();
            base64_padded(input, &mut out);
            assert_eq!(&out[1..], expected, "input {input:?}");
        }
    }

    #[test]
    fn percent_and_json_forms() {
        assert_eq!(percent_encode(b"a b/c~"), b"a%20b%2Fc~");
        assert_eq!(json_escape(b"a\"b\\c\nd\x01", JsonControls::Unicode), b"a\\\"b\\\\c\\nd\\u0001");
        assert_eq!(json_escape(b"\x08\x0c\x0b", JsonControls::Unicode), b"\\u0008\\u000c\\u000b");
        assert_eq!(json_escape(b"\x08\x0c\x0b", JsonControls::Short), b"\\b\\f\\u000b");
    }
}
