//! The stored record format, and the serde codec for user payloads.
//!
//! Every stored record is an envelope: `[format: u8][crc32 of body: u32 LE][body]`, the body
//! being bincode over serde. The format byte lets the codec change later without a migration
//! of old records; the checksum turns a flipped or truncated byte into a typed error instead of
//! a silently different value.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The only record format so far.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) const FORMAT_V1: u8 = 1;
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
const HEADER_LEN: usize = 5;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Encodes a value as a versioned, checksummed record.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) fn encode_record<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = vec![FORMAT_V1, 0, 0, 0, 0];
    bincode::serde::encode_into_std_write(value, &mut out, config()).map_err(|e| e.to_string())?;
    let crc = crc32(&out[HEADER_LEN..]);
    out[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a record written by [`encode_record`]; every failure is a readable reason.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let Some((&format, rest)) = bytes.split_first() else {
        return Err("empty record".into());
    };
    if format != FORMAT_V1 {
        return Err(format!("unknown record format {format} (this build reads format {FORMAT_V1})"));
    }
    if rest.len() < HEADER_LEN - 1 {
        return Err(format!("truncated header: {} bytes", bytes.len()));
    }
    let (crc_bytes, body) = rest.split_at(HEADER_LEN - 1);
    let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let actual = crc32(body);
    if stored != actual {
        return Err(format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"));
    }
    let (value, used) = bincode::serde::decode_from_slice(body, config()).map_err(|e| e.to_string())?;
    if used != body.len() {
        return Err(format!("{} trailing bytes after the record", body.len() - used));
    }
    Ok(value)
}

/// Encodes a user value (saga input, step input or output).
pub(crate) fn encode_payload<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| e.to_string())
}

/// Decodes a user value written by [`encode_payload`].
pub(crate) fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes after the value", bytes.len() - used));
    }
    Ok(value)
}

/// CRC-32 (IEEE), table driven. Small enough that a dependency would cost more than it saves.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip() {
        let bytes = encode_record(&("deploy", 7u64, vec![1u8, 2, 3])).unwrap();
        assert_eq!(bytes[0], FORMAT_V1);
        let back: (String, u64, Vec<u8>) = decode_record(&bytes).unwrap();
        assert_eq!(back, ("deploy".to_string(), 7, vec![1, 2, 3]));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = encode_record(&("deploy", 7u64, vec![9u8; 40])).unwrap();
        for len in 0..bytes.len() {
            assert!(decode_record::<(String, u64, Vec<u8>)>(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode_record(&("deploy", 7u64)).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut corrupt = bytes.clone();
            corrupt[i / 8] ^= 1 << (i % 8);
            assert!(decode_record::<(String, u64)>(&corrupt).is_err(), "bit {i}");
        }
    }

    #[test]
    fn unknown_format_is_named() {
        let mut bytes = encode_record(&1u8).unwrap();
        bytes[0] = 9;
        let err = decode_record::<u8>(&bytes).unwrap_err();
        assert!(err.contains("unknown record format 9"), "{err}");
    }
}
