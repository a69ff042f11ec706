//! A span that ran in another process (a job's run on a worker) and is recorded here.

use std::time::SystemTime;

use super::TraceContext;

/// A finished span that another process timed and this one exports: the agent on a worker
/// reports its run of a job with the job's result, and the hub records it so that workers
/// need no route to a collector. Its ids are kept as they are, since the job's process was
/// given them in `TRACEPARENT`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RemoteSpan {
    /// Its trace and its own span id.
    pub context: TraceContext,
    /// The span it is a child of.
    pub parent_span_id: [u8; 8],
    /// The span's name.
    pub name: String,
    /// When it started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes, as text.
    pub attributes: Vec<(String, String)>,
    /// Why it failed, if it did (the span's error status).
    pub error: Option<String>,
    /// Who timed it (the instrumentation scope): `hodei-agent`.
    pub scope: String,
}

impl RemoteSpan {
    /// A span with no attributes and no error.
    pub fn new(
        context: TraceContext,
        parent_span_id: [u8; 8],
        name: impl Into<String>,
        start: SystemTime,
        end: SystemTime,
        scope: impl Into<String>,
    ) -> Self {
        Self {
            context,
            parent_span_id,
            name: name.into(),
            start,
            end,
            attributes: Vec::new(),
            error: None,
            scope: scope.into(),
        }
    }
}
