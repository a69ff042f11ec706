//! Several engines on one store: which sagas each one drives.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

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

    /// Stores an operator's `request` for saga `id`, which this engine does not drive, for its
    /// owner to apply; committed before this returns, and the owner is woken. Blocks on the
    /// database.
    fn post(&self, id: &SagaId, request: &Request) -> Result<()>;

    /// The requests posted for the sagas this engine owns, oldest first. Blocks on the
    /// database.
    fn posted(&self) -> Result<Vec<Posted>>;

    /// The journal write of saga `id` that follows, on this thread, applies request `request`:
    /// the store deletes the request in that write's own transaction, so that it is applied
    /// exactly once whatever fails in between.
    fn applying(&self, id: &SagaId, request: i64);

    /// The engine is done with request `request`. With `keep` (the journal could not be
    /// written: the saga moved to another engine, or the database failed) it stays for the
    /// next look; otherwise, unless a write applied it, it is deleted now (it changed nothing,
    /// or the saga refused it). Blocks on the database.
    fn settle(&self, request: i64, keep: bool) -> Result<()>;

    /// Notified when a request may have been posted for one of this engine's sagas; between
    /// notifications the engine still looks at every beat.
    fn wake(&self) -> Arc<Notify>;
}

/// What an operator asks of a saga that another engine drives: the verbs of
/// [`Engine`](crate::Engine) that journal a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// [`Engine::cancel`](crate::Engine::cancel), by whom if said.
    Cancel {
        /// Why.
        reason: String,
        /// Who asked, if known.
        by: Option<String>,
    },
    /// [`Engine::signal`](crate::Engine::signal), the payload encoded.
    Signal {
        /// The signal's name.
        name: String,
        /// The encoded payload.
        payload: Vec<u8>,
        /// Who sent it, if known.
        by: Option<String>,
    },
    /// [`Engine::pause`](crate::Engine::pause).
    Pause {
        /// Who asked.
        by: String,
    },
    /// [`Engine::resume`](crate::Engine::resume).
    Resume {
        /// Who asked.
        by: String,
    },
    /// [`Engine::retry_now`](crate::Engine::retry_now).
    RetryNow {
        /// Who asked.
        by: String,
    },
}

/// A request waiting for its saga's owner: see [`Leases::posted`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Posted {
    /// The request's number, for [`Leases::applying`] and [`Leases::settle`].
    pub number: i64,
    /// The saga it is for.
    pub saga: SagaId,
    /// What is asked.
    pub request: Request,
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

tokio::task_local! {
    /// The posted request the current task is applying: the journal hands it to the store
    /// with the write that applies it ([`Leases::applying`]).
    pub(crate) static APPLYING: i64;
}
