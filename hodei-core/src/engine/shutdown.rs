use std::sync::atomic::Ordering;
use std::time::Duration;

use super::state::Engine;
use crate::error::Result;
use crate::event::SagaId;
use crate::lock::lock;

/// What [`Engine::shutdown`] left behind. All of it resumes on the next start.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every saga still in flight, as the store records it.
    pub in_flight: Vec<SagaId>,
    /// The sagas whose running step was cut off at the deadline.
    pub interrupted: Vec<SagaId>,
}

impl Engine {
    /// Stops the engine: it takes no new sagas, lets running steps finish up to `deadline`,
    /// cuts off what is still running then, flushes, and reports what is left in flight.
    pub async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::SeqCst);
        inner.shutdown.send_replace(true);
        let mut drivers = inner.drivers.subscribe();
        let mut interrupted = Vec::new();
        if tokio::time::timeout(deadline, drivers.wait_for(|n| *n == 0)).await.is_err() {
            for (id, live) in lock(&inner.live).iter() {
                if let Some(task) = lock(&live.task).take().filter(|t| !t.is_finished()) {
                    task.abort();
                    interrupted.push(id.clone());
                }
            }
            let _ = drivers.wait_for(|n| *n == 0).await;
        }
        // A cut-off saga may have staged a branch's end or a timer's firing; write them so the
        // next start replays less.
        let journals: Vec<_> = lock(&inner.live).values().map(|l| l.journal.clone()).collect();
        for journal in journals {
            journal.sync().await?;
        }
        inner.store.durable().await?;
        lock(&inner.live).clear();
        interrupted.sort();
        let in_flight = inner.store.in_flight()?.into_iter().map(|r| r.id).collect();
        Ok(ShutdownReport { in_flight, interrupted })
    }
}
