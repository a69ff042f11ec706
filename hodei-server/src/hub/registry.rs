//! The registry of connected workers: who has an open session, since when, running what, and
//! how to reach its session.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

use super::command::SessionCommand;
use super::held::{HeldGauge, HeldLogBytes};
use super::holders::Holders;

/// One connected worker in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Connection {
    since: SystemTime,
    /// Tells a worker's sessions apart: a reconnect may be accepted before the old session's
    /// end is noticed, and that end must not remove the new one.
    id: u64,
    /// The jobs running on the worker: announced in its `Hello` or accepted since, until their
    /// result arrives. Cancelled ones too, until they have ended: a worker is busy while any
    /// of its jobs' processes may still run.
    jobs: BTreeSet<String>,
}

/// The workers with an open session, observable so that callers wait on changes, not on time.
#[derive(Debug)]
pub(super) struct Registry {
    pub(super) workers: watch::Sender<BTreeMap<String, Connection>>,
    /// Each open session's command channel and held output, by worker, with the session's
    /// connection id.
    sessions: Mutex<HashMap<String, Session>>,
    /// When each connected worker's last message (a heartbeat at the least) arrived. Kept out
    /// of the watch: a heartbeat is no change anyone waits for.
    heard: Mutex<HashMap<String, SystemTime>>,
    next_id: AtomicU64,
    /// Which worker each running job was handed to, across sessions.
    pub(super) holders: Holders,
}

/// How callers reach one open session.
#[derive(Debug)]
struct Session {
    id: u64,
    commands: mpsc::Sender<SessionCommand>,
    held: Arc<HeldGauge>,
}

impl Registry {
    /// An empty registry.
    pub(super) fn new() -> Self {
        Self {
            workers: watch::Sender::new(BTreeMap::new()),
            sessions: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            holders: Holders::default(),
        }
    }

    /// Announces a worker with the jobs it holds, in one change, so that nobody sees it
    /// connected and idle while it still runs jobs.
    pub(super) fn connect(
        self: &Arc<Self>,
        worker_id: &str,
        commands: mpsc::Sender<SessionCommand>,
        held: Arc<HeldGauge>,
        jobs: BTreeSet<String>,
    ) -> ConnectionGuard {
        let connection =
            Connection { since: SystemTime::now(), id: self.next_id.fetch_add(1, Ordering::Relaxed), jobs };
        // Before the watch announces the worker, so that whoever sees it listed can reach it.
        let id = connection.id;
        self.sessions().insert(worker_id.to_owned(), Session { id, commands, held });
        self.workers.send_modify(|workers| {
            workers.insert(worker_id.to_owned(), connection);
        });
        tracing::info!(worker = worker_id, "worker connected");
        ConnectionGuard { registry: self.clone(), worker_id: worker_id.to_owned(), id }
    }

    /// The map is only ever held for an insert, a remove or a clone, which cannot panic midway,
    /// so a poisoned lock still holds a consistent map.
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, HashMap<String, SystemTime>> {
        self.heard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When each connected worker was last heard from.
    pub(super) fn last_heard(&self) -> BTreeMap<String, SystemTime> {
        self.heard().iter().map(|(id, at)| (id.clone(), *at)).collect()
    }

    pub(super) fn commands(&self, worker_id: &str) -> Option<mpsc::Sender<SessionCommand>> {
        self.sessions().get(worker_id).map(|session| session.commands.clone())
    }

    /// The output `worker_id`'s open session holds, taken and not yet durable.
    pub(super) fn held(&self, worker_id: &str) -> Option<HeldLogBytes> {
        self.sessions().get(worker_id).map(|session| session.held.read())
    }
}

/// Removes its worker from the registry when the session ends, however it ends.
#[derive(Debug)]
pub(super) struct ConnectionGuard {
    registry: Arc<Registry>,
    pub(super) worker_id: String,
    id: u64,
}

impl ConnectionGuard {
    /// Notes that a message of this session's worker arrived now.
    pub(super) fn heard(&self) {
        self.registry.heard().insert(self.worker_id.clone(), SystemTime::now());
    }

    /// Which worker each running job was handed to.
    pub(super) fn holders(&self) -> &Holders {
        &self.registry.holders
    }

    /// Publishes the jobs running on this session's worker.
    pub(super) fn set_jobs(&self, running: &HashSet<String>) {
        let jobs: BTreeSet<String> = running.iter().cloned().collect();
        self.registry.workers.send_if_modified(|workers| match workers.get_mut(&self.worker_id) {
            Some(connection) if connection.id == self.id && connection.jobs != jobs => {
                connection.jobs = jobs;
                true
            }
            _ => false,
        });
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut sessions = self.registry.sessions();
        if sessions.get(&self.worker_id).is_some_and(|session| session.id == self.id) {
            sessions.remove(&self.worker_id);
            self.registry.heard().remove(&self.worker_id);
        }
        drop(sessions);
        self.registry.workers.send_if_modified(|workers| {
            if workers.get(&self.worker_id).is_some_and(|c| c.id == self.id) {
                workers.remove(&self.worker_id);
                true
            } else {
                false
            }
        });
        tracing::info!(worker = %self.worker_id, "worker disconnected");
    }
}

pub(super) fn snapshot(workers: &BTreeMap<String, Connection>) -> BTreeMap<String, SystemTime> {
    workers.iter().map(|(id, c)| (id.clone(), c.since)).collect()
}

pub(super) fn jobs_snapshot(workers: &BTreeMap<String, Connection>) -> BTreeMap<String, BTreeSet<String>> {
    workers.iter().map(|(id, c)| (id.clone(), c.jobs.clone())).collect()
}

/// A subscription to the registry of connected workers.
#[derive(Debug)]
pub struct WorkersWatch(pub(super) watch::Receiver<BTreeMap<String, Connection>>);

impl WorkersWatch {
    /// The connected workers now.
    pub fn current(&self) -> BTreeMap<String, SystemTime> {
        snapshot(&self.0.borrow())
    }

    /// The jobs running on each connected worker now ([`Hub::running_jobs`]).
    ///
    /// [`Hub::running_jobs`]: super::Hub::running_jobs
    pub fn running_jobs(&self) -> BTreeMap<String, BTreeSet<String>> {
        jobs_snapshot(&self.0.borrow())
    }

    /// Waits for the next change: a connect, a disconnect, or a worker's running jobs. `None`
    /// if the hub is gone.
    pub async fn changed(&mut self) -> Option<()> {
        self.0.changed().await.ok()
    }

    /// Waits until the connected workers satisfy `condition`, and returns them. `None` if the
    /// hub is gone.
    pub async fn wait_for(
        &mut self,
        mut condition: impl FnMut(&BTreeMap<String, SystemTime>) -> bool,
    ) -> Option<BTreeMap<String, SystemTime>> {
        self.0.wait_for(|workers| condition(&snapshot(workers))).await.ok().map(|workers| snapshot(&workers))
    }
}
