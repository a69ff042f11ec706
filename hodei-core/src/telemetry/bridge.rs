//! The trace hooks on OpenTelemetry: span contexts through `tracing-opentelemetry`, remote
//! spans straight to the span processor.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SpanData, SpanEvents, SpanLinks, SpanProcessor};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::head;
use super::shared::SharedProcessor;
use crate::trace::{Bridge, RemoteSpan, RootDraw, TraceContext};

pub(super) struct OtelBridge {
    /// The processor behind the tracer provider: remote spans keep their ids, which the
    /// tracer API would replace.
    pub(super) processor: Arc<SharedProcessor>,
    /// The sampler of root traces, when the code set it: drawn ahead (see `head`).
    pub(super) root_sampler: Option<Sampler>,
}

fn span_context(context: &TraceContext, remote: bool) -> SpanContext {
    let flags = if context.sampled() { TraceFlags::SAMPLED } else { TraceFlags::default() };
    // Already checked by `TraceContext`; a state OpenTelemetry reads otherwise is left out.
    let state = TraceState::from_str(context.tracestate()).unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(context.trace_id()),
        SpanId::from_bytes(context.span_id()),
        flags,
        remote,
        state,
    )
}

impl Bridge for OtelBridge {
    fn context_of(&self, span: &tracing::Span) -> Option<TraceContext> {
        let otel = span.context();
        let context = otel.span().span_context().clone();
        if !context.is_valid() {
            return None;
        }
        let ours = TraceContext::new(
            context.trace_id().to_bytes(),
            context.span_id().to_bytes(),
            context.is_sampled(),
        )?;
        // An OpenTelemetry state is valid W3C by construction; if not, the ids alone still join.
        let header = context.trace_state().header();
        Some(ours.clone().with_state(&header).unwrap_or(ours))
    }

    fn draw_root(&self) -> RootDraw {
        match &self.root_sampler {
            Some(sampler) => head::draw(sampler).map_or(RootDraw::Kept, RootDraw::Dropped),
            None => RootDraw::AtStart,
        }
    }

    fn context_of_kept(&self, span: &tracing::Span) -> Option<TraceContext> {
        // Only a draw makes a trace kept, and only a bridge with a root sampler draws.
        head::start_kept(|| self.context_of(span))
    }

    fn set_parent(&self, span: &tracing::Span, parent: &TraceContext) {
        let parent = Context::new().with_remote_span_context(span_context(parent, true));
        if let Err(e) = span.set_parent(parent) {
            tracing::debug!(error = %e, "a span's parent could not be set");
        }
    }

    fn record(&self, span: RemoteSpan) {
        if !span.context.sampled() {
            return;
        }
        let status = match span.error {
            Some(message) => Status::error(message),
            None => Status::Unset,
        };
        let data = SpanData {
            span_context: span_context(&span.context, false),
            parent_span_id: SpanId::from_bytes(span.parent_span_id),
            parent_span_is_remote: true,
            span_kind: SpanKind::Internal,
            name: Cow::Owned(span.name),
            start_time: span.start,
            end_time: span.end,
            attributes: span.attributes.into_iter().map(|(key, value)| KeyValue::new(key, value)).collect(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: InstrumentationScope::builder(span.scope).build(),
        };
        self.processor.on_end(data);
    }
}
