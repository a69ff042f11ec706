//! Trace context: where a saga's spans sit in a distributed trace, and the hooks through which
//! the engine and the control plane reach OpenTelemetry when it is on.
//!
//! The engine emits `tracing` spans (`saga.start`, `saga`, `step`, `attempt`, `compensation`,
//! `timer`, `signal.wait`; the control plane adds `job`). These hooks give a span's W3C context
//! (to journal it at a saga's start, or to send it with a job), make a span the child of a
//! context read back (a resumed saga, a new engine), and record spans timed elsewhere (the
//! agent's run of a job). They do nothing, at the cost of one atomic load, until an exporter is
//! installed: see `telemetry::Otlp` (feature `otel`).

mod context;
mod remote;
mod unsampled;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

pub use context::{TraceContext, TraceContextError};
pub use remote::RemoteSpan;
pub(crate) use unsampled::{Unsampled, within as within_unsampled};

/// A saga's new trace with no caller, as the exporter's sampler decides it ahead of any span.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) enum RootDraw {
    /// Dropped: the saga runs under this context, flagged not sampled, and makes no span.
    Dropped(TraceContext),
    /// Kept: its first span is started through [`context_of_kept`].
    Kept,
    /// Not drawn ahead (the sampler is the variables' own): its first span's start decides.
    AtStart,
}

/// What an installed exporter does for the hooks below.
pub(crate) trait Bridge: Send + Sync {
    fn context_of(&self, span: &tracing::Span) -> Option<TraceContext>;
    fn draw_root(&self) -> RootDraw;
    fn context_of_kept(&self, span: &tracing::Span) -> Option<TraceContext>;
    fn set_parent(&self, span: &tracing::Span, parent: &TraceContext);
    fn record(&self, span: RemoteSpan);
}

static BRIDGE: OnceLock<Box<dyn Bridge>> = OnceLock::new();
/// Export on or off; off, the hooks are a branch and nothing propagates.
static ON: AtomicBool = AtomicBool::new(false);

/// Installs `bridge` (the first installation wins: OpenTelemetry's tracer provider is global
/// too) and turns propagation on. Returns whether this one was installed.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) fn install(bridge: Box<dyn Bridge>) -> bool {
    let installed = BRIDGE.set(bridge).is_ok();
    ON.store(true, Ordering::Release);
    installed
}

/// Turns propagation and export on or off, for an exporter already installed.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) fn set_on(on: bool) {
    ON.store(on, Ordering::Release);
}

fn bridge() -> Option<&'static dyn Bridge> {
    if !ON.load(Ordering::Acquire) {
        return None;
    }
    BRIDGE.get().map(|bridge| &**bridge)
}

/// Whether spans are exported now, so that trace context is worth computing.
pub fn is_on() -> bool {
    bridge().is_some()
}

/// The W3C context of `span`, if spans are exported and this one is recorded.
pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    bridge()?.context_of(span)
}

/// Draws the sampler's decision for a saga's trace that has no caller, before its first span.
pub(crate) fn draw_root() -> RootDraw {
    bridge().map_or(RootDraw::AtStart, |bridge| bridge.draw_root())
}

/// The context of `span`, just made, of a trace drawn as kept: started with the sampler told so.
pub(crate) fn context_of_kept(span: &tracing::Span) -> Option<TraceContext> {
    bridge()?.context_of_kept(span)
}

/// The context of the current span: what a remote call made now should carry. Inside a saga
/// whose trace is not sampled, that saga's context, flagged so.
pub fn current() -> Option<TraceContext> {
    let bridge = bridge()?;
    unsampled::current().or_else(|| bridge.context_of(&tracing::Span::current()))
}

/// Whether spans made now belong to a saga whose trace is not sampled: the exporter's layer
/// turns them away.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) fn sampled_out() -> bool {
    unsampled::active()
}

/// Makes `span`, not yet entered, the child of `parent` (read from a journal or a peer).
pub fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    if let Some(bridge) = bridge() {
        bridge.set_parent(span, parent);
    }
}

/// Exports a span timed in another process, ids as they are.
pub fn record_remote(span: RemoteSpan) {
    if let Some(bridge) = bridge() {
        bridge.record(span);
    }
}
