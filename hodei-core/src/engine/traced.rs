//! The span a saga's driver runs in, and the trace context journaled at the saga's start.

use crate::event::{Event, RecordedEvent, SagaRecord};
use crate::trace::{self, RootDraw, TraceContext};

/// How one run of a saga's driver is traced.
pub(super) struct DriverTrace {
    /// The span the driver runs in.
    pub(super) span: tracing::Span,
    /// The event to journal if this run starts the saga's trace.
    pub(super) started: Option<Event>,
    /// The saga's context when its trace is not sampled: the driver is polled with it on the
    /// thread, so that none of its spans is exported (see `trace::Unsampled`).
    pub(super) unsampled: Option<TraceContext>,
}

/// The span for one run of a saga's driver, with the event to journal if this run starts the
/// saga's trace.
///
/// While spans are exported, a saga's trace is rooted at a `saga.start` span, a child of the
/// caller's span (so that a child saga, or a run started by a traced request, joins its trace).
/// It ends at once, so it is exported even if the process dies mid-saga, and its context is
/// journaled: every run of the driver, this one and each one after a restart, is a `saga` span
/// under it. A journal without a context, from before or from a run not exported, gets a fresh
/// trace for each run. The sampler decides once, at the start: a journaled context flagged not
/// sampled keeps every later run of the saga out of the export too.
pub(super) fn driver_span(record: &SagaRecord, history: &[RecordedEvent]) -> DriverTrace {
    if !trace::is_on() {
        let span = tracing::info_span!(
            "saga",
            hodei.saga.id = record.id.as_str(),
            hodei.saga.definition = record.definition.as_str(),
            hodei.saga.version = record.version
        );
        return DriverTrace { span, started: None, unsampled: None };
    }
    let journaled = history.iter().find_map(|recorded| recorded.event.trace_context());
    // Only a run that begins at the saga's first event is its start; any other journal has
    // run before without a context, and its earlier spans are in traces of their own.
    let fresh = history.len() == 1;
    let (parent, started) = match journaled {
        Some(context) => (Some(context), None),
        None if fresh => {
            // A saga started by a traced caller (a parent saga, a traced request) follows its
            // decision; one with none draws its own before it makes a span, and one dropped
            // makes none (see `telemetry::head`).
            let caller = trace::current();
            let drawn = if caller.is_none() { trace::draw_root() } else { RootDraw::AtStart };
            let context = match drawn {
                RootDraw::Dropped(context) => Some(context),
                drawn => {
                    let start = tracing::info_span!(
                        "saga.start",
                        hodei.saga.id = record.id.as_str(),
                        hodei.saga.definition = record.definition.as_str(),
                        hodei.saga.version = record.version
                    );
                    // Started by an unsampled saga (a child), the start is not recorded: the
                    // parent's context stands for it, and its flag carries the decision down.
                    let started = match drawn {
                        RootDraw::Kept => trace::context_of_kept(&start),
                        _ => trace::context_of(&start),
                    };
                    started.or(caller)
                }
            };
            let event = context.as_ref().map(|context| Event::TraceStarted {
                traceparent: context.traceparent(),
                tracestate: context.tracestate().to_owned(),
            });
            (context, event)
        }
        None => (None, None),
    };
    let unsampled = parent.clone().filter(|context| !context.sampled());
    let make = || {
        tracing::info_span!(
            parent: None,
            "saga",
            hodei.saga.id = record.id.as_str(),
            hodei.saga.definition = record.definition.as_str(),
            hodei.saga.version = record.version,
            hodei.saga.resumed = !fresh,
            trace_id = tracing::field::Empty
        )
    };
    let span = match &unsampled {
        Some(context) => trace::within_unsampled(context, make),
        None => make(),
    };
    if let Some(parent) = &parent {
        trace::set_parent(&span, parent);
    }
    // For the logs: each line inside the saga names its trace, which a log store can link. A
    // span no layer records (a saga left out, with no log layer) has no lines to name it in.
    if span.is_disabled() {
        return DriverTrace { span, started, unsampled };
    }
    if let Some(context) = trace::context_of(&span).or_else(|| unsampled.clone()) {
        span.record("trace_id", context.trace_id_hex());
    }
    DriverTrace { span, started, unsampled }
}
