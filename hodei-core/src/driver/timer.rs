use tracing::Instrument;

use super::scope::Scope;
use super::shared::SagaShared;
use crate::event::{Event, Timestamp};
use crate::replay::RecordedOp;

impl SagaShared {
    /// A durable timer: resolves at `due`, or at the due time the journal recorded for it.
    pub async fn sleep_until(&self, scope: &Scope, due: Timestamp) {
        let key = scope.next_key();
        // Counted from before its start is journaled, so that whoever sees the start in the
        // journal finds it counted too.
        let (due, waiting) = match self.recorded(&key) {
            Some(RecordedOp::Timer { fired: true, .. }) => return,
            Some(RecordedOp::Timer { due, .. }) => {
                self.go_live(scope, "a timer").await;
                (*due, self.control.timer_waiting())
            }
            Some(other) => return self.mismatch(&key, "sets a timer".into(), other).await,
            None => {
                self.go_live(scope, "a timer").await;
                let waiting = self.control.timer_waiting();
                self.durably(Event::TimerStarted { key: key.clone(), due }).await;
                (due, waiting)
            }
        };
        // Only the wait this run does has a span: a timer the journal says fired has none.
        let span = tracing::info_span!("timer", hodei.timer.key = %key, hodei.timer.due = %due.to_rfc3339());
        self.interruptible(scope, self.host.timers.sleep_until(due)).instrument(span).await;
        drop(waiting);
        // Staged: if it is lost in a crash, replay waits again for a due time already past.
        self.staged(Event::TimerFired { key }).await;
    }
}
