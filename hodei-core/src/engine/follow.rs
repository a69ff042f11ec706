//! Following one saga's journal as it grows, wherever the saga runs.

use std::collections::VecDeque;

use tokio::sync::{broadcast, watch};

use super::state::Engine;
use crate::bus::{EngineEvent, EngineEventKind};
use crate::error::Result;
use crate::event::{RecordedEvent, SagaId};

/// A saga's journal as it grows: see [`Engine::follow`].
#[derive(Debug)]
pub struct JournalFollower {
    engine: Engine,
    id: SagaId,
    next: u64,
    live: broadcast::Receiver<EngineEvent>,
    /// The engine's beats on a shared store: a saga driven by another engine is read again
    /// from the store at each.
    beats: Option<watch::Receiver<u64>>,
    backlog: VecDeque<RecordedEvent>,
    ended: bool,
}

impl Engine {
    /// Follows saga `id`'s journal from sequence `from`: the events journaled already, then
    /// each as it is journaled, until its final event. On a store shared by several engines a
    /// saga driven by another engine is followed too: its journal is read again at each beat
    /// of this engine's lease (the events come from this engine's bus otherwise).
    pub fn follow(&self, id: &SagaId, from: u64) -> Result<JournalFollower> {
        // Subscribed before the journal is read, so nothing journaled in between is missed;
        // the sequence numbers drop what both deliver.
        let live = self.subscribe();
        let beats = self.inner.store.leases().map(|_| self.inner.beats.subscribe());
        let backlog = self.history(id)?.into();
        Ok(JournalFollower {
            engine: self.clone(),
            id: id.clone(),
            next: from,
            live,
            beats,
            backlog,
            ended: false,
        })
    }
}

impl JournalFollower {
    /// The next event, or `None` once the final one was returned (or the engine is gone).
    pub async fn next(&mut self) -> Option<Result<RecordedEvent>> {
        loop {
            while let Some(recorded) = self.backlog.pop_front() {
                if recorded.seq < self.next {
                    continue;
                }
                self.next = recorded.seq + 1;
                self.ended = recorded.event.is_final();
                return Some(Ok(recorded));
            }
            if self.ended {
                return None;
            }
            let woke = {
                let (live, beats) = (&mut self.live, &mut self.beats);
                tokio::select! {
                    received = live.recv() => Woke::Bus(received),
                    beating = async {
                        match beats {
                            Some(beats) => beats.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    } => Woke::Beat(beating),
                }
            };
            let reread = match woke {
                Woke::Bus(Ok(event)) if event.saga_id == self.id => {
                    if let EngineEventKind::Journaled(recorded) = event.kind {
                        self.backlog.push_back(recorded);
                    }
                    false
                }
                Woke::Bus(Ok(_)) => false,
                // Fell behind the engine's buffer: the journal has everything missed.
                Woke::Bus(Err(broadcast::error::RecvError::Lagged(_))) => true,
                Woke::Bus(Err(broadcast::error::RecvError::Closed)) => return None,
                // Driven here, its events come on the bus.
                Woke::Beat(true) => self.engine.inner.live(&self.id).is_none(),
                Woke::Beat(false) => {
                    self.beats = None;
                    false
                }
            };
            if reread {
                match self.engine.history(&self.id) {
                    Ok(history) => {
                        self.backlog = history.into_iter().filter(|r| r.seq >= self.next).collect()
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
        }
    }
}

/// What woke a follower.
enum Woke {
    Bus(Result<EngineEvent, broadcast::error::RecvError>),
    /// A beat; false once the beats ended.
    Beat(bool),
}
