//! The acknowledged position: how the sled store tells an intact journal from one that lost
//! writes it had acknowledged as durable.
//!
//! sled recovers its log up to the first damaged or missing byte and drops everything after it
//! without a word, so to sled a torn tail after a crash and a flipped bit in the middle of a
//! year of history look the same. The store therefore keeps two copies of one number:
//! - before each group flush, the flusher writes a **marker** into sled, numbered by that flush;
//! - once the flush has returned, and before any writer is told that its write is durable, it
//!   writes the same number to the file `ACKNOWLEDGED`, outside sled.
//!
//! Every acknowledged write went into sled's log before the marker of the flush that
//! acknowledged it. A recovery that lost any of them stopped before that marker and lost it
//! too, so on open a marker older than `ACKNOWLEDGED` means acknowledged writes are gone: the
//! store refuses to open. A torn tail only holds writes nobody was told about; the marker is at
//! or past the file's number and the store opens.
//!
//! `ACKNOWLEDGED` is written in place, not synced on each flush (that would double the cost of
//! a commit); a process killed at any point leaves it exact, since the kernel has the write. A
//! power cut can leave it older than sled's last flush, which only weakens the check, never
//! refuses an intact journal. Flush `n` goes to slot `n % 2`, so a write torn by a power cut
//! leaves the other slot readable.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec::{FORMAT_V1, crc32, decode_record, encode_record};
use crate::event::Timestamp;

/// The marker's key in sled's default tree.
pub(super) const MARKER_KEY: &[u8] = b"hodei/acknowledged";
/// The file beside `journal/`.
pub(super) const FILE_NAME: &str = "ACKNOWLEDGED";

const MAGIC: &[u8; 8] = b"HODEIACK";
/// `[magic 8][format 1][flush u64 LE][at u64 LE][crc32 of the first 25 bytes, LE]`.
const SLOT_LEN: usize = 29;
const SLOT_STRIDE: u64 = 32;

/// One group flush: its number (counted from the store's creation) and when it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct Position {
    pub flush: u64,
    pub at: Timestamp,
}

impl Position {
    pub const START: Self = Self { flush: 0, at: Timestamp(0) };

    pub fn next(self) -> Self {
        Self { flush: self.flush + 1, at: Timestamp::now() }
    }

    pub fn marker(self) -> Result<Vec<u8>, String> {
        encode_record(&self)
    }

    fn slot(self) -> [u8; SLOT_LEN] {
        let mut slot = [0u8; SLOT_LEN];
        slot[..8].copy_from_slice(MAGIC);
        slot[8] = FORMAT_V1;
        slot[9..17].copy_from_slice(&self.flush.to_le_bytes());
        slot[17..25].copy_from_slice(&self.at.0.to_le_bytes());
        let crc = crc32(&slot[..25]);
        slot[25..].copy_from_slice(&crc.to_le_bytes());
        slot
    }

    fn from_slot(bytes: &[u8]) -> Result<Self, String> {
        let slot = bytes.get(..SLOT_LEN).ok_or_else(|| format!("{} of {SLOT_LEN} bytes", bytes.len()))?;
        if &slot[..8] != MAGIC {
            return Err("not an acknowledged position".into());
        }
        if slot[8] != FORMAT_V1 {
            return Err(format!("unknown format {}", slot[8]));
        }
        let word = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().unwrap_or_default());
        let stored = u32::from_le_bytes(slot[25..].try_into().unwrap_or_default());
        if stored != crc32(&slot[..25]) {
            return Err("checksum mismatch".into());
        }
        Ok(Self { flush: word(9), at: Timestamp(word(17)) })
    }

    fn describe(self) -> String {
        format!("group commit #{} ({})", self.flush, utc(self.at))
    }
}

/// What `ACKNOWLEDGED` says.
#[derive(Debug)]
pub(super) enum Recorded {
    /// No such file: a new directory, or one written before the check existed.
    Missing,
    Found(Position),
    Unreadable(String),
}

/// The file `ACKNOWLEDGED`, open for the store's lifetime; only the flusher thread writes it.
#[derive(Debug)]
pub(super) struct AckFile {
    file: File,
}

fn write_slot(mut file: &File, position: Position, slot: u64) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(slot * SLOT_STRIDE))?;
    file.write_all(&position.slot())
}

impl AckFile {
    /// Reads what the file in `dir` says, without creating it.
    pub fn read(dir: &Path) -> std::io::Result<Recorded> {
        let mut bytes = Vec::new();
        match File::open(dir.join(FILE_NAME)) {
            Ok(mut file) => file.read_to_end(&mut bytes)?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Recorded::Missing),
            Err(e) => return Err(e),
        };
        let slots: Vec<_> = (0..2)
            .map(|slot| Position::from_slot(bytes.get(slot * SLOT_STRIDE as usize..).unwrap_or_default()))
            .collect();
        match slots.iter().filter_map(|s| s.as_ref().ok()).max() {
            Some(position) => Ok(Recorded::Found(*position)),
            None => {
                let reasons: Vec<_> = slots.iter().filter_map(|s| s.as_ref().err()).cloned().collect();
                Ok(Recorded::Unreadable(format!(
                    "{} bytes, neither slot readable: {}",
                    bytes.len(),
                    reasons.join("; ")
                )))
            }
        }
    }

    /// Opens the file in `dir` and makes both slots say `position`, durably.
    pub fn reset(dir: &Path, position: Position) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE_NAME))?;
        let ack = Self { file };
        for slot in 0..2 {
            write_slot(&ack.file, position, slot)?;
        }
        ack.file.set_len(2 * SLOT_STRIDE)?;
        ack.file.sync_all()?;
        // The file's name must survive a power cut too.
        #[cfg(unix)]
        File::open(dir)?.sync_all()?;
        Ok(ack)
    }

    /// Records a flush. Not synced: see the module doc.
    pub fn record(&self, position: Position) -> std::io::Result<()> {
        write_slot(&self.file, position, position.flush % 2)
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// Why a directory must not be opened as it is.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Loss {
    pub damage: String,
    pub lost: String,
}

/// Compares the file with the marker sled recovered. `Ok` is the position the next flush
/// follows; `Err` says what is damaged and what was lost.
pub(super) fn check(recorded: Recorded, marker: Option<Result<Position, String>>) -> Result<Position, Loss> {
    let unknown =
        || "unknown: without it the store cannot tell which acknowledged writes survived".to_string();
    match (recorded, marker) {
        (Recorded::Unreadable(reason), _) => {
            Err(Loss { damage: format!("{FILE_NAME} is unreadable ({reason})"), lost: unknown() })
        }
        (_, Some(Err(reason))) => Err(Loss {
            damage: format!("the acknowledged-position marker in journal/ is unreadable ({reason})"),
            lost: unknown(),
        }),
        (Recorded::Missing, None) => Ok(Position::START),
        (Recorded::Missing, Some(Ok(marker))) => Err(Loss {
            damage: format!("{FILE_NAME} is missing, although journal/ records {}", marker.describe()),
            lost: unknown(),
        }),
        (Recorded::Found(acknowledged), None) if acknowledged.flush > 0 => Err(Loss {
            damage: format!(
                "journal/ holds none of the group commits acknowledged up to {}",
                acknowledged.describe()
            ),
            lost: format!("every write acknowledged up to {}", utc(acknowledged.at)),
        }),
        (Recorded::Found(acknowledged), Some(Ok(marker))) if marker.flush < acknowledged.flush => Err(Loss {
            damage: format!(
                "journal/ ends at {}, before the last acknowledged one, {}",
                marker.describe(),
                acknowledged.describe()
            ),
            lost: format!(
                "the writes acknowledged by group commits #{} to #{}, from {} to {}",
                marker.flush + 1,
                acknowledged.flush,
                utc(marker.at),
                utc(acknowledged.at)
            ),
        }),
        (Recorded::Found(acknowledged), marker) => {
            Ok(marker.and_then(Result::ok).map_or(acknowledged, |m| m.max(acknowledged)))
        }
    }
}

/// Decodes the marker sled holds.
pub(super) fn decode_marker(bytes: &[u8]) -> Result<Position, String> {
    decode_record(bytes)
}

/// `2026-12-06 17:22:34.123 UTC`, for messages an operator reads.
fn utc(at: Timestamp) -> String {
    at.to_rfc3339().replacen('T', " ", 1).replace('Z', " UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(flush: u64) -> Position {
        Position { flush, at: Timestamp(1_796_577_754_123 + flush) }
    }

    #[test]
    fn times_read_as_utc() {
        assert_eq!(utc(Timestamp(0)), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(Timestamp(1_796_577_754_123)), "2026-12-06 17:22:34.123 UTC");
        assert_eq!(utc(Timestamp(951_782_400_000)), "2000-02-29 00:00:00.000 UTC");
    }

    #[test]
    fn a_marker_behind_the_file_is_a_loss_and_says_which_commits() {
        let loss = check(Recorded::Found(at(9)), Some(Ok(at(4)))).unwrap_err();
        assert!(loss.damage.contains("#4") && loss.damage.contains("#9"), "{loss:?}");
        assert!(loss.lost.contains("#5 to #9"), "{loss:?}");
    }

    #[test]
    fn a_marker_at_or_past_the_file_opens_from_the_marker() {
        assert_eq!(check(Recorded::Found(at(9)), Some(Ok(at(9)))), Ok(at(9)));
        // A crash between sled's flush and the file's write: the torn tail is not a loss.
        assert_eq!(check(Recorded::Found(at(9)), Some(Ok(at(10)))), Ok(at(10)));
    }

    #[test]
    fn missing_pieces() {
        assert_eq!(check(Recorded::Missing, None), Ok(Position::START));
        assert!(check(Recorded::Missing, Some(Ok(at(3)))).is_err());
        assert!(check(Recorded::Found(at(3)), None).is_err());
        assert_eq!(check(Recorded::Found(Position::START), None), Ok(Position::START));
        assert!(check(Recorded::Unreadable("x".into()), None).is_err());
        assert!(check(Recorded::Found(at(3)), Some(Err("x".into()))).is_err());
    }

    #[test]
    fn a_torn_or_flipped_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let ack = AckFile::reset(dir.path(), Position::START).unwrap();
        ack.record(at(1)).unwrap();
        ack.record(at(2)).unwrap();
        assert!(matches!(AckFile::read(dir.path()).unwrap(), Recorded::Found(p) if p == at(2)));
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 0x10; // slot 0, which holds #2
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(AckFile::read(dir.path()).unwrap(), Recorded::Found(p) if p == at(1)));
        bytes[SLOT_STRIDE as usize + 20] ^= 1; // slot 1 too
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(AckFile::read(dir.path()).unwrap(), Recorded::Unreadable(_)));
        std::fs::write(&path, []).unwrap();
        assert!(matches!(AckFile::read(dir.path()).unwrap(), Recorded::Unreadable(_)));
    }
}
