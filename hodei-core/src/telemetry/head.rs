//! The sampler's decision for a saga's new trace, drawn before any span of it is made.
//!
//! Left to the sampler, a saga's trace is decided when its `saga.start` span starts: by then
//! `tracing-opentelemetry` has built the span (its attributes recorded, ids made), all for
//! nothing when the trace is dropped, and with a ratio of one in ten that is nine sagas in ten.
//! So the bridge draws first, with the same sampler on a fresh trace id: a saga whose trace is
//! dropped gets a context flagged not sampled and no span at all, and one whose trace is kept
//! starts its `saga.start` with the sampler told so, which keeps the ratio what it says rather
//! than its square.

use std::cell::Cell;

use opentelemetry::trace::{Link, SpanKind, TraceContextExt as _, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, Sampler, SamplingDecision, SamplingResult, ShouldSample,
};

use crate::trace::TraceContext;

thread_local! {
    /// Set while a span whose trace was drawn as kept is started on this thread.
    static KEPT: Cell<bool> = const { Cell::new(false) };
}

/// The tracer provider's sampler: `inner`, except for a span started by [`start_kept`].
#[derive(Debug, Clone)]
pub(super) struct HeadSampler {
    pub(super) inner: Sampler,
}

impl ShouldSample for HeadSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if KEPT.get() {
            let trace_state = parent
                .filter(|parent| parent.has_active_span())
                .map(|parent| parent.span().span_context().trace_state().clone())
                .unwrap_or_default();
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state,
            };
        }
        self.inner.should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

/// Draws `sampler`'s decision for a new root trace: `None` to keep it, or the context, flagged
/// not sampled, of the trace it drops.
pub(super) fn draw(sampler: &Sampler) -> Option<TraceContext> {
    let ids = RandomIdGenerator::default();
    let trace_id = ids.new_trace_id();
    let result = sampler.should_sample(None, trace_id, "saga.start", &SpanKind::Internal, &[], &[]);
    match result.decision {
        SamplingDecision::RecordAndSample => None,
        SamplingDecision::Drop | SamplingDecision::RecordOnly => {
            TraceContext::new(trace_id.to_bytes(), ids.new_span_id().to_bytes(), false)
        }
    }
}

/// Runs `start`, which starts a span, with the sampler told to keep it.
pub(super) fn start_kept<T>(start: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            KEPT.set(false);
        }
    }
    KEPT.set(true);
    let _reset = Reset;
    start()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(sampler: &HeadSampler) -> SamplingDecision {
        let trace_id = RandomIdGenerator::default().new_trace_id();
        sampler.should_sample(None, trace_id, "saga.start", &SpanKind::Internal, &[], &[]).decision
    }

    #[test]
    fn a_trace_the_sampler_drops_is_drawn_as_a_context_not_sampled() {
        let dropped = draw(&Sampler::TraceIdRatioBased(0.0)).expect("a ratio of 0 drops every trace");
        assert!(!dropped.sampled());
        assert_ne!(dropped.trace_id(), [0; 16]);
        assert!(draw(&Sampler::TraceIdRatioBased(1.0)).is_none(), "a ratio of 1 keeps every trace");
    }

    #[test]
    fn a_span_started_as_kept_is_sampled_and_only_that_one() {
        let sampler = HeadSampler { inner: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0))) };
        assert_eq!(decision(&sampler), SamplingDecision::Drop);
        assert_eq!(start_kept(|| decision(&sampler)), SamplingDecision::RecordAndSample);
        assert_eq!(decision(&sampler), SamplingDecision::Drop, "told once, not for good");
        let unwound = std::panic::catch_unwind(|| start_kept(|| panic!("while starting")));
        assert!(unwound.is_err());
        assert_eq!(decision(&sampler), SamplingDecision::Drop, "a panic does not leave it told");
    }
}
