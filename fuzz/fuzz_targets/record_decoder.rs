//! The stored record decoder on arbitrary bytes: every record type the stores and journal files
//! read decodes to a value or a typed error, never a panic or an allocation the input's length
//! does not bound, and a journal file that decodes encodes back to the same journal.
//!
//! Input: one mode byte, then the record. Mode bit 0 set: the rest is a record body, sealed
//! with a checksum that matches (bit 1 picks format 1 or 2), so that the bytes reach the body's
//! decoder; clear: the rest is the whole record, envelope and all.

#![no_main]

use hodei_core::__fuzz::{
    RECORD_FORMAT_V1, RECORD_FORMAT_V2, decode_journal_record, decode_saga_record, seal_record,
};
use hodei_core::JournalFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let record = match (mode & 1, mode & 2) {
        (0, _) => rest.to_vec(),
        (_, 0) => seal_record(RECORD_FORMAT_V2, rest),
        _ => seal_record(RECORD_FORMAT_V1, rest),
    };
    let _ = decode_journal_record(&record);
    let _ = decode_saga_record(&record);
    if let Ok(journal) = JournalFile::from_bytes(&record) {
        let bytes = journal.to_bytes().expect("a decoded journal encodes");
        assert_eq!(JournalFile::from_bytes(&bytes).expect("an encoded journal decodes"), journal);
    }
});
