//! The encodings a secret may appear in: base64 (standard and URL-safe, padded or as the part
//! that does not depend on its neighbours), percent-encoding and JSON strings as the common encoders write them. The masker looks
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

/// How one JSON encoder writes a string. RFC 8259 leaves these choices open and encoders differ,
/// so a secret is masked in every combination (most values read the same in all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct JsonStyle {
    /// Backspace and form feed as `\b` and `\f` (serde_json, JavaScript, Python, Go since 1.22)
    /// rather than `\u0008` and `\u000c`.
    pub short_controls: bool,
    /// `<`, `>`, `&`, U+2028 and U+2029 as `\u003c`, `\u003e`, `\u0026`, `\u2028`, `\u2029`:
    /// Go's `encoding/json` by default, so that the JSON is safe inside HTML.
    pub html_safe: bool,
    /// Every non-ASCII character as `\uXXXX`, those beyond the BMP as a surrogate pair: Python's
    /// `json.dumps` by default (`ensure_ascii`).
    pub ascii_only: bool,
}

impl JsonStyle {
    pub(super) const ALL: [JsonStyle; 8] = {
        let mut all = [JsonStyle { short_controls: false, html_safe: false, ascii_only: false }; 8];
        let mut i = 0;
        while i < 8 {
            all[i] = JsonStyle { short_controls: i & 1 != 0, html_safe: i & 2 != 0, ascii_only: i & 4 != 0 };
            i += 1;
        }
        all
    };
}

/// `value` as the contents of a JSON string written in `style`. A value that is not UTF-8 is
/// written only as a lenient encoder does, its other bytes passed through, with neither HTML nor
/// ASCII escaping: encoders that escape characters replace what is not one (`None`).
pub(super) fn json_escape(value: &[u8], style: JsonStyle) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(value.len());
    match std::str::from_utf8(value) {
        Ok(text) => text.chars().for_each(|c| json_escape_char(c, style, &mut out)),
        Err(_) if style.ascii_only || style.html_safe => return None,
        Err(_) => {
            for &b in value {
                if b.is_ascii() {
                    json_escape_char(char::from(b), style, &mut out);
                } else {
                    out.push(b);
                }
            }
        }
    }
    Some(out)
}

fn json_escape_char(c: char, style: JsonStyle, out: &mut Vec<u8>) {
    match c {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        '\n' => out.extend_from_slice(b"\\n"),
        '\r' => out.extend_from_slice(b"\\r"),
        '\t' => out.extend_from_slice(b"\\t"),
        '\u{8}' if style.short_controls => out.extend_from_slice(b"\\b"),
        '\u{c}' if style.short_controls => out.extend_from_slice(b"\\f"),
        '\0'..='\u{1f}' => json_unicode_escape(c as u16, out),
        '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if style.html_safe => json_unicode_escape(c as u16, out),
        _ if style.ascii_only && !c.is_ascii() => {
            for unit in c.encode_utf16(&mut [0; 2]) {
                json_unicode_escape(*unit, out);
            }
        }
        _ => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
    }
}

/// `\uXXXX`, lowercase as every encoder named above writes it.
fn json_unicode_escape(unit: u16, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\u");
    out.extend((0..4).rev().map(|nibble| HEX[usize::from((unit >> (4 * nibble)) & 15)]));
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
        let plain = JsonStyle { short_controls: false, html_safe: false, ascii_only: false };
        let short = JsonStyle { short_controls: true, ..plain };
        let go = JsonStyle { short_controls: true, html_safe: true, ..plain };
        let python = JsonStyle { short_controls: true, ascii_only: true, ..plain };
        let json = |value: &[u8], style| json_escape(value, style).unwrap();
        assert_eq!(json(b"a\"b\\c\nd\x01", plain), b"a\\\"b\\\\c\\nd\\u0001");
        assert_eq!(json(b"\x08\x0c\x0b", plain), b"\\u0008\\u000c\\u000b");
        assert_eq!(json(b"\x08\x0c\x0b", short), b"\\b\\f\\u000b");
        // What Go's json.Marshal("<a&b>\u2028") and Python's json.dumps("é😀") print.
        assert_eq!(json("<a&b>\u{2028}".as_bytes(), go), b"\\u003ca\\u0026b\\u003e\\u2028");
        assert_eq!(json("é😀".as_bytes(), python), b"\\u00e9\\ud83d\\ude00");
        assert_eq!(json("é😀".as_bytes(), go), "é😀".as_bytes());
        assert_eq!(json_escape(b"\xff<", python), None);
        assert_eq!(json_escape(b"\xff<", go), None);
        assert_eq!(json(b"\xff<\x08", short), b"\xff<\\b");
        assert_eq!(JsonStyle::ALL.iter().collect::<std::collections::HashSet<_>>().len(), 8);
    }
}
