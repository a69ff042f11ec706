//! What the engine tells its subscribers (see [`Engine::subscribe`](crate::Engine::subscribe)).

use crate::event::{RecordedEvent, SagaId, SagaStatus};

/// Something that happened in the engine, for UIs and custom control planes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EngineEvent {
    /// The saga it happened to.
    pub saga_id: SagaId,
    /// What happened.
    pub kind: EngineEventKind,
}

/// What an [`EngineEvent`] reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum EngineEventKind {
    /// An event was written to the saga's journal.
    Journaled(RecordedEvent),
    /// The saga's status changed.
    Status(SagaStatus),
}
