//! The stored record format, and the codec of user payloads.
//!
//! **Records.** Every stored record is an envelope: `[format: u8][crc32 of body: u32 LE][body]`,
//! the body being bincode over serde. The format byte lets the codec change later without a
//! migration of old records; the checksum turns a flipped or truncated byte into a typed error
//! instead of a silently different value. Two formats exist, with the same envelope and body
//! encoding; they differ only in what the payload fields of journaled events hold:
//! - [`FORMAT_V1`] (journals written before payloads carried a codec): raw bincode payloads;
//! - [`FORMAT_V2`] (every record written now): payloads as described below.
//!
//! A V1 journal record is read by tagging each of its payload fields as legacy bincode (see
//! `Event::tag_legacy_payloads`), so that above the store every payload looks the same.
//!
//! **Payloads** (saga input and output, step input and output, signal payloads) are
//! `[codec: u8][value]`: codec 1 is JSON, what this build writes, so that an operator can read
//! and write payloads, and a type can gain an optional or `#[serde(default)]` field without
//! stranding runs in flight (JSON names its fields; bincode is positional). Codec 0 is bincode,
//! only ever read, from V1 journals; such a payload decodes only as the type that wrote it.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Journal records whose payloads are raw bincode, with no codec byte. Read, never written.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) const FORMAT_V1: u8 = 1;
/// The record format written now: payloads start with their codec byte.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) const FORMAT_V2: u8 = 2;
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
const HEADER_LEN: usize = 5;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Decodes bincode, refusing any length prefix that claims more than `bytes` could hold.
///
/// bincode allocates a string's bytes from its length prefix before it reads them, so a corrupt
/// prefix (in a record whose checksum still matches, or in a journal file posted to the API)
/// could ask for a terabyte in a few bytes, and abort the process. What a string claims counts
/// against bincode's limit, and every string of a value that decodes lies inside its encoding,
/// so a limit at least the encoding's length refuses nothing that decodes. bincode takes the
/// limit as a type parameter: the smallest of a ladder of limits that covers the length is
/// used, so a prefix can claim at most 64 KiB, or 16 times the bytes it came in.
fn decode_bounded<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), String> {
    fn under<T: DeserializeOwned, const LIMIT: usize>(
        bytes: &[u8],
    ) -> Result<(T, usize), bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(bytes, config().with_limit::<LIMIT>())
    }
    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;
    let decoded = match bytes.len() {
        len if len <= 64 * KIB => under::<T, { 64 * KIB }>(bytes),
        len if len <= MIB => under::<T, MIB>(bytes),
        len if len <= 16 * MIB => under::<T, { 16 * MIB }>(bytes),
        len if len <= 256 * MIB => under::<T, { 256 * MIB }>(bytes),
        _ => under::<T, { usize::MAX }>(bytes),
    };
    decoded.map_err(|e| match e {
        bincode::error::DecodeError::LimitExceeded => {
            format!("a length inside claims more than the {} bytes there are", bytes.len())
        }
        other => other.to_string(),
    })
}

/// Encodes a value as a versioned, checksummed record (always [`FORMAT_V2`]).
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) fn encode_record<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = vec![FORMAT_V2, 0, 0, 0, 0];
    bincode::serde::encode_into_std_write(value, &mut out, config()).map_err(|e| e.to_string())?;
    let crc = crc32(&out[HEADER_LEN..]);
    out[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// `body` in the envelope of `format` with a checksum that matches: a fuzzer cannot forge
/// CRC-32s, and without one its bytes would never get past the envelope to the decoder.
#[cfg(fuzzing)]
pub(crate) fn seal_record(format: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![format];
    out.extend_from_slice(&crc32(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Decodes a record of a type without payload fields (a summary record, a marker): both formats
/// read the same for those. Types with payload fields use [`decode_record_versioned`].
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    decode_record_versioned(bytes).map(|(value, _)| value)
}

/// Decodes a record written by [`encode_record`], or by the code of before [`FORMAT_V2`], with
/// its format: a caller reading payload fields must tag them as legacy when it is
/// [`FORMAT_V1`]. Every failure is a readable reason.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) fn decode_record_versioned<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, u8), String> {
    let Some((&format, rest)) = bytes.split_first() else {
        return Err("empty record".into());
    };
    if format != FORMAT_V1 && format != FORMAT_V2 {
        return Err(format!(
            "unknown record format {format} (this build reads formats {FORMAT_V1} and {FORMAT_V2})"
        ));
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
    let (value, used) = decode_bounded(body)?;
    if used != body.len() {
        return Err(format!("{} trailing bytes after the record", body.len() - used));
    }
    Ok((value, format))
}

/// How a payload's value is encoded: its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PayloadCodec {
    /// bincode (standard configuration), as journals written before JSON payloads hold them.
    /// Positional: it decodes only as the type that wrote it, and cannot be shown without it.
    LegacyBincode,
    /// JSON: what the engine writes.
    Json,
}

impl PayloadCodec {
    const LEGACY_BINCODE_TAG: u8 = 0;
    const JSON_TAG: u8 = 1;

    fn tag(self) -> u8 {
        match self {
            PayloadCodec::LegacyBincode => Self::LEGACY_BINCODE_TAG,
            PayloadCodec::Json => Self::JSON_TAG,
        }
    }

    /// Splits a payload into its codec and its encoded value.
    fn split(payload: &[u8]) -> Result<(Self, &[u8]), PayloadError> {
        match payload.split_first() {
            None => Err(PayloadError::Empty),
            Some((&Self::LEGACY_BINCODE_TAG, value)) => Ok((PayloadCodec::LegacyBincode, value)),
            Some((&Self::JSON_TAG, value)) => Ok((PayloadCodec::Json, value)),
            Some((&tag, _)) => Err(PayloadError::UnknownCodec(tag)),
        }
    }
}

/// Why a payload cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// Zero bytes: not even a codec byte.
    #[error("the payload is empty: it has no codec byte")]
    Empty,
    /// A codec this build does not know (written by a newer one).
    #[error("unknown payload codec {0} (this build reads 0 = legacy bincode and 1 = JSON)")]
    UnknownCodec(u8),
    /// A legacy bincode payload: bincode is not self-describing, so only the Rust type that
    /// wrote it can read it; there is no JSON for it without that type.
    #[error("the payload is legacy bincode ({len} bytes), which cannot be read without its Rust type")]
    NotSelfDescribing {
        /// The size of the encoded value, without the codec byte.
        len: usize,
    },
    /// The value does not decode.
    #[error("the payload does not decode: {0}")]
    Decode(String),
}

/// The codec of a payload as journaled.
pub fn payload_codec(payload: &[u8]) -> Result<PayloadCodec, PayloadError> {
    PayloadCodec::split(payload).map(|(codec, _)| codec)
}

/// A journaled payload as JSON, for showing it (an operator API, a CLI).
///
/// A legacy bincode payload is refused with [`PayloadError::NotSelfDescribing`] rather than
/// shown as a guess: its bytes mean nothing without the Rust type, which only the saga's code
/// has. Callers that want to show something anyway can show its size and [`payload_codec`].
pub fn payload_to_json(payload: &[u8]) -> Result<serde_json::Value, PayloadError> {
    match PayloadCodec::split(payload)? {
        (PayloadCodec::Json, value) => {
            serde_json::from_slice(value).map_err(|e| PayloadError::Decode(e.to_string()))
        }
        (PayloadCodec::LegacyBincode, value) => Err(PayloadError::NotSelfDescribing { len: value.len() }),
    }
}

/// Encodes a user value (saga input or output, step input or output, signal payload) the way
/// the engine writes payloads now: JSON.
pub(crate) fn encode_payload<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    encode_payload_as(PayloadCodec::Json, value)
}

/// Encodes a user value with a given codec: a value is compared with a journaled one in the
/// journaled one's codec.
pub(crate) fn encode_payload_as<T: Serialize + ?Sized>(
    codec: PayloadCodec,
    value: &T,
) -> Result<Vec<u8>, String> {
    let mut out = vec![codec.tag()];
    match codec {
        PayloadCodec::Json => serde_json::to_writer(&mut out, value).map_err(|e| e.to_string())?,
        PayloadCodec::LegacyBincode => {
            bincode::serde::encode_into_std_write(value, &mut out, config()).map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// Decodes a user value from a payload of either codec.
pub(crate) fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    match PayloadCodec::split(payload).map_err(|e| e.to_string())? {
        (PayloadCodec::Json, value) => serde_json::from_slice(value).map_err(|e| e.to_string()),
        (PayloadCodec::LegacyBincode, value) => {
            let (decoded, used) = decode_bounded(value)?;
            if used != value.len() {
                return Err(format!("{} trailing bytes after the value", value.len() - used));
            }
            Ok(decoded)
        }
    }
}

/// Marks a payload read from a [`FORMAT_V1`] record: raw bincode, which had no codec byte.
#[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
pub(crate) fn tag_legacy(payload: &mut Vec<u8>) {
    payload.insert(0, PayloadCodec::LEGACY_BINCODE_TAG);
}

/// Whether a journaled payload holds `value`, as the code's type `T` sees it.
///
/// Bytes are not compared across codecs, nor across versions of `T`: the journaled payload is
/// decoded as `T` (so a legacy bincode journal still matches, and a field added to `T` since,
/// optional or defaulted, does not make it differ), and both are compared as JSON values (so a
/// map's iteration order does not count). A `T` that has no JSON value (a map with non-string
/// keys) is compared as its encoding in the journaled payload's codec instead.
pub(crate) fn same_value<T: Serialize + DeserializeOwned>(
    recorded: &[u8],
    value: &T,
) -> Result<bool, String> {
    let (codec, _) = PayloadCodec::split(recorded).map_err(|e| e.to_string())?;
    let reencoded = encode_payload_as(codec, value)?;
    if reencoded == recorded {
        return Ok(true);
    }
    let journaled: T = decode_payload(recorded)?;
    match (serde_json::to_value(&journaled), serde_json::to_value(value)) {
        (Ok(journaled), Ok(value)) => Ok(journaled == value),
        _ => Ok(encode_payload_as(codec, &journaled)? == reencoded),
    }
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
        assert_eq!(bytes[0], FORMAT_V2);
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

    /// A record whose checksum matches and whose string lengths lie: the fuzzer's
    /// `record_decoder` found a journal record of 14 bytes that asked for a 1.9 TiB string.
    #[test]
    fn a_length_prefix_past_the_record_is_refused_before_anything_is_allocated() {
        let body = [101, 3, 15, 0, 253, 114, 1, 110, 159, 13, 114, 1, 114];
        let mut record = vec![FORMAT_V2];
        record.extend_from_slice(&crc32(&body).to_le_bytes());
        record.extend_from_slice(&body);
        let err = decode_record::<Vec<crate::event::RecordedEvent>>(&record).unwrap_err();
        assert!(err.contains("claims more than the 13 bytes there are"), "{err}");
        // A terabyte, as a legacy bincode payload claims it.
        let err = decode_payload::<String>(&[0, 253, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap_err();
        assert!(err.contains("claims more"), "{err}");
    }

    #[test]
    fn strings_longer_than_the_smallest_limit_still_decode() {
        for len in [65_536, 65_537, 3 << 20] {
            let value = "x".repeat(len);
            let record = encode_record(&value).unwrap();
            assert_eq!(decode_record::<String>(&record).unwrap(), value, "len {len}");
        }
    }

    #[test]
    fn unknown_format_is_named() {
        let mut bytes = encode_record(&1u8).unwrap();
        bytes[0] = 9;
        let err = decode_record::<u8>(&bytes).unwrap_err();
        assert!(err.contains("unknown record format 9"), "{err}");
    }

    /// A record as the code of before payload codecs wrote it: format 1, same envelope.
    fn v1_record<T: Serialize>(value: &T) -> Vec<u8> {
        let mut bytes = encode_record(value).unwrap();
        bytes[0] = FORMAT_V1;
        bytes
    }

    #[test]
    fn format_1_records_still_decode_and_say_so() {
        let (back, format) = decode_record_versioned::<(String, u64)>(&v1_record(&("x", 3u64))).unwrap();
        assert_eq!((back, format), (("x".to_string(), 3), FORMAT_V1));
        let (_, format) = decode_record_versioned::<u8>(&encode_record(&1u8).unwrap()).unwrap();
        assert_eq!(format, FORMAT_V2);
    }

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V1 {
        repo: String,
    }

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct V2 {
        repo: String,
        branch: Option<String>,
        #[serde(default)]
        depth: u32,
    }

    #[test]
    fn payloads_are_json_with_their_codec_byte_first() {
        let bytes = encode_payload(&V1 { repo: "hodei".into() }).unwrap();
        assert_eq!(bytes, b"\x01{\"repo\":\"hodei\"}");
        assert_eq!(payload_codec(&bytes).unwrap(), PayloadCodec::Json);
        assert_eq!(payload_to_json(&bytes).unwrap(), serde_json::json!({"repo": "hodei"}));
        assert_eq!(decode_payload::<V1>(&bytes).unwrap(), V1 { repo: "hodei".into() });
    }

    #[test]
    fn a_json_payload_decodes_as_a_type_that_gained_optional_fields() {
        let bytes = encode_payload(&V1 { repo: "hodei".into() }).unwrap();
        let v2: V2 = decode_payload(&bytes).unwrap();
        assert_eq!(v2, V2 { repo: "hodei".into(), branch: None, depth: 0 });
        assert!(same_value(&bytes, &v2).unwrap());
        assert!(
            !same_value(&bytes, &V2 { repo: "hodei".into(), branch: Some("main".into()), depth: 0 }).unwrap()
        );
    }

    #[test]
    fn legacy_bincode_payloads_decode_by_their_tag_but_are_not_shown_as_json() {
        let mut bytes = bincode::serde::encode_to_vec(V1 { repo: "hodei".into() }, config()).unwrap();
        tag_legacy(&mut bytes);
        assert_eq!(payload_codec(&bytes).unwrap(), PayloadCodec::LegacyBincode);
        assert_eq!(decode_payload::<V1>(&bytes).unwrap(), V1 { repo: "hodei".into() });
        assert!(matches!(payload_to_json(&bytes), Err(PayloadError::NotSelfDescribing { len: 6 })));
        // Compared as the code's type, not byte for byte against the JSON the code writes now.
        assert!(same_value(&bytes, &V1 { repo: "hodei".into() }).unwrap());
        assert!(!same_value(&bytes, &V1 { repo: "other".into() }).unwrap());
    }

    #[test]
    fn unknown_codecs_and_empty_payloads_are_typed_errors() {
        assert!(matches!(payload_to_json(&[]), Err(PayloadError::Empty)));
        assert!(matches!(payload_to_json(b"\x07{}"), Err(PayloadError::UnknownCodec(7))));
        let err = decode_payload::<V1>(b"\x07{}").unwrap_err();
        assert!(err.contains("unknown payload codec 7"), "{err}");
        assert!(decode_payload::<V1>(&[]).unwrap_err().contains("empty"));
    }

    #[test]
    fn every_truncated_payload_is_an_error_not_a_panic() {
        let json =
            encode_payload(&V2 { repo: "hodei".into(), branch: Some("main".into()), depth: 3 }).unwrap();
        let mut legacy = bincode::serde::encode_to_vec(V1 { repo: "hodei".into() }, config()).unwrap();
        tag_legacy(&mut legacy);
        for len in 0..json.len() {
            assert!(decode_payload::<V2>(&json[..len]).is_err(), "json, len {len}");
            assert!(payload_to_json(&json[..len]).is_err(), "json as a value, len {len}");
        }
        for len in 0..legacy.len() {
            assert!(decode_payload::<V1>(&legacy[..len]).is_err(), "bincode, len {len}");
        }
        let mut trailing = legacy.clone();
        trailing.push(0);
        assert!(decode_payload::<V1>(&trailing).unwrap_err().contains("trailing"));
    }

    #[test]
    fn maps_compare_by_content_not_by_iteration_order() {
        let a: std::collections::HashMap<String, u32> = (0..32).map(|i| (format!("k{i}"), i)).collect();
        let b: std::collections::HashMap<String, u32> = (0..32).rev().map(|i| (format!("k{i}"), i)).collect();
        assert!(same_value(&encode_payload(&a).unwrap(), &b).unwrap());
    }
}
