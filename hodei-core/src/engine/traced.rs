//! The span a saga's driver runs in, and the trace context journaled at the saga's start.

use crate::event::{Event, RecordedEvent, SagaRecord};
use crate::trace;

/// The span for one run of a saga's driver, with the event to journal if this run starts the
/// saga's trace.
///
/// While spans are exported, a saga's trace is rooted at a `saga.start` span, a child of the
/// caller's span (so that a child saga, or a run started by a traced request, joins its trace).
/// It ends at once, so it is exported even if the process dies mid-saga, and its context is
/// journaled: every run of the driver, this one and each one after a restart, is a `saga` span
/// under it. A journal without a context, from before or from a run not exported, gets a fresh
/// trace for each run.
pub(super) fn driver_span(record: &SagaRecord, history: &[RecordedEvent]) -> (tracing::Span, Option<Event>) {
    if !trace::is_on() {
        let span = tracing::info_span!(
            "saga",
            hodei.saga.id = %record.id,
            hodei.saga.definition = %record.definition,
            hodei.saga.version = record.version
        );
        return (span, None);
    }
    let journaled = history.iter().find_map(|recorded| recorded.event.trace_context());
    // Only a run that begins at the saga's first event is its start; any other journal has
    // run before without a context, and its earlier spans are in traces of their own.
    let fresh = history.len() == 1;
    let (parent, journal) = match journaled {
        Some(context) => (Some(context), None),
        None if fresh => {
            let start = tracing::info_span!(
                "saga.start",
                hodei.saga.id = %record.id,
                hodei.saga.definition = %record.definition,
                hodei.saga.version = record.version
            );
            let context = trace::context_of(&start);
            let event = context.as_ref().map(|context| Event::TraceStarted {
                traceparent: context.traceparent(),
                tracestate: context.tracestate().to_owned(),
            });
            (context, event)
        }
        None => (None, None),
    };
    let span = tracing::info_span!(
        parent: None,
        "saga",
        hodei.saga.id = %record.id,
        hodei.saga.definition = %record.definition,
        hodei.saga.version = record.version,
        hodei.saga.resumed = !fresh,
        trace_id = tracing::field::Empty
    );
    if let Some(parent) = &parent {
        trace::set_parent(&span, parent);
    }
    // For the logs: each line inside the saga names its trace, which a log store can link.
    if let Some(context) = trace::context_of(&span) {
        span.record("trace_id", context.trace_id_hex());
    }
    (span, journal)
}
