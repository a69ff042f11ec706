//! Patches: changing a saga's code in place, with runs already in flight on the old code.

use super::scope::Scope;
use super::shared::SagaShared;
use crate::event::Event;

impl SagaShared {
    /// Whether this run takes the new path of the patch `patch` here (see
    /// [`SagaContext::patched`](crate::SagaContext::patched)).
    ///
    /// The call is not an operation: it takes no key, so code without it numbers its
    /// operations as code with it does. The journal decides:
    /// - a marker for `patch` at the key of the next operation: the run took the new path;
    /// - an operation recorded at that key without one, or a body that ended before reaching
    ///   it: the run took the old path;
    /// - nothing recorded there: the run reaches the call live, takes the new path, and
    ///   journals the marker with its next write. Lost in a crash before that, the call is
    ///   simply reached live again.
    pub async fn patched(&self, scope: &Scope, patch: &str) -> bool {
        let key = scope.peek_key();
        let new_path = if self.replay.patches.contains(&(key.clone(), patch.to_owned())) {
            true
        } else if self.replay.op(&key).is_some() || self.replay.body_ended() {
            false
        } else {
            self.staged(Event::Patched { key: key.clone(), patch: patch.to_owned() }).await;
            true
        };
        if let Some(probe) = &self.host.probe {
            probe.patch_taken(patch, &key, new_path);
        }
        new_path
    }
}
