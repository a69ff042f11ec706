//! A replay check's view of a driver: how far the code got through its journal, without
//! running anything live.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::lock::lock;

/// What a driver in a replay check reports: the first operation it would run live, and each
/// patch the code asked about on the way. A driver with a probe runs no step, timer, wait or
/// compensation: every scope stops where it would go live.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    /// Set when some scope reaches an operation past the journal: what it is.
    live: watch::Sender<Option<String>>,
    patches: Mutex<Vec<PatchTaken>>,
}

/// A `patched` call a replay reached, and the path the run took there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PatchTaken {
    pub patch: String,
    pub key: String,
    pub new_path: bool,
}

impl Probe {
    /// A scope reached `what` past the journal: it would run it live.
    pub fn reached_live(&self, what: &str) {
        self.live.send_if_modified(|live| {
            let first = live.is_none();
            live.get_or_insert_with(|| what.to_owned());
            first
        });
    }

    /// Resolves once some scope has reached an operation past the journal, with the first.
    pub async fn live(&self) -> String {
        let mut live = self.live.subscribe();
        let reached = live.wait_for(Option::is_some).await;
        reached.map(|what| what.clone().unwrap_or_default()).unwrap_or_default()
    }

    /// The first operation a scope would run live, if one has been reached.
    pub fn first_live(&self) -> Option<String> {
        self.live.borrow().clone()
    }

    pub fn patch_taken(&self, patch: &str, key: &str, new_path: bool) {
        let taken = PatchTaken { patch: patch.to_owned(), key: key.to_owned(), new_path };
        let mut patches = lock(&self.patches);
        if !patches.contains(&taken) {
            patches.push(taken);
        }
    }

    pub fn patches(&self) -> Vec<PatchTaken> {
        lock(&self.patches).clone()
    }
}
