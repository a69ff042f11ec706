//! The spans an agent timed for a job, exported with the control plane's own.

use std::time::{Duration, UNIX_EPOCH};

use hodei_agent::protocol::v1;
use hodei_core::trace::{self, RemoteSpan, TraceContext};

/// Exports the spans a worker sent with a job's result, under the job's span. The agent does
/// not export: its worker may have no route to a collector. A span with malformed ids is
/// dropped (with a debug line): what a worker sends is never a reason to fail its job.
pub(super) fn export(worker_id: &str, spans: Vec<v1::Span>) {
    if !trace::is_on() {
        return;
    }
    for span in spans {
        match remote(worker_id, span) {
            Some(span) => trace::record_remote(span),
            None => tracing::debug!(worker = worker_id, "a worker's span with malformed ids dropped"),
        }
    }
}

fn remote(worker_id: &str, span: v1::Span) -> Option<RemoteSpan> {
    let trace_id = <[u8; 16]>::try_from(span.trace_id.as_slice()).ok()?;
    let span_id = <[u8; 8]>::try_from(span.span_id.as_slice()).ok()?;
    let parent_span_id = <[u8; 8]>::try_from(span.parent_span_id.as_slice()).ok()?;
    // Only sampled traces reach an agent (it times nothing otherwise).
    let context = TraceContext::new(trace_id, span_id, true)?;
    let at = |nanos| UNIX_EPOCH + Duration::from_nanos(nanos);
    let start = at(span.start_unix_nanos);
    // A worker's clock is its own: an end before the start is shown as an instant.
    let end = at(span.end_unix_nanos).max(start);
    let mut remote = RemoteSpan::new(context, parent_span_id, span.name, start, end, "hodei-agent");
    let mut attributes: Vec<(String, String)> = span.attributes.into_iter().collect();
    attributes.sort();
    attributes.push(("hodei.worker.id".to_owned(), worker_id.to_owned()));
    remote.attributes = attributes;
    remote.error = (!span.error.is_empty()).then_some(span.error);
    Some(remote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span() -> v1::Span {
        v1::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![3; 8],
            name: "job.run".into(),
            start_unix_nanos: 2_000,
            end_unix_nanos: 1_000,
            attributes: [("hodei.job.id".to_owned(), "s/0#1".to_owned())].into(),
            error: "exited with code 1".into(),
        }
    }

    #[test]
    fn a_workers_span_keeps_its_ids_and_names_its_worker() {
        let remote = remote("w-1", span()).unwrap();
        assert_eq!(remote.context.trace_id(), [1; 16]);
        assert_eq!(remote.context.span_id(), [2; 8]);
        assert_eq!(remote.parent_span_id, [3; 8]);
        assert_eq!(remote.end, remote.start, "an end before the start is an instant");
        assert_eq!(remote.start, UNIX_EPOCH + Duration::from_nanos(2_000));
        assert_eq!(
            remote.attributes,
            [
                ("hodei.job.id".to_owned(), "s/0#1".to_owned()),
                ("hodei.worker.id".to_owned(), "w-1".to_owned())
            ]
        );
        assert_eq!(remote.error.as_deref(), Some("exited with code 1"));
    }

    #[test]
    fn malformed_ids_are_dropped() {
        for broken in [
            v1::Span { trace_id: vec![1; 15], ..span() },
            v1::Span { span_id: vec![], ..span() },
            v1::Span { parent_span_id: vec![3; 9], ..span() },
            v1::Span { trace_id: vec![0; 16], ..span() },
        ] {
            assert!(remote("w-1", broken).is_none());
        }
    }
}
