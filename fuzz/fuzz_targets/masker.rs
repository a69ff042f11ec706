//! The secret masker against a reference written from its documentation: every occurrence of
//! every secret and of each of its encodings is masked, overlapping ones as one mask, and
//! nothing else changes, wherever the chunks are cut and whatever the line breaks; and the
//! masker never holds back a whole pattern's worth of output.
//!
//! The reference is deliberately naive (textbook encoders, a search at every position) so that
//! it is obviously right; it shares no code with the masker.
//!
//! Input: the number of secrets (0 to 3), each secret as a length byte and its bytes, the
//! number of chunk sizes (0 to 7) and the sizes, then the stream. In the stream, `0xFF n`
//! stands for form `n / 4` of secret `n % 4` (so that secrets occur without the fuzzer having
//! to guess their encodings), and `0xFF 0xFF` for a literal `0xFF`.

#![no_main]

use hodei_agent::runner::{MASK, MIN_DERIVED_LEN, Masker, Secrets};
use hodei_fuzz::Cursor;
use libfuzzer_sys::fuzz_target;

const BASE64_STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// RFC 4648 base64, padded, one 3-byte group at a time.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
    let mut out = Vec::new();
    for group in bytes.chunks(3) {
        let b = [group[0], *group.get(1).unwrap_or(&0), *group.get(2).unwrap_or(&0)];
        let sextets = [b[0] >> 2, (b[0] & 3) << 4 | b[1] >> 4, (b[1] & 15) << 2 | b[2] >> 6, b[2] & 63];
        for (i, sextet) in sextets.into_iter().enumerate() {
            out.push(if i <= group.len() { alphabet[usize::from(sextet)] } else { b'=' });
        }
    }
    out
}

/// The characters of the base64 of `value`, `shift` bytes into a 3-byte group, that every
/// encoding of a longer string with `value` at that place contains: those whose six bits all
/// come from `value`.
fn shifted_base64(value: &[u8], shift: usize, alphabet: &[u8; 64]) -> Vec<u8> {
    let mut shifted = vec![0; shift];
    shifted.extend_from_slice(value);
    let (first_bit, end_bit) = (8 * shift, 8 * (shift + value.len()));
    base64(&shifted, alphabet)
        .into_iter()
        .enumerate()
        .filter(|&(i, _)| 6 * i >= first_bit && 6 * i + 6 <= end_bit)
        .map(|(_, c)| c)
        .collect()
}

/// RFC 3986 percent-encoding: every byte but the unreserved characters, in upper-case hex.
fn percent_encoded(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// A JSON string's contents as the masker documents them: `\"`, `\\`, `\n`, `\r`, `\t`,
/// backspace and form feed as `\b` and `\f` or not (`short`), and `\u00xx` for the other
/// control characters.
fn json_documented(value: &[u8], short: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in value {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 if short => out.extend_from_slice(b"\\b"),
            0x0c if short => out.extend_from_slice(b"\\f"),
            0..0x20 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

/// A JSON string's contents as serde_json writes them (`\b` and `\f` included), for a value
/// that is text.
fn json_written(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?;
    let quoted = serde_json::to_string(text).ok()?;
    Some(quoted.as_bytes()[1..quoted.len() - 1].to_vec())
}

/// The JSON forms other encoders write, from the two above: Go's, with `<`, `>`, `&`, U+2028 and
/// U+2029 as `\u` escapes, and Python's, with every non-ASCII character as `\u` escapes (UTF-16
/// units), and both together, for a value that is text. An escape never contains those
/// characters, so they can be replaced after escaping.
fn json_other_encoders(escaped: &[u8]) -> Vec<Vec<u8>> {
    let go = |text: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(&b) = rest.first() {
            let (replacement, used): (&[u8], usize) = match b {
                b'<' => (b"\\u003c", 1),
                b'>' => (b"\\u003e", 1),
                b'&' => (b"\\u0026", 1),
                _ if rest.starts_with("\u{2028}".as_bytes()) => (b"\\u2028", 3),
                _ if rest.starts_with("\u{2029}".as_bytes()) => (b"\\u2029", 3),
                _ => (std::slice::from_ref(&rest[0]), 1),
            };
            out.extend_from_slice(replacement);
            rest = &rest[used..];
        }
        out
    };
    let python = |text: &[u8]| -> Vec<u8> {
        let text = std::str::from_utf8(text).expect("the escaping of text");
        let mut out = String::new();
        for c in text.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out.into_bytes()
    };
    vec![go(escaped), python(escaped), python(&go(escaped))]
}

/// Every form of a secret that is masked: the value always; its lines (without `\r`) if it has
/// several; its base64, both alphabets, at the three alignments; its percent-encoding; its JSON
/// escapings; each derived form only from `MIN_DERIVED_LEN` bytes.
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
    let mut url_safe = *BASE64_STANDARD;
    url_safe[62] = b'-';
    url_safe[63] = b'_';
    for alphabet in [BASE64_STANDARD, &url_safe] {
        for shift in 0..3 {
            derived.push(shifted_base64(value, shift, alphabet));
        }
    }
    derived.push(percent_encoded(value));
    let json = [json_documented(value, false), json_documented(value, true)];
    // Only text has the forms of encoders that escape characters, and there serde_json, a
    // real encoder, must agree with the documented short form.
    if let Some(written) = json_written(value) {
        assert_eq!(written, json[1], "serde_json escapes {value:?} otherwise than documented");
        derived.extend(json.iter().flat_map(|escaped| json_other_encoders(escaped)));
    }
    derived.extend(json);
    derived.retain(|form| form.len() >= MIN_DERIVED_LEN);
    derived.push(value.to_vec());
    derived
}

/// `stream` with every occurrence of every pattern replaced, each run of overlapping
/// occurrences by one mask.
fn masked(stream: &[u8], patterns: &[Vec<u8>]) -> Vec<u8> {
    let mut occurrences: Vec<(usize, usize)> = Vec::new();
    for start in 0..stream.len() {
        for pattern in patterns {
            if stream[start..].starts_with(pattern) {
                occurrences.push((start, start + pattern.len()));
            }
        }
    }
    occurrences.sort_unstable();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (start, end) in occurrences {
        match runs.last_mut() {
            Some(run) if start < run.1 => run.1 = run.1.max(end),
            _ => runs.push((start, end)),
        }
    }
    let mut out = Vec::new();
    let mut shown_from = 0;
    for (start, end) in runs {
        out.extend_from_slice(&stream[shown_from..start]);
        out.extend_from_slice(MASK);
        shown_from = end;
    }
    out.extend_from_slice(&stream[shown_from..]);
    out
}

fuzz_target!(|data: &[u8]| {
    let mut input = Cursor::new(data);
    let values: Vec<&[u8]> = (0..input.u8() % 4).map(|_| input.short()).collect();
    let chunk_sizes: Vec<usize> = (0..input.u8() % 8).map(|_| usize::from(input.u8()) + 1).collect();
    let template = input.rest();

    let forms: Vec<Vec<Vec<u8>>> = values.iter().map(|v| forms(v)).collect();
    let mut stream = Vec::new();
    let mut at = 0;
    while at < template.len() {
        match (template[at], template.get(at + 1)) {
            (0xFF, Some(&0xFF)) => stream.push(0xFF),
            (0xFF, Some(&n)) => {
                let of_secret = forms.get(usize::from(n % 4)).filter(|f| !f.is_empty());
                if let Some(secret_forms) = of_secret {
                    stream.extend_from_slice(&secret_forms[usize::from(n / 4) % secret_forms.len()]);
                }
            }
            (b, _) => {
                stream.push(b);
                at += 1;
                continue;
            }
        }
        at += 2;
    }

    let mut secrets = Secrets::new();
    for (i, value) in values.iter().enumerate() {
        secrets.insert(format!("SECRET_{i}"), value.to_vec()).expect("a valid secret name");
    }
    let mut masker = Masker::new(&secrets).expect("a masker");
    let mut out = Vec::new();
    let mut rest = stream.as_slice();
    for size in chunk_sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, after) = rest.split_at((*size).min(rest.len()));
        masker.feed(chunk, &mut out);
        assert!(
            masker.pending_len() < masker.max_pattern_len().max(1),
            "held {} bytes, patterns are at most {}",
            masker.pending_len(),
            masker.max_pattern_len()
        );
        rest = after;
    }
    masker.feed(rest, &mut out);
    masker.finish(&mut out);

    let patterns: Vec<Vec<u8>> = forms.into_iter().flatten().collect();
    let expected = masked(&stream, &patterns);
    assert!(
        out == expected,
        "masked {:?}\n   got {:?}\nwanted {:?}",
        String::from_utf8_lossy(&stream),
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&expected)
    );
});
