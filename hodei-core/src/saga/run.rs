use serde::Serialize;

use crate::codec::encode_payload;
use crate::error::{Error, Result};
use crate::event::SagaId;

/// A request to start a saga: which definition, which id, which input.
#[derive(Clone, Debug)]
pub struct SagaRun {
    pub(crate) definition: String,
    pub(crate) version: Option<u32>,
    pub(crate) id: SagaId,
    pub(crate) input: Vec<u8>,
}

impl SagaRun {
    /// A run of the newest registered version of `definition`.
    pub fn new(definition: impl Into<String>, id: impl Into<String>, input: &impl Serialize) -> Result<Self> {
        let input = encode_payload(input).map_err(|reason| Error::Codec {
            action: "encode",
            what: "the saga input".into(),
            reason,
        })?;
        Ok(Self { definition: definition.into(), version: None, id: SagaId::new(id)?, input })
    }

    /// A run whose input is given as JSON (an operator API, a CLI): the engine checks at start
    /// that it decodes as the definition's input type, and refuses it with
    /// [`Error::InvalidInput`] if not.
    pub fn from_json(
        definition: impl Into<String>,
        id: impl Into<String>,
        input: &serde_json::Value,
    ) -> Result<Self> {
        Self::new(definition, id, input)
    }

    /// Pins the definition version instead of taking the newest.
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// The run's id.
    pub fn id(&self) -> &SagaId {
        &self.id
    }
}
