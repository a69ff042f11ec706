//! A run's journal as one file: what an operator exports, what a replay check reads, and what
//! the committed journal fixtures are.
//!
//! The file is one record in the stores' own format (a format byte, a checksum, then bincode),
//! so a file written by one build is read by later ones exactly as their stores read the
//! records of earlier builds: a change to the event model that would break old journals in a
//! store breaks these files the same way.

use serde::{Deserialize, Serialize};

use crate::codec::{FORMAT_V2, decode_record_versioned, encode_record};
use crate::driver::final_status;
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord};
use crate::store::EventStore;

/// One run's whole journal, with the run's id (its idempotency keys are derived from it).
///
/// ```
/// use hodei_core::{Event, JournalFile, RecordedEvent, SagaId, Timestamp};
///
/// let journal = JournalFile {
///     saga: SagaId::new("release-1")?,
///     events: vec![RecordedEvent {
///         seq: 0,
///         at: Timestamp(1_700_000_000_000),
///         event: Event::SagaStarted { definition: "release".into(), version: 1, input: b"\x01null".to_vec() },
///     }],
/// };
/// let bytes = journal.to_bytes()?;
/// assert_eq!(JournalFile::from_bytes(&bytes)?, journal);
/// # Ok::<(), hodei_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalFile {
    /// The run.
    pub saga: SagaId,
    /// Its journal, in order.
    pub events: Vec<RecordedEvent>,
}

impl JournalFile {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        encode_record(self).map_err(|reason| Error::Codec {
            action: "encode",
            what: format!("the journal of saga `{}`", self.saga),
            reason,
        })
    }

    /// Reads a file written by [`to_bytes`](Self::to_bytes) of this build or an earlier one.
    /// A damaged or foreign file is an [`Error::Codec`] saying why.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let refused = |reason| Error::Codec { action: "decode", what: "a journal file".into(), reason };
        match decode_record_versioned(bytes).map_err(refused)? {
            (journal, FORMAT_V2) => Ok(journal),
            // Journal files began after the first format: one in it is not a journal file.
            (_, format) => Err(refused(format!("record format {format} is older than journal files"))),
        }
    }

    /// Writes this journal into `store` as the run it records: to look into a run exported from
    /// another deployment, or to resume it on this one. An engine started on the store then
    /// treats it as any run it finds there: it resumes it if it is in flight.
    ///
    /// Fails with [`Error::IdempotencyConflict`] if the store holds a run of that id already,
    /// and with [`Error::CorruptRecord`] for a journal that does not begin with
    /// [`Event::SagaStarted`].
    pub fn import_into(&self, store: &dyn EventStore) -> Result<()> {
        let Some((first, rest)) = self.events.split_first() else {
            return Err(self.corrupt("it is empty".into(), None));
        };
        let Event::SagaStarted { definition, version, .. } = &first.event else {
            return Err(self.corrupt("it does not begin with SagaStarted".into(), Some(first.seq)));
        };
        let mut record = SagaRecord::new(self.saga.clone(), definition.clone(), *version, first.at);
        if let Some(end) = self.events.iter().rev().find(|r| r.event.is_final()) {
            record.status = final_status(&end.event);
        }
        record.updated_at = self.events.last().map_or(first.at, |r| r.at);
        if store.create(&record, first)?.is_some() {
            return Err(Error::IdempotencyConflict {
                id: self.saga.clone(),
                difference: "an existing run".into(),
            });
        }
        store.append(&self.saga, rest, Some(&record))?;
        Ok(())
    }

    fn corrupt(&self, reason: String, seq: Option<u64>) -> Error {
        Error::CorruptRecord {
            saga: self.saga.to_string(),
            seq,
            reason: format!("the journal file: {reason}"),
        }
    }
}
