use crate::event::{SagaId, SagaRecord, SagaStatus, Timestamp};

/// A filter for [`Engine::list`](crate::Engine::list) and
/// [`Engine::list_page`](crate::Engine::list_page). Every condition set must hold.
#[derive(Clone, Debug, Default)]
pub struct SagaFilter {
    definition: Option<String>,
    version: Option<u32>,
    status: Option<&'static str>,
    created_after: Option<Timestamp>,
    created_before: Option<Timestamp>,
    id_contains: Option<String>,
}

/// One page of a listing, in id order (see [`Engine::list_page`](crate::Engine::list_page)).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Page {
    /// The page's records.
    pub records: Vec<SagaRecord>,
    /// The cursor of the next page (the last id of this one), or `None` if this is the last.
    pub next: Option<SagaId>,
}

impl SagaFilter {
    /// Only sagas of this definition.
    pub fn definition(mut self, name: impl Into<String>) -> Self {
        self.definition = Some(name.into());
        self
    }

    /// Only sagas of this definition version.
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// Only sagas started strictly after `at`.
    pub fn created_after(mut self, at: Timestamp) -> Self {
        self.created_after = Some(at);
        self
    }

    /// Only sagas started strictly before `at`.
    pub fn created_before(mut self, at: Timestamp) -> Self {
        self.created_before = Some(at);
        self
    }

    /// Only sagas whose status has the same kind as `status` (a parked saga matches any
    /// `Parked`, whatever its reason).
    pub fn status(mut self, status: &SagaStatus) -> Self {
        self.status = Some(status.kind());
        self
    }

    /// Only sagas whose id contains `text` (a search: a page may read far to fill itself).
    pub fn id_contains(mut self, text: impl Into<String>) -> Self {
        self.id_contains = Some(text.into());
        self
    }

    /// Whether `record` meets every condition set.
    pub fn matches(&self, record: &SagaRecord) -> bool {
        self.definition.as_ref().is_none_or(|d| *d == record.definition)
            && self.version.is_none_or(|v| v == record.version)
            && self.status.is_none_or(|k| k == record.status.kind())
            && self.created_after.is_none_or(|at| record.created_at > at)
            && self.created_before.is_none_or(|at| record.created_at < at)
            && self.id_contains.as_deref().is_none_or(|text| record.id.as_str().contains(text))
    }
}
