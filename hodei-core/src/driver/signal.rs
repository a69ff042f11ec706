use std::sync::Arc;
use std::time::Duration;

use super::scope::Scope;
use super::shared::SagaShared;
use crate::event::Event;
use crate::lock::lock;
use crate::replay::{RecordedOp, WaitEnd};

impl SagaShared {
    /// Waits for the next signal named `name` that no other wait took (one received before
    /// the wait counts), up to `timeout`. Returns its encoded payload, or `None` on timeout.
    /// `expects` gives the payload's JSON Schema, asked for only when the wait starts live.
    pub async fn wait_signal(
        &self,
        scope: &Scope,
        name: &str,
        timeout: Option<Duration>,
        expects: fn() -> Option<Arc<str>>,
    ) -> Option<Vec<u8>> {
        let key = scope.next_key();
        let what = format!("the wait for signal `{name}`");
        let timeout_at = match self.recorded(&key) {
            Some(RecordedOp::Wait { name: recorded, timeout_at, end }) if recorded == name => match end {
                Some(WaitEnd::Consumed(seq)) => {
                    return self.replay.signals.get(seq).map(|(_, payload)| payload.clone());
                }
                Some(WaitEnd::TimedOut) => return None,
                None => {
                    self.go_live(scope, &what).await;
                    *timeout_at
                }
            },
            Some(RecordedOp::Wait { name: recorded, .. }) => {
                let reason = format!(
                    "operation {key}: the code now waits for signal `{name}`, but the journal recorded a wait for `{recorded}`"
                );
                return self.park(reason).await;
            }
            Some(other) => return self.mismatch(&key, format!("waits for signal `{name}`"), other).await,
            None => {
                self.go_live(scope, &what).await;
                let timeout_at = timeout.map(|limit| self.host.timers.clock().due_after(limit));
                if let Some(schema) = expects() {
                    // Staged: it rides on the wait's own write, which costs no second flush.
                    self.staged(Event::SignalWaitExpects { key: key.clone(), schema: schema.to_string() })
                        .await;
                }
                let started =
                    Event::SignalWaitStarted { key: key.clone(), name: name.to_owned(), timeout_at };
                self.durably(started).await;
                timeout_at
            }
        };
        let deadline = async {
            match timeout_at {
                Some(at) => self.host.timers.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        tracing::info!(hodei.signal.name = name, hodei.signal.key = %key, "waiting for a signal");
        loop {
            // Subscribed before looking, so that a signal delivered in between wakes us.
            let mut arrivals = self.control.arrivals.subscribe();
            if let Some((seq, payload)) = self.take_signal(name) {
                self.durably(Event::SignalConsumed { key, signal: seq }).await;
                return Some(payload);
            }
            let timed_out = self
                .interruptible(scope, async {
                    tokio::select! {
                        _ = arrivals.changed() => false,
                        _ = &mut deadline => true,
                    }
                })
                .await;
            if timed_out {
                self.durably(Event::SignalWaitTimedOut { key }).await;
                return None;
            }
        }
    }

    fn take_signal(&self, name: &str) -> Option<(u64, Vec<u8>)> {
        let inbox = lock(&self.control.inbox);
        let mut consumed = lock(&self.consumed);
        let (seq, (_, payload)) =
            inbox.iter().find(|(seq, (signal, _))| signal == name && !consumed.contains(seq))?;
        consumed.insert(*seq);
        Some((*seq, payload.clone()))
    }
}
