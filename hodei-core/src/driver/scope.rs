//! Where in a saga's code an operation is called, and the cancels of its branches.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::lock::lock;
use crate::step_context::first_reason;

/// Where in the saga's code an operation is called: the top level, or a branch of a group.
/// Each scope numbers its operations in call order, which makes keys independent of how
/// concurrent branches interleave.
#[derive(Debug)]
pub(crate) struct Scope {
    pub(super) prefix: String,
    pub(super) next: AtomicU32,
    /// Set for a branch that the journal says was cancelled when its group was decided: it
    /// replays what it recorded, and stops (forever) at the first thing it would run live.
    pub(super) frozen: bool,
    /// Told when an operation of this frozen scope, or of one inside it, stops: the groups
    /// above wait for that before they decide again, so that replay pushes every compensation
    /// the first run pushed.
    pub(super) stopped: Option<(mpsc::UnboundedSender<u32>, u32)>,
    pub(super) parent: Option<Arc<Scope>>,
    /// Set when the group this branch belongs to (or one above) decided without it: its live
    /// operations end (a running step journals `StepCancelled`) and it stops, as a frozen
    /// branch does.
    pub(super) cancel: watch::Sender<Option<String>>,
    /// The branches of groups opened in this scope, so that a cancel reaches them too.
    pub(super) children: Mutex<Vec<std::sync::Weak<Scope>>>,
    /// Steps at work in this scope or below (see `Busy`).
    pub(super) busy: watch::Sender<usize>,
}

impl Scope {
    pub fn root() -> Arc<Self> {
        Arc::new(Self {
            prefix: String::new(),
            next: AtomicU32::new(0),
            frozen: false,
            stopped: None,
            parent: None,
            cancel: watch::Sender::new(None),
            children: Mutex::default(),
            busy: watch::Sender::new(0),
        })
    }

    /// Branch `branch` of the group at `key` in `parent`.
    pub fn branch(
        parent: &Arc<Scope>,
        key: &str,
        branch: u32,
        frozen: bool,
        stopped: mpsc::UnboundedSender<u32>,
    ) -> Arc<Self> {
        let scope = Arc::new(Self {
            prefix: format!("{key}.{branch}."),
            next: AtomicU32::new(0),
            frozen: frozen || parent.frozen,
            stopped: Some((stopped, branch)),
            parent: Some(parent.clone()),
            cancel: watch::Sender::new(parent.cancelled()),
            children: Mutex::default(),
            busy: watch::Sender::new(0),
        });
        let mut siblings = lock(&parent.children);
        // Branches of groups that have returned are gone: forget them, so that a long saga's
        // scopes do not grow.
        siblings.retain(|child| child.strong_count() > 0);
        siblings.push(Arc::downgrade(&scope));
        drop(siblings);
        scope
    }

    /// Cancels this branch and every branch inside it.
    pub fn cancel(&self, reason: &str) {
        self.cancel.send_if_modified(|cancel| {
            let first = cancel.is_none();
            cancel.get_or_insert_with(|| reason.to_owned());
            first
        });
        let children: Vec<_> = lock(&self.children).iter().filter_map(std::sync::Weak::upgrade).collect();
        for child in children {
            child.cancel(reason);
        }
    }

    pub(super) fn cancelled(&self) -> Option<String> {
        self.cancel.borrow().clone()
    }

    /// Resolves once no step is at work in this scope or below.
    pub async fn idle(&self) {
        let _ = self.busy.subscribe().wait_for(|busy| *busy == 0).await;
    }

    /// Resolves with the reason once this branch is cancelled; never for the top level.
    pub(super) async fn cancel_requested(&self) -> String {
        first_reason(self.cancel.subscribe()).await
    }

    /// Stops this branch for good: the groups above learn it can go no further.
    pub(super) async fn stop<T>(&self) -> T {
        self.report_stopped();
        std::future::pending().await
    }

    pub(super) fn next_key(&self) -> String {
        format!("{}{}", self.prefix, self.next.fetch_add(1, Ordering::SeqCst))
    }

    /// The key the next operation of this scope will get, without taking it.
    pub(super) fn peek_key(&self) -> String {
        format!("{}{}", self.prefix, self.next.load(Ordering::SeqCst))
    }

    pub(super) fn is_root(&self) -> bool {
        self.parent.is_none()
    }

    /// Tells every group above that this branch can go no further.
    pub(super) fn report_stopped(&self) {
        let mut scope = Some(self);
        while let Some(current) = scope {
            if let Some((tx, branch)) = &current.stopped {
                let _ = tx.send(*branch);
            }
            scope = current.parent.as_deref();
        }
    }
}
