//! Job ids escaped into directory names, and back.

use std::fmt::Write as _;

use super::error::LogStoreError;

/// File names longer than this fail on ext4, xfs, btrfs and most others.
const MAX_NAME_LEN: usize = 255;

fn is_plain(byte: u8) -> bool {
    byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_'
}

pub(super) fn encode_job_id(id: &str) -> Result<String, LogStoreError> {
    let invalid = |reason| LogStoreError::InvalidJobId { id: id.to_owned(), reason };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    let mut name = String::with_capacity(id.len());
    for byte in id.bytes() {
        if is_plain(byte) {
            name.push(char::from(byte));
        } else {
            let _ = write!(name, "%{byte:02X}");
        }
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("escaped for the file system it is longer than 255 bytes"));
    }
    Ok(name)
}

/// The job id a directory name stands for, if it is exactly what [`encode_job_id`] makes.
pub(super) fn decode_job_name(name: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = tail.get(2..)?;
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    let id = String::from_utf8(bytes).ok()?;
    // Only the canonical spelling names a job, so that one id has one directory.
    (encode_job_id(&id).ok()? == name).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_escape_to_safe_names_and_back() {
        for id in ["saga-id/3", "../../etc/passwd", ".", "..", "Job A", "ünï/çødé", "a%2Fb", "x\0y"] {
            let name = encode_job_id(id).expect("encodable");
            assert!(name.bytes().all(|b| is_plain(b) || b == b'%' || b.is_ascii_hexdigit()), "{name}");
            assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
            assert_eq!(decode_job_name(&name).as_deref(), Some(id));
        }
        assert_eq!(encode_job_id("saga-id/3").expect("encodable"), "saga-id%2F3");
    }

    #[test]
    fn only_canonical_names_decode() {
        for name in ["saga-id%2f3", "%61", "%+F", "%4", "%", "A", ".lock", "%FF"] {
            assert_eq!(decode_job_name(name), None, "{name}");
        }
    }

    #[test]
    fn empty_and_overlong_ids_are_refused() {
        assert!(matches!(encode_job_id(""), Err(LogStoreError::InvalidJobId { .. })));
        assert!(encode_job_id(&"a".repeat(255)).is_ok());
        assert!(matches!(encode_job_id(&"/".repeat(86)), Err(LogStoreError::InvalidJobId { .. })));
    }
}
