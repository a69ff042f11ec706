//! Prometheus metrics: the engine's runs, steps and journal, the control plane's workers, jobs
//! and logs, and the operator API's requests, served at `/metrics` by the
//! [`ApiServer`](crate::api::ApiServer) in Prometheus' text format (0.0.4).
//!
//! One [`Metrics`] is shared by whatever it measures: given to a [`Node`](crate::Node) (or to
//! an [`EngineBuilder`](hodei_core::EngineBuilder) as its observer, and to a
//! [`ControlPlaneBuilder`](crate::ControlPlaneBuilder)) and to the API that serves it. What
//! happens (runs started, steps' durations, bytes received) is counted as it happens; what is
//! held now (runs in flight, workers, queued jobs) is counted at each scrape, so it is right
//! after a restart. Counters start at zero with the process.
//!
//! Label values are bounded: definitions, providers, route templates, outcomes and states.
//! No metric carries a saga, job or worker id.

mod control_plane;
mod engine;
mod families;
mod gauges;
mod labels;

use std::fmt;
use std::sync::Arc;

use families::Families;
pub use gauges::Sources;
use labels::Request;

/// The content type of what [`Metrics::encode`] writes: Prometheus' text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Hodei's metrics. Cheap to clone: clones share the values.
#[derive(Clone)]
pub struct Metrics {
    families: Arc<Families>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        Self { families: Arc::new(Families::new()) }
    }

    /// The metrics in Prometheus' text format ([`CONTENT_TYPE`]), with this moment's gauges
    /// counted from `sources`.
    pub fn encode(&self, sources: Sources<'_>) -> String {
        use prometheus_client::encoding::prometheus_text::encode;
        let mut text = String::new();
        // Writing to a String cannot fail, and the registries hold only metrics whose encoding
        // cannot either.
        let _ = encode(&mut text, &self.families.registry);
        let _ = encode(&mut text, &gauges::count(sources));
        text
    }

    /// The operator API answered a request to `route` (the matched template) with `status`.
    pub(crate) fn api_request(&self, method: &str, route: &str, status: u16) {
        let labels = Request { method: method.to_owned(), route: route.to_owned(), status };
        self.families.api_requests.get_or_create(&labels).inc();
    }
}
