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

    /// Whether this run takes the new path of the patch `patch` here: how a saga's code is
    /// changed in place, without a new version, while runs of the old code are in flight.
    ///
    /// It is `false` for a run that recorded the old code's path here (an operation where the
    /// call now is, or an end before it) and `true` for every run that reaches the call on the
    /// new code, which journals a marker so that its replays answer `true` again. The call
    /// takes no operation key: the old path numbers its operations as the old code did.
    ///
    /// ```
    /// # use hodei_core::{SagaDefinition, StepError};
    /// let release = SagaDefinition::new("release", 1, |ctx, _: ()| async move {
    ///     if ctx.patched("scan-before-push").await {
    ///         ctx.step("scan").run(|_, _: ()| async { Ok::<_, StepError>(()) }).await?;
    ///     }
    ///     ctx.step("push").run(|_, _: ()| async { Ok::<_, StepError>(()) }).await?;
    ///     Ok(())
    /// });
    /// ```
    ///
    /// **Retiring a patch.** Once no run in flight took the old path, remove the call and the
    /// old path, keeping the new one. Journals with the marker replay on the code without the
    /// call, since a marker nobody asks about is ignored. The replay check tells when that is:
    /// [`Engine::check_in_flight`](crate::Engine::check_in_flight) lists, for each run, the
    /// patches it reached and the path it took ([`ReplayReport::patches`]); when no run has
    /// `new_path: false` for the patch, it can go. Running the check again with the patch
    /// removed confirms it: every run must come out clean.
    ///
    /// [`ReplayReport::patches`]: crate::ReplayReport::patches
    pub async fn patched(&self, patch: &str) -> bool {
        self.shared.patched(&self.scope, patch).await
    }
}
