use std::any::Any;
use std::sync::Arc;

use super::probe::Probe;
use crate::resources::Resources;
use crate::timers::Timers;

/// What a saga's driver takes from the engine that runs it.
pub(crate) struct Host {
    pub timers: Arc<Timers>,
    /// The largest encoded payload accepted, in bytes.
    pub max_payload: usize,
    pub resources: Arc<Resources>,
    /// The engine itself, kept alive while its sagas run, and the one their child sagas run
    /// on. Erased because the engine holds saga definitions, whose bodies take a context that
    /// holds this: naming the engine's type here would make each depend on the other.
    pub engine: Arc<dyn Any + Send + Sync>,
    /// Set for a replay check: the driver runs nothing live and reports how far it got.
    pub probe: Option<Arc<Probe>>,
}
