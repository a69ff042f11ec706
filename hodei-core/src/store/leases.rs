//! Several engines on one store: which sagas each one drives.

use std::time::Duration;

use crate::error::Result;
use crate::event::{SagaId, SagaRecord};

/// What a store shared by several engines (each with a store of its own on one database) tells
/// the engine that uses it: the sagas it may drive.
///
/// Each saga in flight is owned by one engine under that engine's lease, with an epoch that
/// moves on at every change of owner. The store writes a saga only at the epoch its engine
/// holds, in the same transaction as the write: a write of an engine whose saga was taken over
/// is refused with [`Error::Fenced`](crate::Error::Fenced), and the engine stops driving it.
/// An engine renews its lease once per [`beat`](Self::beat), for all its sagas at once, and
/// claims then the sagas of engines whose lease lapsed.
///
/// A store without it ([`EventStore::leases`](super::EventStore::leases) is `None`: sled,
/// memory) belongs to one engine, which drives every saga in flight.
pub trait Leases: Send + Sync {
    /// How often the engine calls [`renew`](Self::renew): a fraction of the lease, so that a
    /// live engine's lease never lapses for a late beat or two.
    fn beat(&self) -> Duration;

    /// Renews this engine's lease, then claims up to `max` sagas in flight that no live engine
    /// owns (on the first call, also those this engine held in an earlier life under the same
    /// engine id). Blocks on the database.
    fn renew(&self, max: usize) -> Result<Renewal>;
}

/// What one [`Leases::renew`] found.
#[derive(Debug, Default, Clone)]
#[non_exhaustive]
pub struct Renewal {
    /// The sagas this call claimed, in id order: the engine drives them from now on.
    pub claimed: Vec<SagaRecord>,
    /// Sagas this engine drove that another engine took over while its lease had lapsed: the
    /// engine stops driving them at once (their writes would be refused anyway).
    pub lost: Vec<SagaId>,
}
