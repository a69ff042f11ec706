use crate::event::{SagaRecord, SagaStatus};

/// A filter for [`Engine::list`](crate::Engine::list).
#[derive(Clone, Debug, Default)]
pub struct SagaFilter {
    definition: Option<String>,
    status: Option<&'static str>,
}

impl SagaFilter {
    /// Only sagas of this definition.
    pub fn definition(mut self, name: impl Into<String>) -> Self {
        self.definition = Some(name.into());
        self
    }

    /// Only sagas whose status has the same kind as `status` (a parked saga matches any
    /// `Parked`, whatever its reason).
    pub fn status(mut self, status: &SagaStatus) -> Self {
        self.status = Some(status.kind());
        self
    }

    pub(super) fn matches(&self, record: &SagaRecord) -> bool {
        self.definition.as_ref().is_none_or(|d| *d == record.definition)
            && self.status.is_none_or(|k| k == record.status.kind())
    }
}
