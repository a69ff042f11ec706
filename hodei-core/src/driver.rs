//! Running one saga: the journal writer, step execution with durable retries, replay, and the
//! compensation phase.
//!
//! A driver task owns a saga while it runs. It replays the body from the start: every step the
//! journal records returns its recorded result, and the first step it does not record runs
//! live. Anything that must stop the body (nondeterminism, cancellation, shutdown, a storage
//! failure) is an [`Interrupt`]: the step that finds it reports it and never returns, and the
//! driver drops the body, so the wrong code can never run.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::Instrument;

use crate::engine::{EngineEvent, EngineEventKind, Inner, LiveSaga};
use crate::error::{Error, Result};
use crate::event::{Event, JoinMode, RecordedEvent, SagaId, SagaRecord, SagaStatus, Timestamp};
use crate::replay::{Attempts, GroupHistory, RecordedOp, Replay, WaitEnd};
use crate::retry::{RetryPolicy, StepError};
use crate::saga::{ErasedCompensation, SagaContext, SagaDefinition, StepContext, StepSignals};
use crate::store::EventStore;
use crate::timers::Timers;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn record_id(state: &Mutex<JournalState>) -> SagaId {
    lock(state).record.id.clone()
}

/// `saga id/operation key`: the key external systems see for a step.
pub(crate) fn idempotency_key(id: &SagaId, key: &str) -> String {
    format!("{id}/{key}")
}

/// Where in the saga's code an operation is called: the top level, or a branch of a group.
/// Each scope numbers its operations in call order, which makes keys independent of how
/// concurrent branches interleave.
#[derive(Debug)]
pub(crate) struct Scope {
    prefix: String,
    next: AtomicU32,
    /// Set for a branch that the journal says was cancelled when its group was decided: it
    /// replays what it recorded, and stops (forever) at the first thing it would run live.
    frozen: bool,
    /// Told when an operation of this frozen scope, or of one inside it, stops: the groups
    /// above wait for that before they decide again, so that replay pushes every compensation
    /// the first run pushed.
    stopped: Option<(mpsc::UnboundedSender<u32>, u32)>,
    parent: Option<Arc<Scope>>,
}

impl Scope {
    pub fn root() -> Arc<Self> {
        Arc::new(Self {
            prefix: String::new(),
            next: AtomicU32::new(0),
            frozen: false,
            stopped: None,
            parent: None,
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
        Arc::new(Self {
            prefix: format!("{key}.{branch}."),
            next: AtomicU32::new(0),
            frozen: frozen || parent.frozen,
            stopped: Some((stopped, branch)),
            parent: Some(parent.clone()),
        })
    }

    fn next_key(&self) -> String {
        format!("{}{}", self.prefix, self.next.fetch_add(1, Ordering::SeqCst))
    }

    fn is_root(&self) -> bool {
        self.parent.is_none()
    }

    /// Tells every group above that this branch can go no further.
    fn report_stopped(&self) {
        let mut scope = Some(self);
        while let Some(current) = scope {
            if let Some((tx, branch)) = &current.stopped {
                let _ = tx.send(*branch);
            }
            scope = current.parent.as_deref();
        }
    }
}

/// The only writer of one saga's journal. It numbers events, stamps them, writes them and
/// tells subscribers.
pub(crate) struct Journal {
    pub id: SagaId,
    store: Arc<dyn EventStore>,
    bus: broadcast::Sender<EngineEvent>,
    state: Mutex<JournalState>,
}

struct JournalState {
    next: u64,
    record: SagaRecord,
    /// Set once a final event is written: nothing may follow it.
    finished: bool,
    /// Numbered but not yet written: a step's completion waits here for the saga's next
    /// transition, so that the two cost one write and one flush. Nothing observable happens in
    /// between: the next step's body runs, and the saga ends, only after they are durable.
    pending: Vec<RecordedEvent>,
}

impl Journal {
    pub fn new(
        store: Arc<dyn EventStore>,
        bus: broadcast::Sender<EngineEvent>,
        record: SagaRecord,
        next: u64,
        finished: bool,
    ) -> Self {
        let state = Mutex::new(JournalState { next, record, finished, pending: Vec::new() });
        Self { id: record_id(&state), store, bus, state }
    }

    pub fn record(&self) -> SagaRecord {
        lock(&self.state).record.clone()
    }

    fn publish(&self, kind: EngineEventKind) {
        if self.bus.receiver_count() > 0 {
            let _ = self.bus.send(EngineEvent { saga_id: self.id.clone(), kind });
        }
    }

    /// Numbers an event and keeps it for the saga's next write.
    pub fn stage(&self, event: Event) -> Result<()> {
        let mut state = lock(&self.state);
        if state.finished {
            return Err(Error::SagaFinished(self.id.clone()));
        }
        let seq = state.next + state.pending.len() as u64;
        state.pending.push(RecordedEvent { seq, at: Timestamp::now(), event });
        Ok(())
    }

    /// Writes whatever is staged and waits until it is on disk.
    pub async fn sync(&self) -> Result<()> {
        if lock(&self.state).pending.is_empty() {
            return Ok(());
        }
        self.write(None, None)?;
        self.store.durable().await
    }

    /// Changes the status without waiting for durability.
    pub fn write_status(&self, status: SagaStatus) -> Result<()> {
        self.write(None, Some(status)).map(drop)
    }

    /// Writes an event and waits until it is on disk.
    pub async fn append_durable(&self, event: Event) -> Result<RecordedEvent> {
        let recorded = self.write(Some(event), None)?;
        self.store.durable().await?;
        recorded.ok_or_else(|| Error::SagaFinished(self.id.clone()))
    }

    /// Writes an optional event together with a new status, atomically, and waits until both
    /// are on disk.
    pub async fn transition(
        &self,
        event: Option<Event>,
        status: SagaStatus,
    ) -> Result<Option<RecordedEvent>> {
        let recorded = self.write(event, Some(status))?;
        self.store.durable().await?;
        Ok(recorded)
    }

    fn write(&self, event: Option<Event>, status: Option<SagaStatus>) -> Result<Option<RecordedEvent>> {
        let mut state = lock(&self.state);
        if state.finished && event.is_some() {
            return Err(Error::SagaFinished(self.id.clone()));
        }
        let at = Timestamp::now();
        let seq = state.next + state.pending.len() as u64;
        let recorded = event.map(|event| RecordedEvent { seq, at, event });
        let record = status.as_ref().map(|status| {
            let mut record = state.record.clone();
            record.status = status.clone();
            record.updated_at = at;
            record
        });
        let mut batch = std::mem::take(&mut state.pending);
        batch.extend(recorded.iter().cloned());
        if let Err(e) = self.store.append(&self.id, &batch, record.as_ref()) {
            batch.truncate(batch.len() - recorded.is_some() as usize);
            state.pending = batch;
            return Err(e);
        }
        state.next += batch.len() as u64;
        state.finished = batch.last().is_some_and(|r| r.event.is_final());
        if self.bus.receiver_count() > 0 {
            for recorded in batch {
                self.publish(EngineEventKind::Journaled(recorded));
            }
        }
        if let Some(record) = record {
            self.publish(EngineEventKind::Status(record.status.clone()));
            state.record = record;
        }
        Ok(recorded)
    }
}

/// Why a running body must stop.
#[derive(Debug)]
pub(crate) enum Interrupt {
    /// The code does not match the journal.
    Nondeterminism(String),
    /// Cancellation was requested.
    Cancelled(String),
    /// The engine is shutting down; the saga resumes on the next start.
    Suspended,
    /// The journal could not be written.
    Storage(String),
}

/// What reaches a saga from outside: a cancel, the engine's shutdown, and signals.
#[derive(Debug)]
pub(crate) struct Control {
    pub cancel: watch::Sender<Option<String>>,
    pub shutdown: watch::Receiver<bool>,
    /// Signals journaled for this saga, by sequence number: (name, payload). Consumed ones
    /// stay; [`SagaShared::consumed`] tells them apart.
    pub inbox: Mutex<BTreeMap<u64, (String, Vec<u8>)>>,
    /// Bumped after each signal is added to the inbox.
    pub arrivals: watch::Sender<u64>,
}

impl Control {
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self {
            cancel: watch::Sender::new(None),
            shutdown,
            inbox: Mutex::default(),
            arrivals: watch::Sender::new(0),
        }
    }

    /// Adds a journaled signal and wakes the saga's waits.
    pub fn deliver(&self, seq: u64, name: String, payload: Vec<u8>) {
        lock(&self.inbox).insert(seq, (name, payload));
        self.arrivals.send_modify(|n| *n += 1);
    }

    fn cancelled(&self) -> Option<String> {
        self.cancel.borrow().clone()
    }

    pub fn signals(&self) -> StepSignals {
        StepSignals { cancel: self.cancel.subscribe(), shutdown: self.shutdown.clone() }
    }

    /// Resolves with the reason once a cancel is requested.
    async fn cancel_requested(&self) -> String {
        let mut cancel = self.cancel.subscribe();
        let reason = cancel.wait_for(Option::is_some).await.ok().and_then(|reason| reason.clone());
        match reason {
            Some(reason) => reason,
            // The sender lives as long as the saga: never, in practice.
            None => std::future::pending().await,
        }
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when a cancel arrives (if `watch_cancel`) or shutdown begins.
    async fn stopped(&self, watch_cancel: bool) -> Interrupt {
        let mut cancel = self.cancel.subscribe();
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            Ok(reason) = cancel.wait_for(Option::is_some), if watch_cancel => {
                Interrupt::Cancelled(reason.clone().unwrap_or_default())
            }
            _ = shutdown.wait_for(|s| *s) => Interrupt::Suspended,
        }
    }
}

/// What a step call brings: everything the journal records about it, and its compensation.
pub(crate) struct StepSpec {
    pub name: String,
    pub input: Vec<u8>,
    pub retry: RetryPolicy,
    pub timeout: Option<Duration>,
    pub compensation: Option<CompensationSpec>,
}

#[derive(Clone)]
pub(crate) struct CompensationSpec {
    pub run: ErasedCompensation,
    pub retry: RetryPolicy,
    pub timeout: Option<Duration>,
}

/// What an erased compensation gets; decoded into a typed `CompensationContext`.
#[doc(hidden)]
#[derive(Debug)]
pub struct RawCompensation {
    pub saga_id: SagaId,
    pub step: u32,
    pub name: String,
    pub attempt: u32,
    pub idempotency_key: String,
    pub input: Vec<u8>,
    pub output: Option<Vec<u8>>,
}

/// A compensation on the stack: pushed when its step starts, its output filled in when the
/// step completes.
struct Pending {
    step: u32,
    /// The step's idempotency key.
    key: String,
    name: String,
    input: Vec<u8>,
    output: Option<Vec<u8>>,
    spec: CompensationSpec,
}

/// The state a saga body shares with its steps.
pub(crate) struct SagaShared {
    pub id: SagaId,
    pub inner: Arc<Inner>,
    journal: Arc<Journal>,
    replay: Replay,
    /// The number the next live step gets.
    next_step: AtomicU32,
    /// Per recorded operation (in journal order): whether the code has reached it again.
    visited: Vec<AtomicBool>,
    /// How many recorded operations the code has not reached again.
    unreached: AtomicUsize,
    /// Set once the code has reached every recorded operation: from then on the compensation
    /// stack holds every step the journal says started.
    replayed: watch::Sender<bool>,
    /// The signals taken by some wait, recorded or live.
    consumed: Mutex<HashSet<u64>>,
    stack: Mutex<Vec<Pending>>,
    interrupt: Mutex<Option<oneshot::Sender<Interrupt>>>,
    control: Arc<Control>,
    max_payload: usize,
}

/// A group of branches as the driver opened it: its key and what the journal says of it.
pub(crate) struct OpenGroup {
    pub key: String,
    /// The branches that finished, in the order they did, with their errors.
    pub finished: Vec<(u32, Option<(String, bool)>)>,
}

/// The result of a retried run: it finished (either way), or something stopped it.
enum Attempted<T> {
    Done(Result<T, StepError>),
    Stopped(Interrupt),
}

/// How one retried thing (a step or a compensation) journals its attempts.
struct AttemptLog<'a, S, F> {
    journal: &'a Journal,
    timers: &'a Timers,
    control: &'a Control,
    watch_cancel: bool,
    policy: RetryPolicy,
    timeout: Option<Duration>,
    key: &'a str,
    what: &'a str,
    started: S,
    failed: F,
}

impl<S, F> AttemptLog<'_, S, F>
where
    S: Fn(u32) -> Event,
    F: Fn(u32, String, Timestamp) -> Event,
{
    /// Runs attempts until one succeeds, a failure is terminal, or the policy gives up.
    /// Every attempt start and every retry's due time is journaled first, so a restart resumes
    /// the count and the wait where they were.
    async fn run<T, A, Fut>(&self, mut history: Attempts, mut attempt: A) -> Attempted<T>
    where
        A: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        if history.interrupted() {
            // The process stopped inside the last attempt. It counts, as a lost worker does
            // elsewhere: a step that kills its process cannot retry forever.
            if !self.policy.allows_after(history.started) {
                return Attempted::Done(Err(StepError::retryable(format!(
                    "{} was interrupted by a restart in attempt {}, its last",
                    self.what, history.started
                ))));
            }
            history.retry_at = Some(Timestamp::now());
        }
        loop {
            if let Some(due) = history.retry_at {
                tokio::select! {
                    _ = self.timers.sleep_until(due) => {}
                    interrupt = self.control.stopped(self.watch_cancel) => return Attempted::Stopped(interrupt),
                }
            }
            if self.control.shutting_down() {
                return Attempted::Stopped(Interrupt::Suspended);
            }
            if let (true, Some(reason)) = (self.watch_cancel, self.control.cancelled()) {
                return Attempted::Stopped(Interrupt::Cancelled(reason));
            }
            let n = history.started + 1;
            if let Err(e) = self.journal.append_durable((self.started)(n)).await {
                return Attempted::Stopped(Interrupt::Storage(e.to_string()));
            }
            history = Attempts { started: n, retry_at: None };
            let running = async {
                match self.timeout {
                    None => attempt(n).await,
                    Some(limit) => tokio::time::timeout(limit, attempt(n)).await.unwrap_or_else(|_| {
                        Err(StepError::retryable(format!("{} timed out after {limit:?}", self.what)))
                    }),
                }
            };
            // A running attempt is cut off by a cancel (its body is dropped, which is how a
            // remote job learns it is cancelled), but not by shutdown: shutdown lets running
            // steps finish up to its deadline.
            let result = if self.watch_cancel {
                tokio::select! {
                    result = running => result,
                    reason = self.control.cancel_requested() => {
                        return Attempted::Stopped(Interrupt::Cancelled(reason));
                    }
                }
            } else {
                running.await
            };
            match result {
                Ok(value) => return Attempted::Done(Ok(value)),
                Err(e) if e.is_retryable() && self.policy.allows_after(n) => {
                    let due = Timestamp::now().after(self.policy.backoff(n, self.key));
                    tracing::warn!(attempt = n, error = %e, "attempt failed; will retry");
                    let failed = (self.failed)(n, e.message().to_string(), due);
                    if let Err(e) = self.journal.append_durable(failed).await {
                        return Attempted::Stopped(Interrupt::Storage(e.to_string()));
                    }
                    history.retry_at = Some(due);
                }
                Err(e) => return Attempted::Done(Err(e)),
            }
        }
    }
}

impl SagaShared {
    /// Stops the body: reports why to the driver, which drops the body future. Never returns.
    pub async fn suspend<T>(&self, why: Interrupt) -> T {
        if let Some(tx) = lock(&self.interrupt).take() {
            let _ = tx.send(why);
        }
        std::future::pending().await
    }

    /// Stops the body because its code does not match its journal.
    pub async fn park<T>(&self, reason: String) -> T {
        self.suspend(Interrupt::Nondeterminism(reason)).await
    }

    fn cancel_reason(&self) -> Option<String> {
        self.replay.cancel.clone().or_else(|| self.control.cancelled())
    }

    /// The operation the journal records at `key`, marked as reached.
    fn recorded(&self, key: &str) -> Option<&RecordedOp> {
        let (position, op) = self.replay.op(key)?;
        if !self.visited[*position].swap(true, Ordering::SeqCst)
            && self.unreached.fetch_sub(1, Ordering::SeqCst) == 1
        {
            self.replayed.send_replace(true);
        }
        Some(op)
    }

    /// The first recorded operation the code has not reached again, if any.
    fn unvisited(&self) -> Option<(&str, &'static str)> {
        let position = self.visited.iter().position(|v| !v.load(Ordering::Relaxed))?;
        let key = &self.replay.keys[position];
        Some((key, self.replay.op(key).map_or("an operation", |(_, op)| op.kind())))
    }

    /// Parks the saga because the code calls another kind of operation at `key`.
    async fn mismatch<T>(&self, key: &str, now: String, recorded: &RecordedOp) -> T {
        let reason = format!(
            "operation {key}: the code now {now}, but the journal recorded {} there",
            recorded.kind()
        );
        self.park(reason).await
    }

    /// Called before anything runs live (past the journal). Returns only if it may: a frozen
    /// branch stops here forever, a cancelled saga is interrupted, and a saga whose journal
    /// says its body already failed is parked.
    async fn go_live(&self, scope: &Scope, what: &str) {
        if scope.frozen {
            scope.report_stopped();
            return std::future::pending().await;
        }
        if let Some(reason) = self.cancel_reason() {
            return self.suspend(Interrupt::Cancelled(reason)).await;
        }
        if self.replay.body_failed.is_some() {
            let reason = format!(
                "{what}: the journal says the body failed before reaching it, but the code now goes on"
            );
            return self.park(reason).await;
        }
    }

    /// Waits for `wait`, unless the saga is cancelled or the engine shuts down first.
    async fn interruptible<T>(&self, wait: impl Future<Output = T>) -> T {
        tokio::select! {
            value = wait => value,
            why = self.control.stopped(true) => self.suspend(why).await,
        }
    }

    async fn durably(&self, event: Event) -> RecordedEvent {
        match self.journal.append_durable(event).await {
            Ok(recorded) => recorded,
            Err(e) => self.suspend(Interrupt::Storage(e.to_string())).await,
        }
    }

    async fn staged(&self, event: Event) {
        if let Err(e) = self.journal.stage(event) {
            self.suspend(Interrupt::Storage(e.to_string())).await
        }
    }

    /// Runs one step, or returns its journaled result. Returns the step number with the
    /// encoded output.
    pub async fn run_step<A, Fut>(
        &self,
        scope: &Scope,
        spec: &StepSpec,
        mut attempt: A,
    ) -> Result<(u32, Vec<u8>), StepError>
    where
        A: FnMut(StepContext, &[u8]) -> Fut,
        Fut: Future<Output = Result<Vec<u8>, StepError>>,
    {
        let key = scope.next_key();
        if spec.input.len() > self.max_payload {
            return Err(StepError::terminal(format!(
                "step `{}`: the input is {} bytes, over the limit of {} bytes",
                spec.name,
                spec.input.len(),
                self.max_payload
            )));
        }
        let recorded = match self.recorded(&key) {
            None => None,
            Some(RecordedOp::Step(step)) => self.replay.steps.get(step).map(|history| (*step, history)),
            Some(other) => return self.mismatch(&key, format!("runs step `{}`", spec.name), other).await,
        };
        if let Some((step, recorded)) = recorded {
            if recorded.name != spec.name {
                let reason = format!(
                    "step {step}: the code now calls `{}`, but the journal recorded `{}` there",
                    spec.name, recorded.name
                );
                return self.park(reason).await;
            }
            if recorded.input != spec.input {
                let reason = format!(
                    "step {step} `{}`: the code now passes another input than the journal recorded",
                    spec.name
                );
                return self.park(reason).await;
            }
        }
        let what = format!("step `{}`", spec.name);
        let step = match recorded {
            Some((step, _)) => step,
            None => {
                self.go_live(scope, &what).await;
                self.next_step.fetch_add(1, Ordering::SeqCst)
            }
        };
        // A started step's compensation is pushed even when its completion was never recorded,
        // so that a side effect that may have happened is undone too.
        let slot = spec.compensation.as_ref().map(|c| {
            let mut stack = lock(&self.stack);
            stack.push(Pending {
                step,
                key: idempotency_key(&self.id, &key),
                name: spec.name.clone(),
                input: spec.input.clone(),
                output: None,
                spec: c.clone(),
            });
            stack.len() - 1
        });
        let set_output = |output: &Vec<u8>| {
            if let Some(slot) = slot {
                lock(&self.stack)[slot].output = Some(output.clone());
            }
        };
        if let Some((_, recorded)) = recorded {
            if let Some(output) = &recorded.completed {
                set_output(output);
                return Ok((step, output.clone()));
            }
            if let Some((message, retryable)) = &recorded.failed {
                let e = if *retryable { StepError::retryable(message) } else { StepError::terminal(message) };
                return Err(e);
            }
            // Started, never finished: the process stopped in it. It goes on live.
            self.go_live(scope, &what).await;
        }

        let idempotency = idempotency_key(&self.id, &key);
        let compensable = spec.compensation.is_some();
        let plain = scope.is_root() && key == step.to_string();
        let log = AttemptLog {
            journal: &self.journal,
            timers: &self.inner.timers,
            control: &self.control,
            watch_cancel: true,
            policy: spec.retry,
            timeout: spec.timeout,
            key: &idempotency,
            what: &what,
            started: |attempt| match attempt {
                1 if plain => Event::StepStarted {
                    step,
                    name: spec.name.clone(),
                    input: spec.input.clone(),
                    compensable,
                },
                1 => Event::StepStartedAt {
                    step,
                    key: key.clone(),
                    name: spec.name.clone(),
                    input: spec.input.clone(),
                    compensable,
                },
                _ => Event::StepRetried { step, attempt },
            },
            failed: |attempt, error, retry_at| Event::StepAttemptFailed { step, attempt, error, retry_at },
        };
        let history = recorded.map(|(_, r)| r.attempts.clone()).unwrap_or_default();
        let span = tracing::info_span!("step", saga.id = %self.id, step.name = %spec.name, step.index = step);
        let attempted = log
            .run(history, |n| {
                let ctx = StepContext {
                    saga_id: self.id.clone(),
                    step,
                    name: spec.name.clone(),
                    attempt: n,
                    idempotency_key: idempotency.clone(),
                    signals: self.control.signals(),
                };
                attempt(ctx, &spec.input)
            })
            .instrument(span)
            .await;
        let result = match attempted {
            Attempted::Stopped(why) => return self.suspend(why).await,
            Attempted::Done(Ok(output)) if output.len() > self.max_payload => {
                Err(StepError::terminal(format!(
                    "step `{}`: the output is {} bytes, over the limit of {} bytes",
                    spec.name,
                    output.len(),
                    self.max_payload
                )))
            }
            Attempted::Done(result) => result,
        };
        let event = match &result {
            Ok(output) => Event::StepCompleted { step, output: output.clone() },
            Err(e) => Event::StepFailed { step, error: e.message().to_string(), retryable: e.is_retryable() },
        };
        self.staged(event).await;
        let output = result?;
        set_output(&output);
        Ok((step, output))
    }

    /// A durable timer: resolves at `due`, or at the due time the journal recorded for it.
    pub async fn sleep_until(&self, scope: &Scope, due: Timestamp) {
        let key = scope.next_key();
        let due = match self.recorded(&key) {
            Some(RecordedOp::Timer { fired: true, .. }) => return,
            Some(RecordedOp::Timer { due, .. }) => {
                self.go_live(scope, "a timer").await;
                *due
            }
            Some(other) => return self.mismatch(&key, "sets a timer".into(), other).await,
            None => {
                self.go_live(scope, "a timer").await;
                self.durably(Event::TimerStarted { key: key.clone(), due }).await;
                due
            }
        };
        self.interruptible(self.inner.timers.sleep_until(due)).await;
        // Staged: if it is lost in a crash, replay waits again for a due time already past.
        self.staged(Event::TimerFired { key }).await;
    }

    /// Waits for the next signal named `name` that no other wait took (one received before
    /// the wait counts), up to `timeout`. Returns its encoded payload, or `None` on timeout.
    pub async fn wait_signal(&self, scope: &Scope, name: &str, timeout: Option<Duration>) -> Option<Vec<u8>> {
        let key = scope.next_key();
        let what = format!("the wait for signal `{name}`");
        let timeout_at = match self.recorded(&key) {
            Some(RecordedOp::Wait { name: recorded, timeout_at, end }) if recorded == name => match end {
                Some(WaitEnd::Consumed(seq)) => {
                    return self.replay.signals.get(seq).map(|(_, payload)| payload.clone());
                }
                Some(WaitEnd::TimedOut) => return None,
                None => {
                    self.go_live(scope, &what).await;
                    *timeout_at
                }
            },
            Some(RecordedOp::Wait { name: recorded, .. }) => {
                let reason = format!(
                    "operation {key}: the code now waits for signal `{name}`, but the journal recorded a wait for `{recorded}`"
                );
                return self.park(reason).await;
            }
            Some(other) => return self.mismatch(&key, format!("waits for signal `{name}`"), other).await,
            None => {
                self.go_live(scope, &what).await;
                let timeout_at =
                    timeout.map(|limit| Timestamp::at_or_after(std::time::SystemTime::now() + limit));
                let started =
                    Event::SignalWaitStarted { key: key.clone(), name: name.to_owned(), timeout_at };
                self.durably(started).await;
                timeout_at
            }
        };
        let deadline = async {
            match timeout_at {
                Some(at) => self.inner.timers.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            // Subscribed before looking, so that a signal delivered in between wakes us.
            let mut arrivals = self.control.arrivals.subscribe();
            if let Some((seq, payload)) = self.take_signal(name) {
                self.durably(Event::SignalConsumed { key, signal: seq }).await;
                return Some(payload);
            }
            let timed_out = self
                .interruptible(async {
                    tokio::select! {
                        _ = arrivals.changed() => false,
                        _ = &mut deadline => true,
                    }
                })
                .await;
            if timed_out {
                self.durably(Event::SignalWaitTimedOut { key }).await;
                return None;
            }
        }
    }

    fn take_signal(&self, name: &str) -> Option<(u64, Vec<u8>)> {
        let inbox = lock(&self.control.inbox);
        let mut consumed = lock(&self.consumed);
        let (seq, (_, payload)) =
            inbox.iter().find(|(seq, (signal, _))| signal == name && !consumed.contains(seq))?;
        consumed.insert(*seq);
        Some((*seq, payload.clone()))
    }

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
                self.staged(Event::BranchesStarted { key: key.clone(), name: name.to_owned(), count, mode })
                    .await;
                OpenGroup { key, finished: Vec::new() }
            }
        }
    }

    /// Journals a branch's end, in the order branches end.
    pub async fn branch_finished(&self, key: &str, branch: u32, error: Option<(String, bool)>) {
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

/// How long a cancelled body may go on replaying to push the compensations it recorded. Replay
/// runs no live code and takes microseconds per operation; this bounds only a journal whose
/// code no longer reaches it.
const REPLAY_GRACE: Duration = Duration::from_secs(5);

/// How the body ended.
enum Ending {
    Body(Result<Vec<u8>, StepError>),
    Interrupted(Interrupt),
}

/// Runs one saga until it finishes, parks or is suspended.
pub(crate) async fn drive(
    inner: Arc<Inner>,
    live: Arc<LiveSaga>,
    definition: SagaDefinition,
    history: Vec<RecordedEvent>,
) {
    let _ = inner.recovered.subscribe().wait_for(|done| *done).await;
    let journal = live.journal.clone();
    let replay = match Replay::new(&history) {
        Ok(replay) => replay,
        Err(reason) => return park(&live, format!("the journal is inconsistent: {reason}")).await,
    };
    let input = match history.first().map(|r| &r.event) {
        Some(Event::SagaStarted { input, .. }) => input.clone(),
        _ => return park(&live, "the journal does not begin with SagaStarted".into()).await,
    };
    let (interrupt_tx, interrupt_rx) = oneshot::channel();
    for (seq, (name, payload)) in &replay.signals {
        live.control.deliver(*seq, name.clone(), payload.clone());
    }
    let shared = Arc::new(SagaShared {
        id: journal.id.clone(),
        inner: inner.clone(),
        journal: journal.clone(),
        next_step: AtomicU32::new(replay.next_step),
        visited: replay.keys.iter().map(|_| AtomicBool::new(false)).collect(),
        unreached: AtomicUsize::new(replay.keys.len()),
        replayed: watch::Sender::new(replay.keys.is_empty()),
        consumed: Mutex::new(replay.consumed_signals().collect()),
        replay,
        stack: Mutex::new(Vec::new()),
        interrupt: Mutex::new(Some(interrupt_tx)),
        control: live.control.clone(),
        max_payload: inner.config.max_payload_bytes,
    });
    let body = (definition.body)(SagaContext { shared: shared.clone(), scope: Scope::root() }, input);
    // A cancel already in the journal is honoured by the operations once replay reaches them;
    // a new one also cuts off a body blocked elsewhere. Either way the body is dropped only
    // after replay has pushed the compensation of every recorded step: concurrent branches
    // replay in their own tasks, and one may see the cancel before another has caught up.
    let mut body = std::pin::pin!(body);
    let mut interrupt_rx = interrupt_rx;
    let mut new_cancel = live.control.cancel.subscribe();
    new_cancel.mark_unchanged();
    let ending = tokio::select! {
        biased;
        Ok(why) = &mut interrupt_rx => Ending::Interrupted(why),
        Ok(reason) = new_cancel.wait_for(Option::is_some) => {
            Ending::Interrupted(Interrupt::Cancelled(reason.clone().unwrap_or_default()))
        }
        result = &mut body => Ending::Body(result),
    };
    if matches!(ending, Ending::Interrupted(Interrupt::Cancelled(_))) {
        let mut replayed = shared.replayed.subscribe();
        tokio::select! {
            _ = replayed.wait_for(|done| *done) => {}
            // Whatever the body does now, it can no longer end the saga: the cancel decides.
            _ = &mut body => {}
            () = tokio::time::sleep(REPLAY_GRACE) => {
                tracing::warn!(unreached = ?shared.unvisited(), "cancelled before replay reached every recorded operation");
            }
        }
    }
    let replay = &shared.replay;
    let unconsumed = || {
        shared.unvisited().map(|(key, kind)| {
            format!("the body now ends without reaching operation {key} ({kind}) that the journal records")
        })
    };
    match ending {
        Ending::Body(Ok(output)) => {
            if let Some(reason) = shared.cancel_reason() {
                compensate(&inner, &live, &shared, format!("cancelled: {reason}")).await
            } else if let Some(reason) = unconsumed() {
                park(&live, reason).await
            } else if replay.body_failed.is_some() {
                park(&live, "the journal says the body failed, but it now completes".into()).await
            } else if output.len() > inner.config.max_payload_bytes {
                let cause = format!(
                    "the saga output is {} bytes, over the limit of {} bytes",
                    output.len(),
                    inner.config.max_payload_bytes
                );
                compensate(&inner, &live, &shared, cause).await
            } else {
                finish(&inner, &live, Event::SagaCompleted { output }, SagaStatus::Completed).await
            }
        }
        Ending::Body(Err(e)) => match unconsumed() {
            Some(reason) => park(&live, reason).await,
            None => compensate(&inner, &live, &shared, e.message().to_string()).await,
        },
        Ending::Interrupted(Interrupt::Nondeterminism(reason)) => park(&live, reason).await,
        Ending::Interrupted(Interrupt::Cancelled(reason)) => {
            compensate(&inner, &live, &shared, format!("cancelled: {reason}")).await
        }
        Ending::Interrupted(Interrupt::Suspended) => {
            if let Err(e) = journal.sync().await {
                tracing::error!(error = %e, "could not write the journal while suspending");
            }
        }
        Ending::Interrupted(Interrupt::Storage(e)) => park(&live, unwritable(&e)).await,
    }
}

/// Runs the compensation stack in reverse order, then records the saga's end.
async fn compensate(inner: &Arc<Inner>, live: &Arc<LiveSaga>, shared: &SagaShared, cause: String) {
    let journal = &live.journal;
    let mut stack = std::mem::take(&mut *lock(&shared.stack));
    // Step numbers follow the order steps first started, in the first run as in replay, while
    // the stack's order depends on how concurrent branches happened to interleave.
    stack.sort_by_key(|pending| pending.step);
    if stack.is_empty() {
        return finish(inner, live, Event::SagaFailed { cause: cause.clone() }, SagaStatus::Failed).await;
    }
    let first_failure = shared.replay.body_failed.is_none() && shared.cancel_reason().is_none();
    let entering = first_failure.then(|| Event::BodyFailed { cause: cause.clone() });
    if (entering.is_some() || journal.record().status != SagaStatus::Compensating)
        && let Err(e) = journal.transition(entering, SagaStatus::Compensating).await
    {
        return park(live, unwritable(&e)).await;
    }
    tracing::info!(cause = %cause, steps = stack.len(), "compensating");
    for (position, pending) in stack.iter().enumerate().rev() {
        let history = shared.replay.compensations.get(&pending.step).cloned().unwrap_or_default();
        if history.completed {
            continue;
        }
        let step = pending.step;
        let key = &pending.key;
        let what = format!("compensation of step `{}`", pending.name);
        let result = match history.failed {
            Some(error) => Attempted::Done(Err(StepError::terminal(error))),
            None => {
                let log = AttemptLog {
                    journal,
                    timers: &inner.timers,
                    control: &live.control,
                    watch_cancel: false,
                    policy: pending.spec.retry,
                    timeout: pending.spec.timeout,
                    key,
                    what: &what,
                    started: |attempt| Event::CompensationStarted { step, attempt },
                    failed: |attempt, error, retry_at| Event::CompensationAttemptFailed {
                        step,
                        attempt,
                        error,
                        retry_at,
                    },
                };
                let span = tracing::info_span!("compensation", saga.id = %shared.id, step.name = %pending.name, step.index = step);
                log.run(history.attempts, |attempt| {
                    (pending.spec.run)(RawCompensation {
                        saga_id: shared.id.clone(),
                        step,
                        name: pending.name.clone(),
                        attempt,
                        idempotency_key: key.clone(),
                        input: pending.input.clone(),
                        output: pending.output.clone(),
                    })
                })
                .instrument(span)
                .await
            }
        };
        let written = match result {
            Attempted::Stopped(Interrupt::Storage(e)) => {
                return park(live, unwritable(&e)).await;
            }
            Attempted::Stopped(_) => return,
            Attempted::Done(Ok(())) => journal.append_durable(Event::CompensationCompleted { step }).await,
            Attempted::Done(Err(e)) => {
                let error = e.message().to_string();
                if let Err(e) =
                    journal.append_durable(Event::CompensationFailed { step, error: error.clone() }).await
                {
                    return park(live, unwritable(&e)).await;
                }
                let undone = stack[..=position].iter().rev().map(|p| p.step).collect();
                let end = Event::SagaCompensationFailed { step, error, undone };
                return finish(inner, live, end, SagaStatus::CompensationFailed).await;
            }
        };
        if let Err(e) = written {
            return park(live, unwritable(&e)).await;
        }
    }
    finish(inner, live, Event::SagaCompensated { cause }, SagaStatus::Compensated).await
}

async fn finish(inner: &Arc<Inner>, live: &Arc<LiveSaga>, event: Event, status: SagaStatus) {
    match live.journal.transition(Some(event), status).await {
        Ok(recorded) => {
            tracing::info!(status = live.journal.record().status.kind(), "saga finished");
            // Forgotten first, so that whoever the outcome wakes finds the saga finished.
            inner.forget(&live.journal.id);
            live.finished.send_replace(recorded.map(Arc::new));
        }
        Err(e) => park(live, unwritable(&e)).await,
    }
}

fn unwritable(e: &dyn std::fmt::Display) -> String {
    format!("the journal could not be written: {e}")
}

async fn park(live: &LiveSaga, reason: String) {
    tracing::error!(reason = %reason, "saga parked");
    // If even this write fails, the saga stays in flight as it was and is retried at the next
    // start; the in-memory status below still shows why to anyone inspecting it now.
    if let Err(e) = live.journal.transition(None, SagaStatus::Parked { reason }).await {
        tracing::error!(error = %e, "could not record that the saga is parked");
    }
}
