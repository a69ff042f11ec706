//! A session's sending side: whatever the outboxes hold, the heartbeats and control messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use super::outbox::{Cursor, Outboxes};
use crate::protocol::now_unix_ms;
use crate::protocol::v1::{AgentMessage, Heartbeat, agent_message};

/// Sends everything the hub is owed, as it comes, and the heartbeats; returns when the
/// session's stream is closed.
pub(super) async fn pump(
    outboxes: Arc<Outboxes>,
    sender: mpsc::Sender<AgentMessage>,
    mut control: mpsc::UnboundedReceiver<AgentMessage>,
    period: Duration,
    max_bytes: usize,
) {
    let mut changed = outboxes.subscribe();
    let mut heartbeats = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    loop {
        changed.borrow_and_update();
        let outboxes_now = outboxes.all();
        for outbox in &outboxes_now {
            let cursor = cursors.entry(outbox.job_id().to_owned()).or_insert_with(|| outbox.cursor());
            let unsent = outbox.take_unsent(cursor, max_bytes);
            let messages = unsent
                .accepted
                .map(agent_message::Kind::Accepted)
                .into_iter()
                .chain(unsent.logs.into_iter().map(agent_message::Kind::Log))
                .chain(unsent.metrics.map(agent_message::Kind::Metrics))
                .chain(unsent.result.map(agent_message::Kind::Result));
            for kind in messages {
                if sender.send(message(kind)).await.is_err() {
                    return;
                }
            }
        }
        cursors.retain(|job_id, _| outboxes_now.iter().any(|outbox| outbox.job_id() == job_id));
        let next = tokio::select! {
            changed = changed.changed() => match changed {
                Ok(()) => None,
                Err(_) => return,
            },
            _ = heartbeats.tick() => Some(agent_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: now_unix_ms() })),
            Some(control) = control.recv() => control.kind,
        };
        if let Some(kind) = next
            && sender.send(message(kind)).await.is_err()
        {
            return;
        }
    }
}

pub(super) fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}
