//! The engine: registration, starting and resuming sagas, inspection, cancellation and
//! shutdown.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
#[cfg(feature = "sled")]
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};
use tracing::Instrument;

use crate::codec::{decode_payload, encode_payload};
use crate::driver::{Control, Journal, drive};
use crate::error::{Error, Result};
use crate::event::{Event, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};
use crate::retry::StepError;
use crate::saga::{Saga, SagaDefinition, SagaRun};
use crate::store::EventStore;
use crate::timers::Timers;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Limits and settings of an engine.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EngineConfig {
    /// The largest encoded saga input, step input or step output accepted, in bytes.
    pub max_payload_bytes: usize,
    /// How many engine events a slow subscriber may fall behind before it misses some.
    pub event_buffer: usize,
}

impl Default for EngineConfig {
    /// 2 MiB payloads (Temporal's limit too), 4096 buffered events.
    fn default() -> Self {
        Self { max_payload_bytes: 2 << 20, event_buffer: 4096 }
    }
}

/// Something that happened in the engine, for UIs and custom control planes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EngineEvent {
    /// The saga it happened to.
    pub saga_id: SagaId,
    /// What happened.
    pub kind: EngineEventKind,
}

/// What an [`EngineEvent`] reports.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum EngineEventKind {
    /// An event was written to the saga's journal.
    Journaled(RecordedEvent),
    /// The saga's status changed.
    Status(SagaStatus),
}

/// A step, by number and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRef {
    /// The step number.
    pub index: u32,
    /// The step name.
    pub name: String,
}

/// How a saga ended.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Outcome<O> {
    /// The body returned this output.
    Completed(O),
    /// The saga failed (or was cancelled) and every compensation succeeded.
    Compensated {
        /// Why it failed.
        cause: String,
    },
    /// A compensation failed for good. An operator must finish what is listed in `undone`.
    CompensationFailed {
        /// The step whose compensation failed.
        step: StepRef,
        /// Its error.
        error: String,
        /// The compensations that did not run, the failed one first, in the order they were due.
        undone: Vec<StepRef>,
    },
    /// The saga failed and had nothing to compensate.
    Failed {
        /// Why.
        cause: String,
    },
}

/// A filter for [`Engine::list`].
#[derive(Clone, Debug, Default)]
pub struct SagaFilter {
    definition: Option<String>,
    status: Option<&'static str>,
}

impl SagaFilter {
    /// Only sagas of this definition.
    pub fn definition(mut self, name: impl Into<String>) -> Self {
        self.definition = Some(name.into());
        self
    }

    /// Only sagas whose status has the same kind as `status` (a parked saga matches any
    /// `Parked`, whatever its reason).
    pub fn status(mut self, status: &SagaStatus) -> Self {
        self.status = Some(status.kind());
        self
    }

    fn matches(&self, record: &SagaRecord) -> bool {
        self.definition.as_ref().is_none_or(|d| *d == record.definition)
            && self.status.is_none_or(|k| k == record.status.kind())
    }
}

/// What [`Engine::shutdown`] left behind. All of it resumes on the next start.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every saga still in flight, as the store records it.
    pub in_flight: Vec<SagaId>,
    /// The sagas whose running step was cut off at the deadline.
    pub interrupted: Vec<SagaId>,
}

/// Configures and starts an [`Engine`].
pub struct EngineBuilder {
    store: StoreChoice,
    definitions: Vec<SagaDefinition>,
    config: EngineConfig,
}

enum StoreChoice {
    Given(Arc<dyn EventStore>),
    #[cfg(feature = "sled")]
    DataDir(PathBuf),
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("definitions", &self.definitions)
            .field("config", &self.config)
            .finish()
    }
}

impl EngineBuilder {
    /// Keeps journals in this store.
    pub fn store(mut self, store: impl EventStore) -> Self {
        self.store = StoreChoice::Given(Arc::new(store));
        self
    }

    /// Keeps journals in a sled store in this directory (the default is `./hodei-data`).
    #[cfg(feature = "sled")]
    pub fn data_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = StoreChoice::DataDir(path.into());
        self
    }

    /// Registers a definition. Several versions of one name may be registered.
    pub fn register(mut self, definition: SagaDefinition) -> Self {
        self.definitions.push(definition);
        self
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// The largest encoded payload accepted, in bytes.
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.config.max_payload_bytes = limit;
        self
    }

    /// Opens the store and resumes every saga in flight. Must be called inside a Tokio
    /// runtime.
    // Without the sled feature the store has one source, so the match is infallible there.
    #[cfg_attr(not(feature = "sled"), allow(clippy::infallible_destructuring_match))]
    pub async fn start(self) -> Result<Engine> {
        let store: Arc<dyn EventStore> = match self.store {
            StoreChoice::Given(store) => store,
            #[cfg(feature = "sled")]
            StoreChoice::DataDir(path) => Arc::new(crate::store::SledStore::open(path)?),
        };
        let shutdown = watch::Sender::new(false);
        let inner = Arc::new(Inner {
            store,
            registry: RwLock::default(),
            live: Mutex::default(),
            bus: broadcast::Sender::new(self.config.event_buffer.max(1)),
            timers: Timers::start(shutdown.subscribe()),
            shutdown,
            accepting: AtomicBool::new(true),
            drivers: watch::Sender::new(0),
            recovered: watch::Sender::new(false),
            config: self.config,
        });
        for definition in self.definitions {
            inner.add_definition(definition)?;
        }
        let engine = Engine { inner };
        let recovered = engine.recover();
        // Also on failure: the drivers already spawned must not wait forever.
        engine.inner.recovered.send_replace(true);
        recovered?;
        Ok(engine)
    }
}

/// The durable saga engine. Cheap to clone; every clone drives the same sagas.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("store", &self.inner.store).finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    store: Arc<dyn EventStore>,
    registry: RwLock<BTreeMap<String, BTreeMap<u32, SagaDefinition>>>,
    live: Mutex<HashMap<SagaId, Arc<LiveSaga>>>,
    bus: broadcast::Sender<EngineEvent>,
    /// Every durable wait of every saga, and the one task that wakes them.
    pub timers: Arc<Timers>,
    shutdown: watch::Sender<bool>,
    accepting: AtomicBool,
    drivers: watch::Sender<usize>,
    /// Set once recovery has adopted every saga in flight: drivers wait for it, so that a
    /// resumed parent finds its resumed children (recovery adopts in id order).
    pub recovered: watch::Sender<bool>,
    pub config: EngineConfig,
}

/// An in-flight saga known to this engine: running, parked, or waiting for its version.
pub(crate) struct LiveSaga {
    pub journal: Arc<Journal>,
    pub control: Arc<Control>,
    pub finished: watch::Sender<Option<Arc<RecordedEvent>>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// Decrements the driver count however the driver ends, aborted included.
struct DriverGuard(Arc<Inner>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.drivers.send_modify(|n| *n -= 1);
    }
}

impl Inner {
    fn add_definition(&self, definition: SagaDefinition) -> Result<()> {
        let mut registry = self.registry.write().unwrap_or_else(|p| p.into_inner());
        let versions = registry.entry(definition.name.clone()).or_default();
        if versions.contains_key(&definition.version) {
            return Err(Error::DuplicateDefinition { name: definition.name, version: definition.version });
        }
        versions.insert(definition.version, definition);
        Ok(())
    }

    fn definition(&self, name: &str, version: Option<u32>) -> Option<SagaDefinition> {
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner());
        let versions = registry.get(name)?;
        match version {
            Some(v) => versions.get(&v).cloned(),
            None => versions.values().next_back().cloned(),
        }
    }

    fn live(&self, id: &SagaId) -> Option<Arc<LiveSaga>> {
        lock(&self.live).get(id).cloned()
    }

    /// Drops a finished saga from the live set; later readers go to the store.
    pub(crate) fn forget(&self, id: &SagaId) {
        lock(&self.live).remove(id);
    }

    fn new_live(&self, record: SagaRecord, next: u64, finished: bool) -> Arc<LiveSaga> {
        Arc::new(LiveSaga {
            journal: Arc::new(Journal::new(self.store.clone(), self.bus.clone(), record, next, finished)),
            control: Arc::new(Control::new(self.shutdown.subscribe())),
            finished: watch::Sender::new(None),
            task: Mutex::new(None),
        })
    }

    fn spawn(self: &Arc<Self>, live: Arc<LiveSaga>, definition: SagaDefinition, history: Vec<RecordedEvent>) {
        let record = live.journal.record();
        let span = tracing::info_span!(
            "saga",
            saga.id = %record.id,
            saga.definition = %record.definition,
            saga.version = record.version
        );
        self.drivers.send_modify(|n| *n += 1);
        let guard = DriverGuard(self.clone());
        let inner = self.clone();
        let task_live = live.clone();
        let handle = tokio::spawn(
            async move {
                let _guard = guard;
                drive(inner, task_live, definition, history).await
            }
            .instrument(span),
        );
        *lock(&live.task) = Some(handle.abort_handle());
    }

    /// Takes over a saga found in flight: resumes it, or shows why it cannot run.
    fn adopt(self: &Arc<Self>, record: SagaRecord) -> Result<()> {
        let id = record.id.clone();
        let history = self.store.history(&id);
        let next = history.as_ref().map_or(0, |h| h.len() as u64);
        let final_event =
            history.as_ref().ok().and_then(|h| last_state(h).filter(|r| r.event.is_final()).cloned());
        let live = self.new_live(record.clone(), next, final_event.is_some());
        let journaled_cancel = history.as_ref().ok().and_then(|h| {
            h.iter().find_map(|r| match &r.event {
                Event::CancelRequested { reason } => Some(reason.clone()),
                _ => None,
            })
        });
        if let Some(reason) = journaled_cancel {
            // Known to the control too, so that a later cancel is not journaled twice.
            live.control.cancel.send_replace(Some(reason));
        }
        lock(&self.live).insert(id.clone(), live.clone());
        let set_status = |status: SagaStatus| -> Result<()> {
            if live.journal.record().status != status {
                live.journal.write_status(status)?;
            }
            Ok(())
        };
        let history = match history {
            Ok(history) => history,
            Err(e) => return set_status(SagaStatus::Parked { reason: e.to_string() }),
        };
        if let Some(end) = final_event {
            // The record lagged behind its journal; the journal is the truth.
            set_status(final_status(&end.event))?;
            live.finished.send_replace(Some(Arc::new(end)));
            self.forget(&id);
            return Ok(());
        }
        match self.definition(&record.definition, Some(record.version)) {
            None => {
                tracing::warn!(saga.id = %id, definition = %record.definition, version = record.version,
                    "no definition registered for this version; the saga waits");
                set_status(SagaStatus::WaitingForVersion)
            }
            Some(definition) => {
                if matches!(record.status, SagaStatus::Parked { .. } | SagaStatus::WaitingForVersion) {
                    set_status(SagaStatus::Running)?;
                }
                self.spawn(live, definition, history);
                Ok(())
            }
        }
    }
}

/// The first event of a run of `definition`.
fn saga_started(definition: &SagaDefinition, input: &[u8], at: Timestamp) -> RecordedEvent {
    let event = Event::SagaStarted {
        definition: definition.name.clone(),
        version: definition.version,
        input: input.to_vec(),
    };
    RecordedEvent { seq: 0, at, event }
}

/// The last event that says where the saga stands: links to other runs may follow it.
fn last_state(history: &[RecordedEvent]) -> Option<&RecordedEvent> {
    history.iter().rev().find(|r| !r.event.is_link())
}

fn final_status(event: &Event) -> SagaStatus {
    match event {
        Event::SagaCompleted { .. } => SagaStatus::Completed,
        Event::SagaCompensated { .. } => SagaStatus::Compensated,
        Event::SagaCompensationFailed { .. } => SagaStatus::CompensationFailed,
        _ => SagaStatus::Failed,
    }
}

impl Engine {
    /// Starts configuring an engine. The default store is sled in `./hodei-data`.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            #[cfg(feature = "sled")]
            store: StoreChoice::DataDir(PathBuf::from("hodei-data")),
            #[cfg(not(feature = "sled"))]
            store: StoreChoice::Given(Arc::new(crate::store::MemoryStore::new())),
            definitions: Vec::new(),
            config: EngineConfig::default(),
        }
    }

    fn recover(&self) -> Result<()> {
        let in_flight = self.inner.store.in_flight()?;
        tracing::info!(sagas = in_flight.len(), "resuming sagas in flight");
        for record in in_flight {
            self.inner.adopt(record)?;
        }
        Ok(())
    }

    /// Registers a definition while running, and resumes the sagas that were waiting for it.
    pub fn register(&self, definition: SagaDefinition) -> Result<()> {
        let (name, version) = (definition.name.clone(), definition.version);
        self.inner.add_definition(definition)?;
        let waiting: Vec<SagaRecord> = lock(&self.inner.live)
            .values()
            .map(|l| l.journal.record())
            .filter(|r| {
                r.definition == name && r.version == version && r.status == SagaStatus::WaitingForVersion
            })
            .collect();
        for record in waiting {
            self.inner.adopt(record)?;
        }
        Ok(())
    }

    /// Starts a saga, or returns the existing run if one with this id and input exists.
    ///
    /// Returns once the start is on disk.
    pub async fn start(&self, run: SagaRun) -> Result<SagaHandle> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let definition = inner
            .definition(&run.definition, run.version)
            .ok_or_else(|| Error::UnknownSaga { name: run.definition.clone(), version: run.version })?;
        if run.input.len() > inner.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                what: format!("the input of saga `{}`", run.id),
                size: run.input.len(),
                limit: inner.config.max_payload_bytes,
            });
        }
        let now = Timestamp::now();
        let record = SagaRecord::new(run.id.clone(), definition.name.clone(), definition.version, now);
        let first = saga_started(&definition, &run.input, now);
        let created = {
            // Held across `create` so that a concurrent start of the same id finds either
            // nothing or a live saga, never a stored one that is not yet live.
            let mut live = lock(&inner.live);
            match inner.store.create(&record, &first)? {
                Some(existing) => Err(existing),
                None => {
                    let saga = inner.new_live(record, 1, false);
                    live.insert(run.id.clone(), saga.clone());
                    Ok(saga)
                }
            }
        };
        match created {
            Err(existing) => self.check_same_run(&existing, &run)?,
            Ok(saga) => {
                if inner.bus.receiver_count() > 0 {
                    let kind = EngineEventKind::Journaled(first.clone());
                    let _ = inner.bus.send(EngineEvent { saga_id: run.id.clone(), kind });
                }
                inner.spawn(saga, definition, vec![first]);
                inner.store.durable().await?;
            }
        }
        Ok(SagaHandle { id: run.id, inner: inner.clone() })
    }

    fn check_same_run(&self, existing: &SagaRecord, run: &SagaRun) -> Result<()> {
        let conflict =
            |difference: String| Err(Error::IdempotencyConflict { id: run.id.clone(), difference });
        if existing.definition != run.definition {
            return conflict(format!("definition `{}`", existing.definition));
        }
        if let Some(version) = run.version.filter(|v| *v != existing.version) {
            return conflict(format!("version {} (asked for {version})", existing.version));
        }
        match self.inner.store.history(&run.id)?.first().map(|r| &r.event) {
            Some(Event::SagaStarted { input, .. }) if *input == run.input => Ok(()),
            _ => conflict("another input".into()),
        }
    }

    /// Starts a statically typed saga (one made by `#[saga]`); see [`start`](Self::start).
    pub async fn start_saga<S: Saga>(
        &self,
        id: impl Into<String>,
        input: &S::Input,
    ) -> Result<TypedHandle<S::Output>> {
        let run = SagaRun::new(S::NAME, id, input)?.version(S::VERSION);
        Ok(TypedHandle { handle: self.start(run).await?, output: PhantomData })
    }

    /// A handle to an existing saga.
    pub fn handle(&self, id: &SagaId) -> Result<SagaHandle> {
        self.status(id)?;
        Ok(SagaHandle { id: id.clone(), inner: self.inner.clone() })
    }

    /// The saga's summary record, with its current status.
    pub fn status(&self, id: &SagaId) -> Result<SagaRecord> {
        if let Some(live) = self.inner.live(id) {
            return Ok(live.journal.record());
        }
        self.inner.store.record(id)?.ok_or_else(|| Error::SagaNotFound(id.clone()))
    }

    /// The sagas that match the filter, in id order.
    pub fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaRecord>> {
        let mut records = self.inner.store.records()?;
        records.retain(|r| filter.matches(r));
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// The saga's whole journal, with timestamps.
    pub fn history(&self, id: &SagaId) -> Result<Vec<RecordedEvent>> {
        let history = self.inner.store.history(id)?;
        if history.is_empty() {
            return Err(Error::SagaNotFound(id.clone()));
        }
        Ok(history)
    }

    /// Everything the engine journals and every status change, as it happens. A subscriber
    /// that falls more than [`EngineConfig::event_buffer`] events behind gets
    /// `RecvError::Lagged` and can catch up from [`history`](Self::history).
    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.inner.bus.subscribe()
    }

    /// Asks a saga to cancel: its running step is cancelled, then its compensations run.
    ///
    /// The request is journaled before this returns, so it survives a crash. A saga that is
    /// parked or waiting for its version is cancelled when it next runs.
    pub async fn cancel(&self, id: &SagaId, reason: impl Into<String>) -> Result<()> {
        let live = self.live_or_why(id)?;
        if live.journal.record().status.is_final() {
            return Err(Error::SagaFinished(id.clone()));
        }
        if live.control.cancel.borrow().is_some() {
            return Ok(());
        }
        let reason = reason.into();
        live.journal.append_durable(Event::CancelRequested { reason: reason.clone() }).await?;
        live.control.cancel.send_replace(Some(reason));
        Ok(())
    }

    /// Sends a signal to a saga: it is journaled before this returns, and taken by the saga's
    /// next (or current) wait for `name` (see [`SagaContext::wait_signal`]). A signal sent
    /// before the saga waits for it is kept until it does.
    ///
    /// Fails with [`Error::SagaNotFound`] for an unknown saga, [`Error::SagaFinished`] for a
    /// finished one, and [`Error::EngineStopped`] for one in flight that this engine does not
    /// run (it is stopping, or another process holds the saga).
    ///
    /// [`SagaContext::wait_signal`]: crate::SagaContext::wait_signal
    pub async fn signal(&self, id: &SagaId, name: impl Into<String>, payload: &impl Serialize) -> Result<()> {
        let name = name.into();
        let payload = encode_payload(payload).map_err(|reason| Error::Codec {
            action: "encode",
            what: format!("the payload of signal `{name}`"),
            reason,
        })?;
        if payload.len() > self.inner.config.max_payload_bytes {
            return Err(Error::PayloadTooLarge {
                what: format!("the payload of signal `{name}`"),
                size: payload.len(),
                limit: self.inner.config.max_payload_bytes,
            });
        }
        let live = self.live_or_why(id)?;
        let event = Event::SignalReceived { name: name.clone(), payload: payload.clone() };
        let recorded = live.journal.append_durable(event).await?;
        live.control.deliver(recorded.seq, name, payload);
        Ok(())
    }

    /// The running saga, or the typed reason it cannot take a request.
    fn live_or_why(&self, id: &SagaId) -> Result<Arc<LiveSaga>> {
        if let Some(live) = self.inner.live(id) {
            return Ok(live);
        }
        Err(match self.inner.store.record(id)? {
            Some(r) if r.status.is_final() => Error::SagaFinished(id.clone()),
            Some(_) => Error::EngineStopped(id.clone()),
            None => Error::SagaNotFound(id.clone()),
        })
    }

    /// Starts a new run `id` of a finished (or failed) saga that reuses the recorded outputs of
    /// the steps `source` completed before it started step `from_step`, then runs live from
    /// there. Both journals link to each other: the fork's begins with `ForkedFrom`, and the
    /// source's gets `Forked` after its end. Timers, signal waits and branches the source
    /// finished before that point are reused as well; anything unfinished there runs again.
    pub async fn fork(&self, source: &SagaId, from_step: u32, id: impl Into<String>) -> Result<SagaHandle> {
        let inner = &self.inner;
        let id = SagaId::new(id)?;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let fork_error = |reason: String| Error::Fork { saga: source.clone(), reason };
        let record = self.status(source)?;
        if !record.status.is_final() {
            return Err(fork_error(format!(
                "it is still {}; fork a run that has finished",
                record.status.kind()
            )));
        }
        let history = self.history(source)?;
        let Some(Event::SagaStarted { definition, version, input }) = history.first().map(|r| &r.event)
        else {
            return Err(fork_error("its journal does not begin with SagaStarted".into()));
        };
        let definition = inner
            .definition(definition, Some(*version))
            .ok_or_else(|| Error::UnknownSaga { name: definition.clone(), version: Some(*version) })?;
        let cut = history
            .iter()
            .position(|r| r.event.step_start().is_some_and(|(step, _)| step == from_step))
            .ok_or_else(|| fork_error(format!("it never started a step {from_step}")))?;
        let now = Timestamp::now();
        let first = saga_started(&definition, input, now);
        let mut rest = vec![Event::ForkedFrom { source: source.clone(), step: from_step }];
        rest.extend(fork_prefix(&history[..cut], 2));
        let rest: Vec<RecordedEvent> =
            rest.into_iter().zip(1..).map(|(event, seq)| RecordedEvent { seq, at: now, event }).collect();
        let fork = SagaRecord::new(id.clone(), definition.name.clone(), definition.version, now);
        {
            let _live = lock(&inner.live);
            if inner.store.create(&fork, &first)?.is_some() {
                return Err(Error::IdempotencyConflict { id, difference: "an existing run".into() });
            }
            inner.store.append(&id, &rest, Some(&fork))?;
        }
        let link = RecordedEvent {
            seq: history.len() as u64,
            at: now,
            event: Event::Forked { fork: id.clone(), step: from_step },
        };
        inner.store.append(source, &[link], None)?;
        inner.store.durable().await?;
        tracing::info!(saga.id = %id, source = %source, step = from_step, "forked");
        inner.adopt(fork)?;
        Ok(SagaHandle { id, inner: inner.clone() })
    }

    /// A child saga's part in its parent's compensation: a running child is cancelled (and so
    /// compensates itself); a completed child with compensable steps is reopened and
    /// compensated. Returns once the child has ended again.
    pub(crate) async fn compensate_child(&self, child: &SagaId, parent: &SagaId) -> Result<(), StepError> {
        let reason = format!("its parent saga `{parent}` is compensating");
        let retryable = |e: Error| StepError::retryable(e.to_string());
        // A cancel can lose the race with the child's completion; then the completed child is
        // reopened, so two rounds always suffice.
        for _ in 0..2 {
            let live = match self.inner.live(child) {
                Some(live) => live,
                None => {
                    let Some(record) = self.inner.store.record(child).map_err(retryable)? else {
                        return Ok(());
                    };
                    match record.status {
                        SagaStatus::Completed => {
                            if !self.reopen_to_compensate(&record, &reason).await.map_err(retryable)? {
                                return Ok(());
                            }
                        }
                        SagaStatus::Compensated | SagaStatus::Failed => return Ok(()),
                        SagaStatus::CompensationFailed => {
                            return Err(StepError::terminal(format!(
                                "child saga `{child}` could not compensate; an operator must finish it"
                            )));
                        }
                        _ => return Err(retryable(Error::EngineStopped(child.clone()))),
                    }
                    self.inner.live(child).ok_or_else(|| retryable(Error::EngineStopped(child.clone())))?
                }
            };
            match self.cancel(child, reason.clone()).await {
                Ok(()) | Err(Error::SagaFinished(_)) => {}
                Err(e) => return Err(retryable(e)),
            }
            let mut finished = live.finished.subscribe();
            drop(live);
            let end = finished
                .wait_for(Option::is_some)
                .await
                .map_err(|_| retryable(Error::EngineStopped(child.clone())))?
                .as_ref()
                .map(|e| e.event.clone());
            match end {
                Some(Event::SagaCompensated { .. } | Event::SagaFailed { .. }) => return Ok(()),
                Some(Event::SagaCompensationFailed { error, .. }) => {
                    return Err(StepError::terminal(format!(
                        "child saga `{child}` could not compensate: {error}"
                    )));
                }
                _ => {}
            }
        }
        Err(StepError::retryable(format!("child saga `{child}` did not compensate")))
    }

    /// Reopens a completed saga so that it compensates: journals a cancel after its end and
    /// resumes it. Returns `false`, changing nothing, when it has nothing to compensate.
    async fn reopen_to_compensate(&self, record: &SagaRecord, reason: &str) -> Result<bool> {
        let inner = &self.inner;
        let history = inner.store.history(&record.id)?;
        let compensable = history.iter().any(|r| {
            matches!(
                r.event,
                Event::StepStarted { compensable: true, .. } | Event::StepStartedAt { compensable: true, .. }
            )
        });
        if !compensable {
            return Ok(false);
        }
        let now = Timestamp::now();
        let mut reopened = record.clone();
        reopened.status = SagaStatus::Compensating;
        reopened.updated_at = now;
        let cancel = RecordedEvent {
            seq: history.len() as u64,
            at: now,
            event: Event::CancelRequested { reason: reason.into() },
        };
        inner.store.append(&record.id, &[cancel], Some(&reopened))?;
        inner.store.durable().await?;
        tracing::info!(saga.id = %record.id, reason, "reopened to compensate");
        inner.adopt(reopened)?;
        Ok(true)
    }

    /// Deletes every finished saga that has not changed for `older_than`. Returns their ids.
    pub fn purge(&self, older_than: Duration) -> Result<Vec<SagaId>> {
        let cutoff = Timestamp(Timestamp::now().0.saturating_sub(older_than.as_millis() as u64));
        let mut purged = Vec::new();
        for record in self.inner.store.records()? {
            if record.status.is_final() && record.updated_at <= cutoff {
                self.inner.store.remove(&record.id)?;
                purged.push(record.id);
            }
        }
        Ok(purged)
    }

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
        // A cut-off saga may have staged a step completion; write it so the step is not run
        // again on the next start.
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

/// A started saga.
#[derive(Clone)]
pub struct SagaHandle {
    id: SagaId,
    inner: Arc<Inner>,
}

impl fmt::Debug for SagaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaHandle").field("id", &self.id).finish()
    }
}

impl SagaHandle {
    /// The saga's id.
    pub fn id(&self) -> &SagaId {
        &self.id
    }

    /// Waits for the saga to finish and returns how it ended, decoding the output as `O`.
    ///
    /// A parked saga is not finished: this keeps waiting until it is fixed and resumes, or
    /// fails with [`Error::EngineStopped`] when the engine shuts down first.
    pub async fn outcome<O: DeserializeOwned>(&self) -> Result<Outcome<O>> {
        let end = match self.inner.live(&self.id) {
            Some(live) => {
                let mut finished = live.finished.subscribe();
                drop(live);
                let end = finished
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| Error::EngineStopped(self.id.clone()))?;
                end.as_ref().map(|e| (**e).clone())
            }
            None => None,
        };
        let end = match end {
            Some(end) => end,
            None => {
                let history = self.inner.store.history(&self.id)?;
                match last_state(&history) {
                    Some(last) if last.event.is_final() => last.clone(),
                    Some(_) => return Err(Error::EngineStopped(self.id.clone())),
                    None => return Err(Error::SagaNotFound(self.id.clone())),
                }
            }
        };
        self.decode_outcome(end.event)
    }

    fn decode_outcome<O: DeserializeOwned>(&self, event: Event) -> Result<Outcome<O>> {
        Ok(match event {
            Event::SagaCompleted { output } => {
                Outcome::Completed(decode_payload(&output).map_err(|reason| Error::Codec {
                    action: "decode",
                    what: format!("the output of saga `{}`", self.id),
                    reason,
                })?)
            }
            Event::SagaCompensated { cause } => Outcome::Compensated { cause },
            Event::SagaFailed { cause } => Outcome::Failed { cause },
            Event::SagaCompensationFailed { step, error, undone } => {
                let names = step_names(&self.inner.store.history(&self.id)?);
                let step_ref =
                    |index: u32| StepRef { index, name: names.get(&index).cloned().unwrap_or_default() };
                Outcome::CompensationFailed {
                    step: step_ref(step),
                    error,
                    undone: undone.into_iter().map(step_ref).collect(),
                }
            }
            other => {
                return Err(Error::CorruptRecord {
                    saga: self.id.to_string(),
                    seq: None,
                    reason: format!("expected a final event, found {other:?}"),
                });
            }
        })
    }

    /// The saga's summary record.
    pub fn status(&self) -> Result<SagaRecord> {
        Engine { inner: self.inner.clone() }.status(&self.id)
    }

    /// Cancels the saga; see [`Engine::cancel`].
    pub async fn cancel(&self, reason: impl Into<String>) -> Result<()> {
        Engine { inner: self.inner.clone() }.cancel(&self.id, reason).await
    }
}

/// A [`SagaHandle`] that knows its saga's output type.
pub struct TypedHandle<O> {
    handle: SagaHandle,
    output: PhantomData<fn() -> O>,
}

impl<O> Clone for TypedHandle<O> {
    fn clone(&self) -> Self {
        Self { handle: self.handle.clone(), output: PhantomData }
    }
}

impl<O> fmt::Debug for TypedHandle<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TypedHandle").field(&self.handle.id).finish()
    }
}

impl<O: DeserializeOwned> TypedHandle<O> {
    /// Waits for the saga to finish; see [`SagaHandle::outcome`].
    pub async fn outcome(&self) -> Result<Outcome<O>> {
        self.handle.outcome::<O>().await
    }

    /// The saga's id.
    pub fn id(&self) -> &SagaId {
        self.handle.id()
    }

    /// The untyped handle.
    pub fn untyped(&self) -> &SagaHandle {
        &self.handle
    }
}

fn step_names(history: &[RecordedEvent]) -> HashMap<u32, String> {
    history.iter().filter_map(|r| r.event.step_start().map(|(step, name)| (step, name.to_owned()))).collect()
}

/// The part of a journal a fork reuses: what finished before the fork point, renumbered from
/// `first_seq`. Unfinished attempts, failures, cancels and compensations are left out, so the
/// fork runs them live.
fn fork_prefix(prefix: &[RecordedEvent], first_seq: u64) -> Vec<Event> {
    use std::collections::HashSet;
    let mut completed = HashSet::new();
    let mut resolved = HashSet::new();
    for recorded in prefix {
        match &recorded.event {
            Event::StepCompleted { step, .. } => {
                completed.insert(*step);
            }
            Event::TimerFired { key }
            | Event::SignalConsumed { key, .. }
            | Event::SignalWaitTimedOut { key } => {
                resolved.insert(key.as_str());
            }
            _ => {}
        }
    }
    let mut renumbered = HashMap::new();
    let mut kept = Vec::new();
    for recorded in prefix {
        let keep = match &recorded.event {
            Event::StepStarted { step, .. }
            | Event::StepStartedAt { step, .. }
            | Event::StepCompleted { step, .. } => completed.contains(step),
            Event::TimerStarted { key, .. }
            | Event::TimerFired { key }
            | Event::SignalWaitStarted { key, .. }
            | Event::SignalConsumed { key, .. }
            | Event::SignalWaitTimedOut { key } => resolved.contains(key.as_str()),
            Event::SignalReceived { .. } | Event::BranchesStarted { .. } => true,
            Event::BranchFinished { error, .. } => error.is_none(),
            _ => false,
        };
        if !keep {
            continue;
        }
        let seq = first_seq + kept.len() as u64;
        let event = match &recorded.event {
            Event::SignalReceived { .. } => {
                renumbered.insert(recorded.seq, seq);
                recorded.event.clone()
            }
            Event::SignalConsumed { key, signal } => match renumbered.get(signal) {
                Some(signal) => Event::SignalConsumed { key: key.clone(), signal: *signal },
                None => continue,
            },
            other => other.clone(),
        };
        kept.push(event);
    }
    kept
}
