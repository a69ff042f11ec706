//! The batch span processor, shared by the tracer provider and the remote span recorder.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Span, SpanData, SpanProcessor};

/// One batch processor in two hands: the provider's (spans of this process) and the bridge's
/// (spans of workers), so both go out in the same batches to the same exporter.
#[derive(Debug, Clone)]
pub(super) struct SharedProcessor(pub(super) Arc<BatchSpanProcessor>);

impl SpanProcessor for SharedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.0.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    // The resource is given to the processor before it is shared (see `Otlp::build`): this
    // one cannot be changed through an `Arc`.
}
