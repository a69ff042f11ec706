//! The control plane's scheduler: workers on demand, per job, from providers.
//!
//! [`Scheduler`] is the [`WorkerPool`] a [`JobDispatcher`](crate::jobs::JobDispatcher)
//! takes pooled workers from. For each request it:
//!
//! 1. picks the providers that match: the request's provider hint names it, and every label the
//!    request asks for is among the provider's [`Provider::labels`] (none match: the request is
//!    [`PoolError::Unsatisfiable`]);
//! 2. hands out an idle worker of one of them, or provisions a new one if that provider is under
//!    its cap; otherwise the request waits in one queue, in order of priority (higher first) then
//!    arrival. Whatever frees capacity (a release, a destroyed worker) hands it to the first
//!    waiter that can use it, under the same lock, so nothing polls and nobody jumps the queue;
//! 3. provisions with a fresh worker id and one-time token, then waits for the worker to connect
//!    to the hub (its registry watch, not polling the hub), while watching the provider's state
//!    for an early exit. A worker that exits, or misses the registration deadline, is destroyed
//!    and the request fails retryably with the worker's own output.
//!
//! When a job's lease ends, an ephemeral worker is destroyed; a reused one waits idle for the
//! next job and is destroyed after its idle timeout, or as soon as it disconnects from the hub.
//! A worker lost during a job, or whose job was abandoned, is always destroyed.
//!
//! [`Scheduler::reap_orphans`] runs when the engine starts: workers left by an earlier control
//! plane are destroyed unless their saga is still live and they can come back, in which case
//! they are adopted and kept for that saga's steps. A worker can come back if it holds an
//! unexpired, unrevoked certificate from the hub's CA ([`HubPki::has_certified`], which survives
//! restarts). One provisioned but not yet registered when the control plane stopped cannot: its
//! registration token died with that control plane. It runs no job either (jobs are assigned
//! only over a session, which needs the certificate), so it is destroyed rather than left to
//! hold a slot, and to keep its saga's next attempt waiting, until its claim timeout.
//!
//! [`HubPki::has_certified`]: crate::pki::HubPki::has_certified
//!
//! **A worker that runs a job is never handed to another step.** The scheduler follows the hub's
//! registry of connected workers and the jobs running on each (announced when an agent
//! reconnects, until their results arrive, cancelled ones included). An idle worker is handed
//! out only once it is connected and runs nothing, except to the step whose earlier attempt it
//! runs: that step gets exactly that worker and re-attaches to its job. A request that names
//! earlier attempts gets no other worker while one of them may still run somewhere: while an
//! adopted worker of its saga has not reconnected yet, or while a worker that ran one of them
//! is still being destroyed. So a job is never started twice, however many jobs, sagas and
//! branches were in flight.
//!
//! A reused worker serves any saga whose request matches its provider, but keeps the saga label
//! it was provisioned with: after a restart, it is judged by that first saga. A job of another
//! saga running on it then may lose its worker to the reaper, and is retried like any lost job.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::hub::Hub;
use crate::jobs::{LeaseEnd, PoolError, WorkerLease, WorkerPool, WorkerRequest};
use crate::metrics::Metrics;
use crate::peers::{Listeners, PeerListeners, address_lists};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use hodei_providers::provider::{AgentEnv, Provider, ProviderError, SAGA_ID_LABEL, WorkerSpec, WorkerState};

/// What the scheduler does with a worker once its job is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reuse {
    /// One job per worker: destroyed when the job ends.
    Ephemeral,
    /// Kept for further jobs, and destroyed once idle for this long.
    Idle(Duration),
}

/// How the scheduler uses one provider.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProviderPolicy {
    /// The most workers of this provider at once, whatever their state. At least 1.
    pub max_workers: usize,
    /// Ephemeral or reused workers.
    pub reuse: Reuse,
    /// How long a new worker has to connect to the hub before it is destroyed.
    pub registration_deadline: Duration,
    /// The image (or rootfs) workers boot; the provider's default when `None`.
    pub image: Option<String>,
    /// The provider-specific section of every worker spec.
    pub provider_config: BTreeMap<String, String>,
}

impl Default for ProviderPolicy {
    /// Four ephemeral workers, thirty seconds to register.
    fn default() -> Self {
        Self {
            max_workers: 4,
            reuse: Reuse::Ephemeral,
            registration_deadline: Duration::from_secs(30),
            image: None,
            provider_config: BTreeMap::new(),
        }
    }
}

impl ProviderPolicy {
    /// The default policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the cap on concurrent workers.
    pub fn max_workers(mut self, max: usize) -> Self {
        self.max_workers = max;
        self
    }

    /// One job per worker.
    pub fn ephemeral(mut self) -> Self {
        self.reuse = Reuse::Ephemeral;
        self
    }

    /// Keeps workers for further jobs until idle for `idle_timeout`.
    pub fn reuse_for(mut self, idle_timeout: Duration) -> Self {
        self.reuse = Reuse::Idle(idle_timeout);
        self
    }

    /// Sets the registration deadline.
    pub fn registration_deadline(mut self, deadline: Duration) -> Self {
        self.registration_deadline = deadline;
        self
    }

    /// Sets the image.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// Sets one provider-specific setting.
    pub fn config(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.provider_config.insert(name.into(), value.into());
        self
    }

    /// How long an adopted worker waits for its saga to claim it: the idle timeout of reused
    /// workers, else the registration deadline, the time a resumed saga has to come back for it.
    fn claim_timeout(&self) -> Duration {
        match self.reuse {
            Reuse::Idle(timeout) => timeout,
            Reuse::Ephemeral => self.registration_deadline,
        }
    }
}

/// What building a scheduler can fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The scheduler runs timers and clean-ups as tasks, so it must be built inside a runtime.
    #[error("the scheduler must be built inside a tokio runtime")]
    NoRuntime,
    /// Two providers with one name: a job's hint could not tell them apart.
    #[error("two providers are named `{name}`")]
    DuplicateProvider {
        /// The name.
        name: String,
    },
    /// A policy that can never hand out a worker.
    #[error("provider `{provider}`: {reason}")]
    InvalidPolicy {
        /// The provider.
        provider: String,
        /// What is wrong.
        reason: String,
    },
    /// The scheduler holds no worker with this id.
    #[error("no worker `{0}`")]
    UnknownWorker(String),
}

/// How many requests wait and how many workers are in each state, for tests and dashboards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerCounts {
    /// Requests waiting for capacity.
    pub queued: usize,
    /// Workers being provisioned or waiting to register.
    pub provisioning: usize,
    /// Workers running a job (or handed out and about to).
    pub leased: usize,
    /// Workers waiting for a job, adopted ones included.
    pub idle: usize,
    /// Workers being destroyed (they still count against their provider's cap).
    pub destroying: usize,
}

impl SchedulerCounts {
    /// Every worker the scheduler holds, in any state.
    pub fn workers(&self) -> usize {
        self.provisioning + self.leased + self.idle + self.destroying
    }
}

/// What [`Scheduler::reap_orphans`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ReapReport {
    /// Workers destroyed: their saga is not live, or they carry none.
    pub destroyed: Vec<String>,
    /// Workers kept for their live saga.
    pub adopted: Vec<String>,
    /// Providers that could not be listed, or workers that could not be destroyed.
    pub errors: Vec<ProviderError>,
}

/// Builds a [`Scheduler`].
#[derive(Debug)]
pub struct SchedulerBuilder {
    hub: Hub,
    registration_addr: SocketAddr,
    session_addr: SocketAddr,
    providers: Vec<Slot>,
    metrics: Option<Metrics>,
    peers: Option<Arc<dyn PeerListeners>>,
}

impl SchedulerBuilder {
    /// Takes workers from `provider` under `policy`. Providers are tried in the order added.
    pub fn provider(mut self, provider: Arc<dyn Provider>, policy: ProviderPolicy) -> Self {
        self.providers.push(Slot { provider, policy });
        self
    }

    /// Records queue waits, provisioning times and lost workers in `metrics`.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Hands each new worker the listeners of `peers` after this hub's own, read as it is
    /// provisioned: its agent moves on to another control plane when this one is gone.
    pub fn peers(mut self, peers: Arc<dyn PeerListeners>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// Whether a provider was added.
    pub fn has_providers(&self) -> bool {
        !self.providers.is_empty()
    }

    /// The scheduler. Must run inside a tokio runtime.
    pub fn build(self) -> Result<Scheduler, SchedulerError> {
        let runtime = Handle::try_current().map_err(|_| SchedulerError::NoRuntime)?;
        for (i, slot) in self.providers.iter().enumerate() {
            let name = slot.provider.name();
            if self.providers[..i].iter().any(|other| other.provider.name() == name) {
                return Err(SchedulerError::DuplicateProvider { name: name.to_owned() });
            }
            if slot.policy.max_workers == 0 {
                return Err(SchedulerError::InvalidPolicy {
                    provider: name.to_owned(),
                    reason: "max_workers is 0, so no job could ever run".to_owned(),
                });
            }
        }
        let inner = Arc::new(Inner {
            listeners: Listeners { registration: self.registration_addr, session: self.session_addr },
            peers: self.peers,
            providers: self.providers,
            state: Mutex::new(State::default()),
            counts: watch::Sender::new(SchedulerCounts::default()),
            runtime,
            id_prefix: format!("{:08x}", nonce() as u32),
            next_worker: AtomicU64::new(0),
            watcher: Mutex::new(None),
            hub: self.hub,
            metrics: self.metrics,
        });
        let watcher = inner.runtime.spawn(follow_hub(Arc::downgrade(&inner)));
        *inner.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(watcher);
        Ok(Scheduler { inner })
    }
}

/// Hands out workers for pooled jobs, provisioning them on demand. See the
/// [module documentation](self). Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("providers", &self.inner.providers)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler whose workers dial `hub` at `registration_addr` and `session_addr` (the
    /// addresses of its listeners, as the workers can reach them).
    pub fn builder(hub: Hub, registration_addr: SocketAddr, session_addr: SocketAddr) -> SchedulerBuilder {
        SchedulerBuilder {
            hub,
            registration_addr,
            session_addr,
            providers: Vec::new(),
            metrics: None,
            peers: None,
        }
    }

    /// Requests waiting and workers held, now.
    pub fn counts(&self) -> SchedulerCounts {
        *self.inner.counts.borrow()
    }

    /// The counts, notified on every change, so that callers wait on them rather than poll.
    pub fn watch_counts(&self) -> watch::Receiver<SchedulerCounts> {
        self.inner.counts.subscribe()
    }

    /// How many workers each provider has in each state (`provisioning`, `leased`, `idle`,
    /// `destroying`), now. Every provider and state is listed, at zero too, so that a series
    /// does not vanish when its last worker goes.
    pub fn census(&self) -> BTreeMap<(String, &'static str), usize> {
        let mut census = BTreeMap::new();
        for slot in &self.inner.providers {
            for state in Phase::NAMES {
                census.insert((slot.provider.name().to_owned(), state), 0);
            }
        }
        let state = self.inner.lock();
        for worker in state.workers.values() {
            let provider = self.inner.providers[worker.provider].provider.name().to_owned();
            *census.entry((provider, worker.phase.name())).or_default() += 1;
        }
        census
    }

    /// The ids of the workers held now, with their provider's name.
    pub fn workers(&self) -> BTreeMap<String, String> {
        let state = self.inner.lock();
        state
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), self.inner.providers[w.provider].provider.name().to_owned()))
            .collect()
    }

    /// The labels of each held worker: those of the provider it runs under, which jobs are
    /// matched against.
    pub fn worker_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let state = self.inner.lock();
        state
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), self.inner.providers[w.provider].provider.labels()))
            .collect()
    }

    /// The ids of the workers being drained: they take no new jobs and are destroyed once the
    /// job they run ends.
    pub fn draining(&self) -> std::collections::BTreeSet<String> {
        self.inner.lock().workers.iter().filter(|(_, w)| w.draining).map(|(id, _)| id.clone()).collect()
    }

    /// Drains `worker_id`: it gets no new job, finishes the one it runs (a step that re-attaches
    /// to that job after a restart still finds it there), and is then destroyed, whatever its
    /// provider's reuse policy. An idle worker is destroyed at once.
    pub fn drain(&self, worker_id: &str) -> Result<(), SchedulerError> {
        self.inner.mutate(|inner, state| {
            let worker = state
                .workers
                .get_mut(worker_id)
                .ok_or_else(|| SchedulerError::UnknownWorker(worker_id.to_owned()))?;
            worker.draining = true;
            if matches!(worker.phase, Phase::Idle { .. }) {
                inner.retire(state, worker_id);
            }
            Ok(())
        })
    }

    /// Destroys `worker_id` now, with the job it runs: that attempt ends as lost, and its step
    /// retries it on another worker under its retry policy.
    pub fn remove(&self, worker_id: &str) -> Result<(), SchedulerError> {
        self.inner.mutate(|inner, state| {
            if !state.workers.contains_key(worker_id) {
                return Err(SchedulerError::UnknownWorker(worker_id.to_owned()));
            }
            inner.retire(state, worker_id);
            Ok(())
        })
    }

    /// Deals with workers an earlier control plane left: every worker its provider lists that
    /// this scheduler does not hold is destroyed, unless it carries the label of a saga for which
    /// `is_live` is true, is still running, and can connect to the hub (it holds a certificate
    /// from the hub's CA that is neither expired nor revoked). Those are adopted: the next
    /// request of that saga gets the worker, and one not claimed within its policy's timeout
    /// (the idle timeout, or for ephemeral workers the registration deadline) is destroyed.
    ///
    /// A worker of a live saga that never registered is destroyed: it runs none of the saga's
    /// jobs, and could never register with this control plane (see the
    /// [module documentation](self)).
    pub async fn reap_orphans(&self, is_live: impl Fn(&str) -> bool) -> ReapReport {
        let mut report = ReapReport::default();
        for (index, slot) in self.inner.providers.iter().enumerate() {
            let listed = match slot.provider.list().await {
                Ok(listed) => listed,
                Err(e) => {
                    report.errors.push(e);
                    continue;
                }
            };
            for worker in listed {
                if self.inner.lock().workers.contains_key(&worker.worker_id) {
                    continue;
                }
                let live_saga = worker.labels.get(SAGA_ID_LABEL).filter(|saga| is_live(saga));
                let running = matches!(worker.state, WorkerState::Running | WorkerState::Pending);
                let pki = self.inner.hub.pki();
                let can_connect =
                    pki.has_certified(&worker.worker_id) && !pki.is_worker_revoked(&worker.worker_id);
                if live_saga.is_some() && running && !can_connect {
                    tracing::info!(
                        worker = %worker.worker_id,
                        "a worker of a live saga holds no valid certificate (it never registered, or cannot \
                         connect any more): it runs no job, destroying it rather than adopting it"
                    );
                }
                match live_saga {
                    Some(saga) if running && can_connect => {
                        let saga = saga.clone();
                        self.inner.mutate(|inner, state| {
                            let mut adopted = Worker::new(index, Phase::Leased);
                            adopted.adopted_for = Some(saga.clone());
                            adopted.kept_while_busy = true;
                            adopted
                                .jobs
                                .extend(state.running.get(&worker.worker_id).into_iter().flatten().cloned());
                            state.workers.insert(worker.worker_id.clone(), adopted);
                            inner.make_idle(
                                state,
                                &worker.worker_id,
                                Some(saga),
                                slot.policy.claim_timeout(),
                            );
                        });
                        tracing::info!(worker = %worker.worker_id, "adopted a worker of a live saga");
                        report.adopted.push(worker.worker_id);
                    }
                    _ => match slot.provider.destroy(&worker.worker_id).await {
                        Ok(()) => {
                            tracing::info!(worker = %worker.worker_id, "reaped an orphaned worker");
                            report.destroyed.push(worker.worker_id);
                        }
                        Err(e) => report.errors.push(e),
                    },
                }
            }
        }
        report
    }

    /// Fails every waiting request, destroys every worker, and returns once they are gone.
    /// Workers still registering are destroyed when their registration ends.
    pub async fn shutdown(&self) {
        let mut counts = self.watch_counts();
        self.inner.mutate(|inner, state| {
            state.closed = true;
            let ids: Vec<String> = state
                .workers
                .iter()
                .filter(|(_, w)| matches!(w.phase, Phase::Idle { .. } | Phase::Leased))
                .map(|(id, _)| id.clone())
                .collect();
            for id in ids {
                inner.retire(state, &id);
            }
        });
        let _ = counts.wait_for(|counts| counts.workers() == 0 && counts.queued == 0).await;
    }

    /// Lets go of every worker without destroying it, for a restart: the next control plane
    /// finds them with [`Scheduler::reap_orphans`] and adopts those whose saga is still live,
    /// whose jobs keep running meanwhile. Waiting requests fail, and leases that end later
    /// leave their worker alone. Call it before stopping the engine, whose steps then drop
    /// their leases. Workers still registering are destroyed: no job ever ran on them.
    pub fn detach(&self) {
        self.inner.mutate(|_, state| {
            state.closed = true;
            state.detached = true;
            state.workers.retain(|_, worker| matches!(worker.phase, Phase::Provisioning | Phase::Destroying));
        });
    }
}

#[async_trait::async_trait]
impl WorkerPool for Scheduler {
    async fn acquire(&self, request: WorkerRequest) -> Result<WorkerLease, PoolError> {
        let asked = Instant::now();
        let candidates = self.inner.candidates(&request)?;
        loop {
            let claim = self.inner.wait_for_claim(&request, candidates.clone()).await?;
            let slot = &self.inner.providers[claim.provider];
            match &claim.kind {
                ClaimKind::New => {
                    self.inner.provision(&claim, &request, slot).await?;
                    return self.inner.lease(claim, &request.job_id, asked);
                }
                ClaimKind::Idle { reserved_for: None } => {
                    if self.inner.hub.connected_workers().contains_key(&claim.worker_id) {
                        return self.inner.lease(claim, &request.job_id, asked);
                    }
                    // It left since it went idle, before the watcher could drop it.
                    self.inner.discard(claim);
                }
                ClaimKind::Idle { reserved_for: Some(_) } => {
                    // An adopted worker may still be reconnecting after the restart.
                    let mut registry = self.inner.hub.watch_workers();
                    let registered =
                        self.inner.await_registration(&claim.worker_id, slot, &mut registry).await;
                    if let Err(e) = registered {
                        self.inner.discard(claim);
                        return Err(e);
                    }
                    return self.inner.lease(claim, &request.job_id, asked);
                }
            }
        }
    }
}

#[derive(Debug)]
struct Slot {
    provider: Arc<dyn Provider>,
    policy: ProviderPolicy,
}

struct Inner {
    hub: Hub,
    /// This hub's listeners, which its workers dial first.
    listeners: Listeners,
    /// The other control planes', dialled when this one is gone.
    peers: Option<Arc<dyn PeerListeners>>,
    providers: Vec<Slot>,
    state: Mutex<State>,
    counts: watch::Sender<SchedulerCounts>,
    runtime: Handle,
    /// Random per scheduler, so that ids never repeat across control-plane restarts.
    id_prefix: String,
    next_worker: AtomicU64,
    watcher: Mutex<Option<JoinHandle<()>>>,
    metrics: Option<Metrics>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            watcher.abort();
        }
    }
}

#[derive(Default)]
struct State {
    /// Waiting requests by (priority, highest first; then arrival).
    queue: BTreeMap<(Reverse<i32>, u64), Waiter>,
    next_arrival: u64,
    workers: HashMap<String, Worker>,
    next_generation: u64,
    closed: bool,
    /// Workers are let go of rather than destroyed (see [`Scheduler::detach`]).
    detached: bool,
    /// The hub's registry as last seen: connected workers and their running jobs.
    running: Running,
}

struct Waiter {
    saga_id: String,
    /// The step's earlier attempts: the worker running one of them is this waiter's.
    earlier_jobs: Vec<String>,
    candidates: Vec<usize>,
    grant: oneshot::Sender<Claim>,
}

#[derive(Debug)]
struct Worker {
    provider: usize,
    phase: Phase,
    /// Adopted from an earlier control plane with this saga's label: until it reconnects,
    /// nobody knows which jobs it runs.
    adopted_for: Option<String>,
    /// Kept while it holds a job, whatever its timeouts say: adopted, or handed over with its
    /// job to another engine that took the saga ([`LeaseEnd::HandedOver`]).
    kept_while_busy: bool,
    /// Every job leased on it or seen running on it: while it is being destroyed, those jobs
    /// may still run, and their steps wait.
    jobs: std::collections::BTreeSet<String>,
    /// Drained by an operator: no new job; destroyed instead of going idle.
    draining: bool,
}

impl Worker {
    fn new(provider: usize, phase: Phase) -> Self {
        Self {
            provider,
            phase,
            adopted_for: None,
            kept_while_busy: false,
            jobs: Default::default(),
            draining: false,
        }
    }

    /// Whether one of `waiter`'s earlier attempts may run on this worker without the scheduler
    /// knowing yet: it is adopted and not reconnected, or being destroyed.
    fn may_run_earlier_job(&self, id: &str, waiter: &Waiter, running: &Running) -> bool {
        let ran_one = self.jobs.iter().any(|job| waiter.earlier_jobs.contains(job));
        let unknown_of_saga = self.adopted_for.as_deref() == Some(waiter.saga_id.as_str())
            && self.jobs.is_empty()
            && !running.contains_key(id);
        match self.phase {
            Phase::Destroying => ran_one || unknown_of_saga,
            Phase::Idle { .. } => unknown_of_saga,
            Phase::Provisioning | Phase::Leased => false,
        }
    }
}

/// The hub's connected workers and the jobs running on each.
type Running = BTreeMap<String, std::collections::BTreeSet<String>>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Provisioning,
    Leased,
    /// `generation` tells this idle spell from later ones, so that an old timer does nothing.
    Idle {
        generation: u64,
        reserved_for: Option<String>,
    },
    Destroying,
}

impl Phase {
    const NAMES: [&'static str; 4] = ["provisioning", "leased", "idle", "destroying"];

    /// Its name in metrics: one of [`Phase::NAMES`].
    fn name(&self) -> &'static str {
        match self {
            Phase::Provisioning => "provisioning",
            Phase::Leased => "leased",
            Phase::Idle { .. } => "idle",
            Phase::Destroying => "destroying",
        }
    }
}

/// What a waiter can be given.
enum Grant {
    Idle(String),
    New(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClaimKind {
    New,
    Idle { reserved_for: Option<String> },
}

/// A worker handed to one request, until it becomes a lease. Dropped before that (the request
/// was cancelled, or provisioning failed), it gives the worker back: a new one is destroyed, an
/// idle one goes back to idle.
struct Claim {
    inner: Weak<Inner>,
    worker_id: String,
    provider: usize,
    kind: ClaimKind,
    settled: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.settled
            && let Some(inner) = self.inner.upgrade()
        {
            inner.mutate(|inner, state| inner.give_back(state, self));
        }
    }
}

/// Takes a request out of the queue when its `acquire` is dropped while waiting.
struct Queued {
    inner: Weak<Inner>,
    key: (Reverse<i32>, u64),
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.mutate(|_, state| {
                state.queue.remove(&self.key);
            });
        }
    }
}

impl Inner {
    /// The state is only changed in short critical sections that cannot panic midway.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state, then hands whatever became free to the waiters and publishes counts.
    fn mutate<R>(self: &Arc<Self>, change: impl FnOnce(&Arc<Self>, &mut State) -> R) -> R {
        let mut state = self.lock();
        let result = change(self, &mut state);
        self.dispatch(&mut state);
        let mut counts = SchedulerCounts { queued: state.queue.len(), ..SchedulerCounts::default() };
        for worker in state.workers.values() {
            match worker.phase {
                Phase::Provisioning => counts.provisioning += 1,
                Phase::Leased => counts.leased += 1,
                Phase::Idle { .. } => counts.idle += 1,
                Phase::Destroying => counts.destroying += 1,
            }
        }
        self.counts.send_if_modified(|old| std::mem::replace(old, counts) != counts);
        result
    }

    fn candidates(&self, request: &WorkerRequest) -> Result<Vec<usize>, PoolError> {
        let candidates: Vec<usize> = (0..self.providers.len())
            .filter(|&i| {
                let provider = &self.providers[i].provider;
                let offered = provider.labels();
                request.provider.as_deref().is_none_or(|hint| hint == provider.name())
                    && request.labels.iter().all(|(name, value)| offered.get(name) == Some(value))
            })
            .collect();
        if !candidates.is_empty() {
            return Ok(candidates);
        }
        let offers: Vec<String> = self
            .providers
            .iter()
            .map(|slot| {
                let labels: Vec<String> =
                    slot.provider.labels().iter().map(|(name, value)| format!("{name}={value}")).collect();
                format!("`{}` ({})", slot.provider.name(), labels.join(", "))
            })
            .collect();
        let wanted: Vec<String> =
            request.labels.iter().map(|(name, value)| format!("{name}={value}")).collect();
        let hint =
            request.provider.as_deref().map(|hint| format!(" from provider `{hint}`")).unwrap_or_default();
        Err(PoolError::Unsatisfiable {
            reason: format!(
                "no provider offers [{}]{hint}; the providers are: {}",
                wanted.join(", "),
                if offers.is_empty() { "none".to_owned() } else { offers.join("; ") }
            ),
        })
    }

    async fn wait_for_claim(
        self: &Arc<Self>,
        request: &WorkerRequest,
        candidates: Vec<usize>,
    ) -> Result<Claim, PoolError> {
        let (grant, granted) = oneshot::channel();
        let key = self.mutate(|_, state| {
            if state.closed {
                return None;
            }
            let key = (Reverse(request.priority), state.next_arrival);
            state.next_arrival += 1;
            let waiter = Waiter {
                saga_id: request.saga_id.clone(),
                earlier_jobs: request.earlier_jobs.clone(),
                candidates,
                grant,
            };
            state.queue.insert(key, waiter);
            Some(key)
        });
        let shut_down = || PoolError::Unavailable { reason: "the scheduler is shutting down".to_owned() };
        let key = key.ok_or_else(shut_down)?;
        let _queued = Queued { inner: Arc::downgrade(self), key };
        // The sender is only dropped without a claim when the scheduler shuts down.
        granted.await.map_err(|_| shut_down())
    }

    /// Hands free workers and capacity to waiters, best first, until none can be served.
    fn dispatch(self: &Arc<Self>, state: &mut State) {
        if state.closed {
            state.queue.clear();
            return;
        }
        loop {
            let found =
                state.queue.iter().find_map(|(key, waiter)| self.grantable(state, waiter).map(|g| (*key, g)));
            let Some((key, grant)) = found else { return };
            let Some(waiter) = state.queue.remove(&key) else { return };
            let claim = match grant {
                Grant::Idle(worker_id) => {
                    let Some(worker) = state.workers.get_mut(&worker_id) else { continue };
                    let Phase::Idle { reserved_for, .. } =
                        std::mem::replace(&mut worker.phase, Phase::Leased)
                    else {
                        continue;
                    };
                    let provider = worker.provider;
                    self.claim(worker_id, provider, ClaimKind::Idle { reserved_for })
                }
                Grant::New(provider) => {
                    let worker_id = self.new_worker_id(provider);
                    state.workers.insert(worker_id.clone(), Worker::new(provider, Phase::Provisioning));
                    self.claim(worker_id, provider, ClaimKind::New)
                }
            };
            // The waiter gave up between being queued and now: the claim goes back at once.
            if let Err(mut claim) = waiter.grant.send(claim) {
                claim.settled = true;
                self.give_back(state, &claim);
            }
        }
    }

    /// What `waiter` could have now, in this order: the worker that runs one of its earlier
    /// attempts; nothing, while one of them may still run where the scheduler cannot see yet;
    /// an idle worker reserved for its saga, then any idle one, connected and running nothing;
    /// room for a new one.
    fn grantable(&self, state: &State, waiter: &Waiter) -> Option<Grant> {
        let offered = |worker: &Worker| waiter.candidates.contains(&worker.provider);
        let idle = |worker: &Worker| matches!(worker.phase, Phase::Idle { .. });
        if !waiter.earlier_jobs.is_empty() {
            let runs_earlier = state.workers.iter().find(|(id, worker)| {
                idle(worker)
                    && offered(worker)
                    && state
                        .running
                        .get(*id)
                        .is_some_and(|jobs| jobs.iter().any(|job| waiter.earlier_jobs.contains(job)))
            });
            if let Some((id, _)) = runs_earlier {
                return Some(Grant::Idle(id.clone()));
            }
            if state.workers.iter().any(|(id, worker)| worker.may_run_earlier_job(id, waiter, &state.running))
            {
                return None;
            }
        }
        let free = |reserved: Option<&str>| {
            state.workers.iter().find_map(|(id, worker)| match &worker.phase {
                Phase::Idle { reserved_for, .. }
                    if reserved_for.as_deref() == reserved
                        && !worker.draining
                        && offered(worker)
                        && state.running.get(id).is_some_and(|jobs| jobs.is_empty()) =>
                {
                    Some(Grant::Idle(id.clone()))
                }
                _ => None,
            })
        };
        free(Some(&waiter.saga_id)).or_else(|| free(None)).or_else(|| {
            waiter.candidates.iter().copied().find_map(|provider| {
                let held = state.workers.values().filter(|w| w.provider == provider).count();
                (held < self.providers[provider].policy.max_workers).then_some(Grant::New(provider))
            })
        })
    }

    fn claim(self: &Arc<Self>, worker_id: String, provider: usize, kind: ClaimKind) -> Claim {
        Claim { inner: Arc::downgrade(self), worker_id, provider, kind, settled: false }
    }

    fn give_back(self: &Arc<Self>, state: &mut State, claim: &Claim) {
        match &claim.kind {
            ClaimKind::New => self.retire(state, &claim.worker_id),
            ClaimKind::Idle { reserved_for } if !state.closed => {
                let timeout = self.providers[claim.provider].policy.claim_timeout();
                self.make_idle(state, &claim.worker_id, reserved_for.clone(), timeout);
            }
            ClaimKind::Idle { .. } => self.retire(state, &claim.worker_id),
        }
    }

    /// Destroys a claimed worker that turned out unusable, rather than giving it back.
    fn discard(self: &Arc<Self>, mut claim: Claim) {
        self.mutate(|inner, state| {
            claim.settled = true;
            inner.retire(state, &claim.worker_id);
        });
    }

    fn new_worker_id(&self, provider: usize) -> String {
        let name: String = self.providers[provider]
            .provider
            .name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
            .take(48)
            .collect();
        let n = self.next_worker.fetch_add(1, Ordering::Relaxed);
        format!("{name}-{}-{n}", self.id_prefix)
    }

    /// Makes `worker_id` idle (for `reserved_for`'s saga only, when set) and arms its timer.
    fn make_idle(
        self: &Arc<Self>,
        state: &mut State,
        worker_id: &str,
        reserved_for: Option<String>,
        timeout: Duration,
    ) {
        let generation = state.next_generation;
        state.next_generation += 1;
        let Some(worker) = state.workers.get_mut(worker_id) else { return };
        if worker.phase == Phase::Destroying {
            return;
        }
        if worker.draining {
            self.retire(state, worker_id);
            return;
        }
        let kept_while_busy = worker.kept_while_busy;
        worker.phase = Phase::Idle { generation, reserved_for: reserved_for.clone() };
        let (inner, worker_id) = (Arc::downgrade(self), worker_id.to_owned());
        self.runtime.spawn(async move {
            tokio::time::sleep(timeout).await;
            let still_idle = |state: &State| {
                state.workers.get(&worker_id).is_some_and(
                    |w| matches!(&w.phase, Phase::Idle { generation: g, .. } if *g == generation),
                )
            };
            let Some(inner) = inner.upgrade() else { return };
            // An adopted or handed-over worker may run a job that a step on another engine waits
            // for (its agent went on with another control plane): destroyed, the job would be
            // lost and run again. It is kept for another timeout while it holds one.
            let holds_a_job = kept_while_busy && {
                let (known, running_here) = {
                    let state = inner.lock();
                    let running = state.running.get(&worker_id).is_some_and(|jobs| !jobs.is_empty());
                    (state.workers.contains_key(&worker_id), running)
                };
                known && (running_here || inner.hub.holds_a_job(&worker_id).await)
            };
            inner.mutate(|inner, state| {
                if !still_idle(state) {
                    return;
                }
                if holds_a_job {
                    tracing::info!(worker = %worker_id, "idle timeout of a worker that holds a job: kept");
                    inner.make_idle(state, &worker_id, reserved_for, timeout);
                } else {
                    tracing::debug!(worker = %worker_id, "idle timeout: destroying the worker");
                    inner.retire(state, &worker_id);
                }
            });
        });
    }

    /// Destroys `worker_id` in the background; it keeps its place against the cap until it is
    /// gone, so the cap bounds real workers.
    fn retire(self: &Arc<Self>, state: &mut State, worker_id: &str) {
        let Some(worker) = state.workers.get_mut(worker_id) else { return };
        if worker.phase == Phase::Destroying {
            return;
        }
        if state.detached && worker.phase != Phase::Provisioning {
            state.workers.remove(worker_id);
            return;
        }
        worker.phase = Phase::Destroying;
        // Weak, like every task the scheduler leaves behind: a destroy still running when the
        // control plane stops must not hold the hub, and with it the data directory's lock,
        // past the stop.
        let (inner, worker_id) = (Arc::downgrade(self), worker_id.to_owned());
        let provider = self.providers[worker.provider].provider.clone();
        self.runtime.spawn(async move {
            if let Err(e) = provider.destroy(&worker_id).await {
                tracing::warn!(worker = %worker_id, error = %e, "destroying a worker failed");
            }
            if let Some(inner) = inner.upgrade() {
                inner.mutate(|_, state| state.workers.remove(&worker_id));
            }
        });
    }

    fn release(self: &Arc<Self>, worker_id: &str, end: LeaseEnd) {
        self.mutate(|inner, state| {
            let Some(worker) = state.workers.get(worker_id) else { return };
            if worker.phase != Phase::Leased {
                return;
            }
            let policy = &inner.providers[worker.provider].policy;
            if let (LeaseEnd::WorkerLost, Some(metrics)) = (&end, &inner.metrics) {
                metrics.worker_lost(inner.providers[worker.provider].provider.name());
            }
            match (end, policy.reuse) {
                (LeaseEnd::Finished, Reuse::Idle(timeout))
                    if !state.closed && inner.hub.connected_workers().contains_key(worker_id) =>
                {
                    // Its job reached a result: nothing it ran can still be running.
                    if let Some(worker) = state.workers.get_mut(worker_id) {
                        worker.jobs.clear();
                    }
                    inner.make_idle(state, worker_id, None, timeout);
                }
                (LeaseEnd::HandedOver, _) if !state.closed => {
                    if let Some(worker) = state.workers.get_mut(worker_id) {
                        worker.kept_while_busy = true;
                    }
                    inner.make_idle(state, worker_id, None, policy.claim_timeout());
                }
                _ => inner.retire(state, worker_id),
            }
        });
    }

    /// Hands the claimed worker to the job that asked for it at `asked`.
    fn lease(
        self: &Arc<Self>,
        mut claim: Claim,
        job_id: &str,
        asked: Instant,
    ) -> Result<WorkerLease, PoolError> {
        let leased = self.mutate(|_, state| {
            if state.closed {
                return false;
            }
            claim.settled = true;
            if let Some(worker) = state.workers.get_mut(&claim.worker_id) {
                worker.phase = Phase::Leased;
                worker.jobs.insert(job_id.to_owned());
            }
            true
        });
        if !leased {
            // Dropping the claim destroys the worker.
            return Err(PoolError::Unavailable { reason: "the scheduler is shutting down".to_owned() });
        }
        if let Some(metrics) = &self.metrics {
            metrics.job_dequeued(self.providers[claim.provider].provider.name(), asked.elapsed());
        }
        let inner = Arc::downgrade(self);
        let worker_id = claim.worker_id.clone();
        let provider = self.providers[claim.provider].provider.clone();
        let explained = claim.worker_id.clone();
        let lease = WorkerLease::new(claim.worker_id.clone(), move |end| {
            if let Some(inner) = inner.upgrade() {
                inner.release(&worker_id, end);
            }
        });
        Ok(lease.with_end_reason(move |result| {
            let (provider, worker_id) = (provider.clone(), explained.clone());
            async move {
                provider.job_end_reason(&worker_id, &result).await.unwrap_or_else(|e| {
                    tracing::warn!(worker = %worker_id, error = %e, "could not ask why a job ended");
                    None
                })
            }
        }))
    }

    /// Provisions the claimed worker and waits for it to register.
    async fn provision(&self, claim: &Claim, request: &WorkerRequest, slot: &Slot) -> Result<(), PoolError> {
        let began = Instant::now();
        let provisioned = self.provision_untimed(claim, request, slot).await;
        if let Some(metrics) = &self.metrics {
            metrics.worker_provisioned(slot.provider.name(), provisioned.is_ok(), began.elapsed());
        }
        provisioned
    }

    async fn provision_untimed(
        &self,
        claim: &Claim,
        request: &WorkerRequest,
        slot: &Slot,
    ) -> Result<(), PoolError> {
        let token = self.hub.pki().issue_token(&claim.worker_id).map_err(|e| PoolError::Unavailable {
            reason: format!("cannot issue a registration token for `{}`: {e}", claim.worker_id),
        })?;
        let peers = match self.peers.clone() {
            // The lookup blocks on the database.
            Some(peers) => tokio::task::spawn_blocking(move || peers.peers()).await.unwrap_or_default(),
            None => Vec::new(),
        };
        let (registration, session) = address_lists(self.listeners, &peers);
        let agent = AgentEnv::new(registration, session, token.as_str(), self.hub.pki().ca_bundle_pem());
        let mut spec = WorkerSpec::new(claim.worker_id.clone(), agent);
        spec.image = slot.policy.image.clone();
        spec.resources = request.resources;
        spec.labels = request.labels.clone();
        spec.saga_id = Some(request.saga_id.clone());
        spec.provider_config = slot.policy.provider_config.clone();
        // Subscribed before the worker starts, so that a quick registration is not missed.
        let mut registry = self.hub.watch_workers();
        slot.provider.provision(&spec).await.map_err(|e| {
            let reason = e.to_string();
            if e.is_retryable() {
                PoolError::Unavailable { reason }
            } else {
                PoolError::Unsatisfiable { reason }
            }
        })?;
        self.await_registration(&claim.worker_id, slot, &mut registry).await
    }

    /// Waits for `worker_id` to connect to the hub, within the registration deadline, and fails
    /// early if its provider reports it ended. Failures carry the worker's own output.
    async fn await_registration(
        &self,
        worker_id: &str,
        slot: &Slot,
        registry: &mut crate::hub::WorkersWatch,
    ) -> Result<(), PoolError> {
        let provider = slot.provider.as_ref();
        let deadline = slot.policy.registration_deadline;
        // Registration is an event from the hub; an early exit is one from the provider.
        let exited = async {
            loop {
                match provider.exited(worker_id).await {
                    Ok(WorkerState::Exited { code, reason }) => {
                        let code =
                            code.map_or_else(|| "no exit code".to_owned(), |c| format!("exit code {c}"));
                        return reason.map_or(code.clone(), |reason| format!("{code}: {reason}"));
                    }
                    Ok(WorkerState::Gone) => return "it is gone".to_owned(),
                    // Not an end, whatever a provider's `exited` returned: ask again later.
                    Ok(_) => tokio::time::sleep(hodei_providers::provider::EXIT_CHECK_INTERVAL).await,
                    Err(e) => {
                        // The provider cannot tell now (its API is down, say): the registration
                        // deadline still bounds the wait.
                        tracing::debug!(worker = worker_id, error = %e, "worker state unknown");
                        tokio::time::sleep(hodei_providers::provider::EXIT_CHECK_INTERVAL).await;
                    }
                }
            }
        };
        let error = tokio::select! {
            connected = registry.wait_for(|workers| workers.contains_key(worker_id)) => match connected {
                Some(_) => return Ok(()),
                None => return Err(PoolError::Unavailable { reason: "the hub is gone".to_owned() }),
            },
            status = exited => ProviderError::ExitedBeforeRegistering {
                provider: provider.name().to_owned(),
                worker_id: worker_id.to_owned(),
                status,
                output: output(provider, worker_id).await,
            },
            () = tokio::time::sleep(deadline) => ProviderError::RegistrationTimeout {
                provider: provider.name().to_owned(),
                worker_id: worker_id.to_owned(),
                deadline,
                output: output(provider, worker_id).await,
            },
        };
        tracing::warn!(worker = worker_id, error = %error, "worker did not register");
        Err(PoolError::Unavailable { reason: error.to_string() })
    }
}

async fn output(provider: &dyn Provider, worker_id: &str) -> String {
    provider.output(worker_id).await.unwrap_or_else(|e| format!("(its output could not be read: {e})"))
}

/// Follows the hub's registry: every connect, disconnect and change of a worker's running jobs
/// is mirrored into the state (which hands out what became free), and idle workers that
/// disconnect are dropped: a worker that left would fail its next job. Not those kept while
/// they hold a job (adopted, or handed over with their saga's job), which may have taken that
/// job to another control plane sharing the store.
async fn follow_hub(inner: Weak<Inner>) {
    let Some(mut registry) = inner.upgrade().map(|inner| inner.hub.watch_workers()) else { return };
    loop {
        let running = registry.running_jobs();
        let Some(inner) = inner.upgrade() else { return };
        inner.mutate(|inner, state| {
            for (id, jobs) in &running {
                if let Some(worker) = state.workers.get_mut(id) {
                    worker.jobs.extend(jobs.iter().cloned());
                }
            }
            let gone: Vec<String> = state
                .workers
                .iter()
                // Not one kept while it holds a job: it may have left for another control plane
                // sharing the store with that job (its idle timeout looks there).
                .filter(|(id, worker)| {
                    matches!(worker.phase, Phase::Idle { reserved_for: None, .. })
                        && !worker.kept_while_busy
                        && !running.contains_key(*id)
                })
                .map(|(id, _)| id.clone())
                .collect();
            state.running = running;
            for id in gone {
                tracing::info!(worker = %id, "idle worker disconnected: dropping it");
                inner.retire(state, &id);
            }
        });
        drop(inner);
        if registry.changed().await.is_none() {
            return;
        }
    }
}

/// Random enough to keep worker ids of successive schedulers apart: std's hasher keys are random
/// per process, and the clock and pid differ between restarts.
fn nonce() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish()
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner").field("providers", &self.providers).finish_non_exhaustive()
    }
}
