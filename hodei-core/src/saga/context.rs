use std::fmt;
use std::sync::Arc;

use crate::driver::{SagaShared, Scope};
use crate::error::Result;
use crate::event::SagaId;

/// The handle a saga body gets: its id, and the way to run steps.
#[derive(Clone)]
pub struct SagaContext {
    pub(crate) shared: Arc<SagaShared>,
    /// Where this context's operations are numbered: the top level, or one branch.
    pub(crate) scope: Arc<Scope>,
}

impl fmt::Debug for SagaContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaContext").field("id", self.id()).finish()
    }
}

impl SagaContext {
    /// The saga's id.
    pub fn id(&self) -> &SagaId {
        &self.shared.id
    }

    /// The resource of type `T` registered with the engine (see
    /// [`EngineBuilder::resource`](crate::EngineBuilder::resource)), or
    /// [`Error::MissingResource`](crate::Error::MissingResource) naming `T`. Branches and
    /// child sagas see the same resources.
    ///
    /// A resource is not journaled: replay after a restart sees whatever the new engine holds.
    /// So a body hands resources to its steps, or uses them only in ways that do not change
    /// which operations it runs.
    pub fn resource<T: Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        self.shared.host.resources.get()
    }
}
