use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{Notify, broadcast, watch};
use tracing::Instrument;

use super::config::EngineConfig;
use super::registry::Registry;
use super::traced;
use crate::bus::EngineEvent;
use crate::driver::{Control, Halt, Host, Journal, LiveSaga, Scope, drive};
use crate::event::{RecordedEvent, SagaId, SagaRecord};
use crate::lock::lock;
use crate::resources::Resources;
use crate::saga::{SagaContext, SagaDefinition};
use crate::store::EventStore;
use crate::timers::Timers;
use crate::trace::Unsampled;

/// The durable saga engine. Cheap to clone; every clone drives the same sagas.
#[derive(Clone)]
pub struct Engine {
    pub(super) inner: Arc<Inner>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("store", &self.inner.store).finish_non_exhaustive()
    }
}

/// What every clone of an engine shares.
pub(super) struct Inner {
    pub(super) store: Arc<dyn EventStore>,
    pub(super) registry: Registry,
    pub(super) live: Mutex<HashMap<SagaId, Arc<LiveSaga>>>,
    pub(super) bus: broadcast::Sender<EngineEvent>,
    /// Every durable wait of every saga, and the one task that wakes them.
    pub(super) timers: Arc<Timers>,
    pub(super) shutdown: watch::Sender<bool>,
    pub(super) accepting: AtomicBool,
    pub(super) drivers: Arc<watch::Sender<usize>>,
    /// Set once recovery has adopted every saga in flight: drivers wait for it, so that a
    /// resumed parent finds its resumed children (recovery adopts in id order).
    pub(super) recovered: watch::Sender<bool>,
    /// Counts the beats of the engine's lease on a shared store, and the rounds that resume
    /// sagas a failed write stopped on a store that says when it takes writes again: whoever
    /// waits for a saga that runs elsewhere, or not yet again, looks again at each.
    pub(super) beats: watch::Sender<u64>,
    /// Sagas this engine stopped driving after a journal write failed (a shared store, or one
    /// that says when it takes writes again): resumed from the store's journal at the next
    /// beat that reaches the database, or once the store takes writes again.
    pub(super) unwritten: Mutex<Vec<SagaId>>,
    /// Told when a saga joins `unwritten`.
    pub(super) halted: Arc<Notify>,
    /// Held while the sagas of one lease renewal are resumed: renewals resume in order.
    pub(super) resuming: Mutex<()>,
    pub(super) config: EngineConfig,
    pub(super) resources: Arc<Resources>,
}

/// A driver's task, counted until its future, and everything the future holds (the engine,
/// and through it the store), is dropped: when it ends, and when it is aborted. An aborted
/// future's parts are dropped in an order the code does not choose, so a guard inside it
/// could count the driver gone while the engine was still held. Once the count reaches zero
/// no driver holds the store, and a shut-down engine that is dropped releases its data
/// directory at once.
struct Counted<F> {
    future: Option<Pin<Box<F>>>,
    drivers: Arc<watch::Sender<usize>>,
}

impl<F: Future<Output = ()>> Future for Counted<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(future) = this.future.as_mut() else { return Poll::Ready(()) };
        std::task::ready!(future.as_mut().poll(cx));
        this.future = None;
        Poll::Ready(())
    }
}

impl<F> Drop for Counted<F> {
    fn drop(&mut self) {
        self.future.take();
        self.drivers.send_modify(|n| *n -= 1);
    }
}

impl Inner {
    /// Whether the engine is shutting down.
    pub(super) fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(super) fn live(&self, id: &SagaId) -> Option<Arc<LiveSaga>> {
        lock(&self.live).get(id).cloned()
    }

    /// Drops a finished saga from the live set, then wakes its waiters: later readers, and
    /// whoever the outcome wakes, find it finished in the store.
    pub(super) fn finished(&self, live: &LiveSaga, end: RecordedEvent) {
        lock(&self.live).remove(&live.journal.id);
        live.finished.send_replace(Some(Arc::new(end)));
    }

    /// Stops driving a saga another engine took over: its driver is aborted if it still runs,
    /// and it leaves the live set without an outcome (it has none yet).
    pub(super) fn lost(&self, id: &SagaId) {
        let Some(live) = lock(&self.live).remove(id) else { return };
        // Said before the abort, which drops the attempts: what they started is not theirs to
        // stop any more.
        live.control.handed_over.send_replace(true);
        if let Some(task) = lock(&live.task).take() {
            task.abort();
        }
        tracing::warn!(saga.id = %id, "saga taken over by another engine; no longer driven here");
    }

    /// Stops driving a saga whose journal write failed, to resume it from the journal the
    /// store holds: at a later beat on a shared store, once the store takes writes again on
    /// one that says when ([`EventStore::writable`]).
    pub(super) fn resume_later(&self, id: &SagaId) {
        lock(&self.live).remove(id);
        lock(&self.unwritten).push(id.clone());
        self.halted.notify_one();
    }

    pub(super) fn new_live(&self, record: SagaRecord, next: u64, finished: bool) -> Arc<LiveSaga> {
        self.new_live_on(self.store.clone(), self.bus.clone(), record, next, finished)
    }

    /// A live saga whose journal writes to `store` and tells `bus`: this engine's own, or a
    /// replay check's scratch ones.
    pub(super) fn new_live_on(
        &self,
        store: Arc<dyn EventStore>,
        bus: broadcast::Sender<EngineEvent>,
        record: SagaRecord,
        next: u64,
        finished: bool,
    ) -> Arc<LiveSaga> {
        let journal = Arc::new(Journal::new(store, bus, record, next, finished, *self.timers.clock()));
        Arc::new(LiveSaga {
            control: Arc::new(Control::new(self.shutdown.subscribe(), journal.handed_over())),
            journal,
            finished: watch::Sender::new(None),
            task: Mutex::new(None),
        })
    }

    /// What this engine lends the drivers of its sagas.
    pub(super) fn host(self: &Arc<Self>) -> Host {
        Host {
            timers: self.timers.clone(),
            max_payload: self.config.max_payload_bytes,
            resources: self.resources.clone(),
            engine: self.clone(),
            probe: None,
        }
    }

    pub(super) fn spawn(
        self: &Arc<Self>,
        live: Arc<LiveSaga>,
        definition: SagaDefinition,
        history: Vec<RecordedEvent>,
    ) {
        let traced::DriverTrace { span, started: trace_started, unsampled } =
            traced::driver_span(&live.journal.record(), &history);
        // Staged: written with the saga's first step, at no flush of its own. Lost with a crash
        // before that, it is journaled again by the next run, which still begins at the start.
        if let Some(event) = trace_started
            && let Err(e) = live.journal.stage(event)
        {
            tracing::debug!(error = %e, "trace context not journaled");
        }
        self.drivers.send_modify(|n| *n += 1);
        let drivers = self.drivers.clone();
        let inner = self.clone();
        let task_live = live.clone();
        let host = self.host();
        let body =
            move |shared, input| (definition.body)(SagaContext { shared, scope: Scope::root() }, input);
        let driver = async move {
            // The driver's span ends before its outcome is published: whoever sees the outcome
            // and then flushes the exporter finds the saga's whole trace.
            let end = Unsampled::new(unsampled, async {
                let _ = inner.recovered.subscribe().wait_for(|done| *done).await;
                drive(host, task_live.clone(), body, history).await
            })
            .instrument(span)
            .await;
            match (end, task_live.journal.halted()) {
                (Some(end), _) => inner.finished(&task_live, end),
                (None, Some(Halt::Fenced)) => inner.lost(&task_live.journal.id),
                (None, Some(Halt::Unwritten)) => inner.resume_later(&task_live.journal.id),
                (None, None) => {}
            }
        };
        let handle = tokio::spawn(Counted { future: Some(Box::pin(driver)), drivers });
        *lock(&live.task) = Some(handle.abort_handle());
    }
}

impl Engine {
    /// The engine that lent `host` to the saga it runs.
    pub(crate) fn hosting(host: &Host) -> Engine {
        Engine { inner: host.engine.clone().downcast::<Inner>().expect("only an engine hosts sagas") }
    }
}
