//! Running a step's or a compensation's attempts, each journaled before it runs.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use super::control::Control;
use super::interrupt::Interrupt;
use super::journal::Journal;
use super::scope::Scope;
use crate::event::{Event, Timestamp};
use crate::replay::Attempts;
use crate::retry::{RetryPolicy, StepError};
use crate::timers::Timers;

/// The result of a retried run: it finished (either way), or something stopped it.
pub(super) enum Attempted<T> {
    Done(Result<T, StepError>),
    /// With the number of attempts started so far (in the journal): a step stopped after it
    /// started has its end journaled.
    Stopped(Interrupt, u32),
}

/// Records how a step or compensation ended on its span: `hodei.outcome`, and the error
/// status trace viewers show.
pub(super) fn record_outcome<T>(span: &tracing::Span, attempted: &Attempted<T>) {
    match attempted {
        Attempted::Done(result) => record_result(span, result),
        Attempted::Stopped(Interrupt::Cancelled(_) | Interrupt::BranchCancelled(_), _) => {
            span.record("hodei.outcome", "cancelled");
        }
        Attempted::Stopped(..) => {
            span.record("hodei.outcome", "interrupted");
        }
    }
}

/// Records one result on its span (an attempt's, or its step's last).
fn record_result<T>(span: &tracing::Span, result: &Result<T, StepError>) {
    match result {
        Ok(_) => {
            span.record("hodei.outcome", "ok");
        }
        Err(e) => {
            span.record("hodei.outcome", if e.is_retryable() { "retryable_error" } else { "error" });
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", e.message());
        }
    }
}

/// What cancels a step's attempts: its saga's cancel, and its branch's.
pub(super) struct Cancels<'a> {
    pub(super) scope: &'a Scope,
    /// Tells the running attempt (its `StepContext`) that it is being stopped, and why.
    pub(super) stop: &'a watch::Sender<Option<String>>,
    /// How long a stopped attempt may go on to wind down (a job waits for its end) before it
    /// is dropped.
    pub(super) wind_down: Duration,
    /// The saga's steps at work: a cancelled saga compensates once they have wound down.
    pub(super) saga: &'a watch::Sender<usize>,
}

/// Counts one step at work (starting, running, or waiting to retry) in its saga and in every
/// scope it is in, for as long as it lives: whoever cancels waits for the counts to fall.
pub(super) struct Busy<'a> {
    pub(super) saga: &'a watch::Sender<usize>,
    pub(super) scope: &'a Scope,
}

impl<'a> Busy<'a> {
    pub(super) fn new(saga: &'a watch::Sender<usize>, scope: &'a Scope) -> Self {
        saga.send_modify(|n| *n += 1);
        let mut current = Some(scope);
        while let Some(scope) = current {
            scope.busy.send_modify(|n| *n += 1);
            current = scope.parent.as_deref();
        }
        Self { saga, scope }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut current = Some(self.scope);
        while let Some(scope) = current {
            scope.busy.send_modify(|n| *n -= 1);
            current = scope.parent.as_deref();
        }
        self.saga.send_modify(|n| *n -= 1);
    }
}

/// Counts one attempt waiting out its backoff for as long as it waits.
struct Backoff<'a>(&'a watch::Sender<usize>);

impl<'a> Backoff<'a> {
    fn new(count: &'a watch::Sender<usize>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Backoff<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Cancels<'_> {
    pub(super) fn now(&self, control: &Control) -> Option<Interrupt> {
        control
            .cancelled()
            .map(Interrupt::Cancelled)
            .or_else(|| self.scope.cancelled().map(Interrupt::BranchCancelled))
    }

    pub(super) async fn requested(&self, control: &Control) -> Interrupt {
        tokio::select! {
            reason = control.cancel_requested() => Interrupt::Cancelled(reason),
            reason = self.scope.cancel_requested() => Interrupt::BranchCancelled(reason),
        }
    }
}

/// How one retried thing (a step or a compensation) journals its attempts.
pub(super) struct AttemptLog<'a, S, F> {
    pub(super) journal: &'a Journal,
    pub(super) timers: &'a Timers,
    pub(super) control: &'a Control,
    /// `None` for a compensation, which nothing cancels.
    pub(super) cancels: Option<Cancels<'a>>,
    /// Whether an attempt cut off by a restart uses up one of the policy's attempts.
    pub(super) interruptions_count: bool,
    pub(super) policy: RetryPolicy,
    pub(super) timeout: Option<Duration>,
    pub(super) key: &'a str,
    pub(super) what: &'a str,
    pub(super) started: S,
    pub(super) failed: F,
}

impl<S, F> AttemptLog<'_, S, F>
where
    S: Fn(u32) -> Event,
    F: Fn(u32, String, Timestamp) -> Event,
{
    /// Runs attempts until one succeeds, a failure is terminal, or the policy gives up.
    /// Every attempt start and every retry's due time is journaled first, so a restart resumes
    /// the count and the wait where they were.
    pub(super) async fn run<T, A, Fut>(&self, mut history: Attempts, mut attempt: A) -> Attempted<T>
    where
        A: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        let _busy = self.cancels.as_ref().map(|cancels| Busy::new(cancels.saga, cancels.scope));
        // The event after which a retry-now cuts the backoff. Replay already moved a replayed
        // retry's due time to any retry-now the journal holds, so any one journaled by this
        // process (whose `retry_now` starts at 0) applies to it.
        let mut failed_at = 0;
        // Counted from before its failure is journaled, so that whoever sees the failure finds
        // the attempt waiting: a retry-now then is journaled after the failure, and cuts it.
        let mut waiting = None;
        if history.interrupted() {
            // The process stopped inside the last attempt. It counts, as a lost worker does
            // elsewhere: a step that kills its process cannot retry forever.
            if self.interruptions_count && !self.policy.allows_after(history.started) {
                return Attempted::Done(Err(StepError::retryable(format!(
                    "{} was interrupted by a restart in attempt {}, its last",
                    self.what, history.started
                ))));
            }
            history.retry_at = Some(self.timers.now());
        }
        loop {
            if let Some(due) = history.retry_at {
                let cancel = async {
                    match &self.cancels {
                        Some(cancels) => cancels.requested(self.control).await,
                        None => std::future::pending().await,
                    }
                };
                let _waiting = waiting.take().unwrap_or_else(|| Backoff::new(&self.control.backoffs));
                tokio::select! {
                    _ = self.timers.sleep_until(due) => {}
                    () = self.control.retry_now_after(failed_at) => {
                        tracing::info!(attempt = history.started + 1, "retry now: the backoff is cut short");
                    }
                    interrupt = self.control.stopped(false) => return Attempted::Stopped(interrupt, history.started),
                    interrupt = cancel => return Attempted::Stopped(interrupt, history.started),
                }
            }
            if self.control.shutting_down() {
                return Attempted::Stopped(Interrupt::Suspended, history.started);
            }
            if let Some(interrupt) = self.cancels.as_ref().and_then(|cancels| cancels.now(self.control)) {
                return Attempted::Stopped(interrupt, history.started);
            }
            let n = history.started + 1;
            if let Err(e) = self.journal.append_durable((self.started)(n)).await {
                return Attempted::Stopped(Interrupt::Storage(e.to_string()), history.started);
            }
            history = Attempts { started: n, retry_at: None, failed: history.failed };
            let span = tracing::info_span!(
                "attempt",
                hodei.attempt = n,
                hodei.outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
            );
            let recorded = span.clone();
            let future = attempt(n);
            let running = async move {
                let result = match self.timeout {
                    None => future.await,
                    Some(limit) => tokio::time::timeout(limit, future).await.unwrap_or_else(|_| {
                        Err(StepError::retryable(format!("{} timed out after {limit:?}", self.what)))
                    }),
                };
                record_result(&recorded, &result);
                result
            }
            .instrument(span);
            // A running attempt is stopped by a cancel (of its saga or its branch), not by
            // shutdown: shutdown lets running steps finish up to its deadline. A stopped attempt
            // is told why and may wind down (a remote job is cancelled and waited for) before
            // it is dropped, which is how an attempt that does not listen learns it.
            let result = match &self.cancels {
                Some(cancels) => {
                    tokio::pin!(running);
                    tokio::select! {
                        result = &mut running => result,
                        interrupt = cancels.requested(self.control) => {
                            let (Interrupt::Cancelled(reason) | Interrupt::BranchCancelled(reason)) = &interrupt else {
                                return Attempted::Stopped(interrupt, n);
                            };
                            cancels.stop.send_replace(Some(reason.clone()));
                            let _ = tokio::time::timeout(cancels.wind_down, &mut running).await;
                            return Attempted::Stopped(interrupt, n);
                        }
                    }
                }
                None => running.await,
            };
            // The attempts this failure uses up: every one started, or, when a restart's
            // does not count, those that failed.
            let used = if self.interruptions_count { n } else { history.failed + 1 };
            match result {
                Ok(value) => return Attempted::Done(Ok(value)),
                Err(e) if e.is_retryable() && self.policy.allows_after(used) => {
                    tracing::warn!(attempt = n, error = %e, "attempt failed; will retry");
                    let backoff = self.policy.backoff(n, self.key);
                    let failed = |at: Timestamp| (self.failed)(n, e.message().to_string(), at.after(backoff));
                    waiting = Some(Backoff::new(&self.control.backoffs));
                    match self.journal.append_durable_at(failed).await {
                        Ok(recorded) => {
                            history.retry_at = Some(recorded.at.after(backoff));
                            history.failed += 1;
                            failed_at = recorded.seq;
                        }
                        Err(e) => return Attempted::Stopped(Interrupt::Storage(e.to_string()), n),
                    }
                }
                Err(e) => return Attempted::Done(Err(e)),
            }
        }
    }
}
