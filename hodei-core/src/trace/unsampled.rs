//! A saga whose trace is not sampled: its spans skip the exporter altogether.
//!
//! A sampler that drops a trace only spares the export; `tracing-opentelemetry` still builds
//! every span of it (attributes, ids, a non-recording span at its end), which on a busy engine
//! costs most of what exporting it would. So a saga whose journaled context says "not sampled"
//! runs with that context on its thread while it is polled, and the exporter's layer turns
//! away every span made meanwhile: its steps, attempts, timers and jobs cost what they cost
//! with export off. What such a saga propagates (a job's `traceparent`, a child saga's start)
//! is its own context, flagged not sampled, so the whole trace stays out, on every engine and
//! worker, and after every restart.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::TraceContext;

thread_local! {
    static CURRENT: RefCell<Option<TraceContext>> = const { RefCell::new(None) };
}

/// The context of the unsampled saga being polled on this thread, if one is.
pub(super) fn current() -> Option<TraceContext> {
    CURRENT.with(|current| current.borrow().clone())
}

/// Whether an unsampled saga is being polled on this thread.
pub(super) fn active() -> bool {
    CURRENT.with(|current| current.borrow().is_some())
}

/// Runs `make` as if polled by the unsampled saga of `context`: for the span a saga's driver
/// runs in, made before its first poll.
pub(crate) fn within<T>(context: &TraceContext, make: impl FnOnce() -> T) -> T {
    on_thread(&mut Some(context.clone()), make)
}

/// Runs `run` with `slot`'s context moved onto the thread, and moves it back after, panicking
/// or not: moved, not cloned, as a saga is polled often.
fn on_thread<T>(slot: &mut Option<TraceContext>, run: impl FnOnce() -> T) -> T {
    let previous = CURRENT.with(|current| current.replace(slot.take()));
    let _back = Back { slot, previous };
    run()
}

/// `inner`, polled with `context` on the thread when there is one.
pub(crate) struct Unsampled<F> {
    context: Option<TraceContext>,
    inner: Pin<Box<F>>,
}

impl<F: Future> Unsampled<F> {
    pub(crate) fn new(context: Option<TraceContext>, inner: F) -> Self {
        Self { context, inner: Box::pin(inner) }
    }
}

impl<F: Future> Future for Unsampled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if this.context.is_none() {
            return this.inner.as_mut().poll(cx);
        }
        let inner = &mut this.inner;
        on_thread(&mut this.context, || inner.as_mut().poll(cx))
    }
}

/// Takes the context back off the thread into its slot, and puts back what was there.
struct Back<'a> {
    slot: &'a mut Option<TraceContext>,
    previous: Option<TraceContext>,
}

impl Drop for Back<'_> {
    fn drop(&mut self) {
        let previous = self.previous.take();
        *self.slot = CURRENT.with(|current| current.replace(previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> TraceContext {
        TraceContext::new([1; 16], [2; 8], false).unwrap()
    }

    #[tokio::test]
    async fn the_context_is_on_the_thread_only_while_the_saga_is_polled() {
        assert!(!active());
        let inside = Unsampled::new(Some(context()), async {
            tokio::task::yield_now().await;
            current()
        })
        .await;
        assert_eq!(inside, Some(context()));
        assert!(!active());
        // Polled twice, the context came back from the thread after the first poll.
        let mut twice = std::pin::pin!(Unsampled::new(Some(context()), async {
            tokio::task::yield_now().await;
            current()
        }));
        assert_eq!(futures_poll(twice.as_mut()), Poll::Pending);
        assert!(!active());
        assert_eq!(twice.await, Some(context()));
        let transparent = Unsampled::new(None, async { active() }).await;
        assert!(!transparent);
    }

    fn futures_poll<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[test]
    fn a_panicking_poll_leaves_the_thread_clean() {
        let caught = std::panic::catch_unwind(|| within(&context(), || panic!("a step panicked")));
        assert!(caught.is_err());
        assert!(!active());
    }
}
