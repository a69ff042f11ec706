//! A group of concurrent branches, as the journal records it.

use super::interrupt::Interrupt;
use super::scope::Scope;
use super::shared::SagaShared;
use crate::event::{Event, JoinMode};
use crate::replay::{GroupHistory, RecordedOp};

/// A group of branches as the driver opened it: its key and what the journal says of it.
pub(crate) struct OpenGroup {
    pub key: String,
    /// The branches that finished, in the order they did, with their errors.
    pub finished: Vec<(u32, Option<(String, bool)>)>,
}

impl SagaShared {
    /// Opens a group of branches: checks it against the journal, or journals its start.
    pub async fn open_group(&self, scope: &Scope, name: &str, count: u32, mode: JoinMode) -> OpenGroup {
        let key = scope.next_key();
        match self.recorded(&key) {
            Some(RecordedOp::Group(GroupHistory { name: n, count: c, mode: m, finished }))
                if n == name && *c == count && *m == mode =>
            {
                OpenGroup { key, finished: finished.clone() }
            }
            Some(RecordedOp::Group(recorded)) => {
                let reason = format!(
                    "operation {key}: the code now runs {count} branches in `{name}` ({mode:?}), but the journal recorded {} in `{}` ({:?})",
                    recorded.count, recorded.name, recorded.mode
                );
                self.park(reason).await
            }
            Some(other) => self.mismatch(&key, format!("runs the branches `{name}`"), other).await,
            None => {
                self.go_live(scope, &format!("the branches `{name}`")).await;
                tracing::info!(hodei.group.key = %key, hodei.group.name = name, count, ?mode, "branches started");
                self.staged(Event::BranchesStarted { key: key.clone(), name: name.to_owned(), count, mode })
                    .await;
                OpenGroup { key, finished: Vec::new() }
            }
        }
    }

    /// Journals a branch's end, in the order branches end.
    pub async fn branch_finished(&self, key: &str, branch: u32, error: Option<(String, bool)>) {
        match &error {
            None => tracing::info!(hodei.group.key = key, branch, "branch finished"),
            Some((error, _)) => tracing::info!(hodei.group.key = key, branch, error, "branch failed"),
        }
        self.staged(Event::BranchFinished { key: key.to_owned(), branch, error }).await
    }

    /// Makes everything staged durable: a group does this before it cancels the branches it
    /// no longer needs, so that its decision is on disk before its effects.
    pub async fn sync(&self) {
        if let Err(e) = self.journal.sync().await {
            self.suspend(Interrupt::Storage(e.to_string())).await
        }
    }

    /// Parks the saga: a branch replayed to another result than the journal recorded.
    pub async fn branch_diverged<T>(&self, key: &str, branch: u32, recorded_ok: bool) -> T {
        let (then, now) = if recorded_ok { ("succeeded", "fails") } else { ("failed", "succeeds") };
        let reason =
            format!("branch {branch} of operation {key}: the journal says it {then}, but it now {now}");
        self.park(reason).await
    }
}
