//! Exporting the engine's spans over OTLP/gRPC (feature `otel`).
//!
//! [`Otlp`] builds an OpenTelemetry tracer provider whose exporter honours the standard
//! `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers, timeout, compression; the traces'
//! own `OTEL_EXPORTER_OTLP_TRACES_*` first) and `OTEL_SERVICE_NAME`, and installs the
//! [`trace`](crate::trace) hooks: a saga's trace context is journaled at its start, handed to
//! its remote jobs, and its workers' spans are exported with its own. Add
//! [`Otlp::layer`] to your `tracing` subscriber, or let [`init_otlp`] install one.
//!
//! ```no_run
//! # fn main() -> Result<(), hodei_core::telemetry::TelemetryError> {
//! use tracing_subscriber::layer::SubscriberExt as _;
//!
//! // OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317, or the default http://localhost:4317
//! let otlp = hodei_core::telemetry::Otlp::from_env("my-ci")?;
//! let subscriber = tracing_subscriber::registry().with(otlp.layer());
//! tracing::subscriber::set_global_default(subscriber).expect("no subscriber yet");
//! // ... run the engine; before exiting:
//! # let _ = async {
//! otlp.shutdown().await?;
//! # Ok::<_, hodei_core::telemetry::TelemetryError>(()) };
//! # Ok(()) }
//! ```

mod bridge;
mod head;
mod shared;

use std::fmt;
use std::sync::Arc;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanProcessor as _,
};
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

use self::bridge::OtelBridge;
use self::head::HeadSampler;
use self::shared::SharedProcessor;
use crate::trace;

/// Why export could not be set up or finished.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration (a bad endpoint, header or timeout).
    #[error("the OTLP exporter could not be built: {0}")]
    Exporter(String),
    /// The exporter's own runtime thread could not start.
    #[error("the exporter's runtime could not start: {0}")]
    Runtime(#[source] std::io::Error),
    /// Another [`Otlp`] already holds the trace hooks: there is one per process, as there is
    /// one global `tracing` subscriber.
    #[error("an OTLP exporter is already installed in this process")]
    AlreadyInstalled,
    /// [`init_otlp`] found a global `tracing` subscriber already set.
    #[error("a global tracing subscriber is already set: add `Otlp::layer` to it instead")]
    SubscriberSet,
    /// A sample ratio outside 0 to 1.
    #[error("the sample ratio {0} is not between 0 and 1")]
    SampleRatio(f64),
    /// Flushing or shutting down the exporter failed (the collector did not answer in time).
    #[error("the OTLP exporter could not flush: {0}")]
    Flush(String),
}

/// An OTLP/gRPC span exporter and the trace hooks it feeds. One per process.
///
/// It runs its gRPC client on a runtime of its own (one thread), so it works whatever runtime,
/// if any, the caller has, and survives the runtime it was built in.
pub struct Otlp {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for Otlp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Otlp").field("exporting", &trace::is_on()).finish_non_exhaustive()
    }
}

/// How to build an [`Otlp`]: the service name, and an endpoint that overrides the variables.
#[derive(Debug, Clone)]
pub struct OtlpBuilder {
    service_name: String,
    endpoint: Option<String>,
    max_queue_size: Option<usize>,
    ca_certificate_pem: Option<Vec<u8>>,
    sample_ratio: Option<f64>,
}

impl OtlpBuilder {
    /// Sends to `endpoint` (`http://host:4317`) whatever `OTEL_EXPORTER_OTLP_ENDPOINT` says.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Holds up to `spans` ended spans waiting for export (`OTEL_BSP_MAX_QUEUE_SIZE`, 2,048 by
    /// default); spans beyond it are dropped. A busy engine ends two spans per step, so one
    /// that runs thousands of steps a second needs more than the default.
    pub fn max_queue_size(mut self, spans: usize) -> Self {
        self.max_queue_size = Some(spans);
        self
    }

    /// Exports the traces of about `ratio` (0 to 1) of the sagas started with no sampled caller
    /// above them, and all of a saga or none of it: `parentbased_traceidratio`, as
    /// `OTEL_TRACES_SAMPLER` would set it, which the code's ratio beats. A saga left out costs
    /// its engine what it costs with export off: none of its spans reaches the exporter.
    pub fn sample_ratio(mut self, ratio: f64) -> Self {
        self.sample_ratio = Some(ratio);
        self
    }

    /// Trusts this CA (PEM) as well as the system's roots for an `https://` collector: a
    /// collector behind a company's own CA.
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certificate_pem = Some(pem.into());
        self
    }

    /// The endpoint spans go to: the code's, else the variables' (the traces' own first).
    fn effective_endpoint(&self) -> Option<String> {
        let variable = |name| std::env::var(name).ok().filter(|value: &String| !value.is_empty());
        self.endpoint
            .clone()
            .or_else(|| variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| variable("OTEL_EXPORTER_OTLP_ENDPOINT"))
    }

    /// Builds the exporter and installs the trace hooks: export is on.
    pub fn build(self) -> Result<Otlp, TelemetryError> {
        if let Some(ratio) = self.sample_ratio.filter(|ratio| !(0.0..=1.0).contains(ratio)) {
            return Err(TelemetryError::SampleRatio(ratio));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hodei-otlp")
            .enable_all()
            .build()
            .map_err(TelemetryError::Runtime)?;
        // tonic's channel starts its connection task on the runtime current at build time.
        let exporter = {
            let _entered = runtime.enter();
            let https =
                self.effective_endpoint().is_some_and(|e| e.to_ascii_lowercase().starts_with("https://"));
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            let builder = match self.endpoint {
                Some(endpoint) => builder.with_endpoint(endpoint),
                None => builder,
            };
            // Left alone, an `https://` endpoint gets a TLS config with no roots at all, and
            // every handshake fails.
            let builder = match https {
                true => {
                    let tls = ClientTlsConfig::new().with_native_roots();
                    let tls = match &self.ca_certificate_pem {
                        Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                        None => tls,
                    };
                    builder.with_tls_config(tls)
                }
                false => builder,
            };
            builder.build().map_err(|e| TelemetryError::Exporter(e.to_string()))?
        };
        // `OTEL_SERVICE_NAME` (read by the default detectors) beats the code's name.
        let resource = match std::env::var_os("OTEL_SERVICE_NAME") {
            Some(_) => Resource::builder().build(),
            None => Resource::builder().with_service_name(self.service_name).build(),
        };
        // The default reads the `OTEL_BSP_*` variables; the code's queue size beats them.
        let config = match self.max_queue_size {
            Some(spans) => BatchConfigBuilder::default().with_max_queue_size(spans),
            None => BatchConfigBuilder::default(),
        };
        let mut batch = BatchSpanProcessor::builder(exporter).with_batch_config(config.build()).build();
        batch.set_resource(&resource);
        let processor = Arc::new(SharedProcessor(Arc::new(batch)));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(SharedProcessor::clone(&processor))
            .with_resource(resource);
        // Unset, the provider reads `OTEL_TRACES_SAMPLER` (parent-based, always on, by default).
        let root_sampler = self.sample_ratio.map(Sampler::TraceIdRatioBased);
        let provider = match &root_sampler {
            Some(root) => {
                provider.with_sampler(HeadSampler { inner: Sampler::ParentBased(Box::new(root.clone())) })
            }
            None => provider,
        }
        .build();
        if !trace::install(Box::new(OtelBridge { processor, root_sampler })) {
            let _ = provider.shutdown();
            runtime.shutdown_background();
            return Err(TelemetryError::AlreadyInstalled);
        }
        let tracer = provider.tracer("hodei");
        Ok(Otlp { provider, tracer, runtime: Some(runtime) })
    }
}

impl Otlp {
    /// A builder for the service `service_name` (unless `OTEL_SERVICE_NAME` says otherwise).
    pub fn builder(service_name: impl Into<String>) -> OtlpBuilder {
        OtlpBuilder {
            service_name: service_name.into(),
            endpoint: None,
            max_queue_size: None,
            ca_certificate_pem: None,
            sample_ratio: None,
        }
    }

    /// An exporter configured by the `OTEL_EXPORTER_OTLP_*` variables alone.
    pub fn from_env(service_name: impl Into<String>) -> Result<Self, TelemetryError> {
        Self::builder(service_name).build()
    }

    /// The layer that turns `tracing` spans into exported ones: add it to your subscriber.
    /// It exports spans (and the events in them) at `INFO` and above, which Hodei's are; the
    /// `DEBUG` and `TRACE` spans of the exporter's own transport (h2, tonic) would otherwise
    /// be exported too, each export making more. While export is off
    /// ([`set_export`](Self::set_export)) it lets everything pass by.
    pub fn layer<S>(&self) -> impl Layer<S> + 'static
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            // Per span, these would add busy and idle times (two clock reads at every poll of
            // an instrumented future), the thread, the source location and the module: eight
            // attributes a span that the engine's own `hodei.*` ones make redundant, each
            // encoded, sent and decoded again by the collector.
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            // Activation makes a span's context OpenTelemetry's current one at every poll, for
            // instrumentation that reads it; nothing in a Hodei process does (the trace hooks
            // read a span's context from the span), and it cost a fifth of the engine's share.
            .with_context_activation(false)
            .with_filter(ExportSwitch)
    }

    /// Turns export (and trace context propagation) on or off, for a comparison in one process
    /// as the overhead benchmark makes. On from [`build`](OtlpBuilder::build).
    pub fn set_export(&self, on: bool) {
        trace::set_on(on);
    }

    /// Sends every span ended so far, and waits for the collector's answer.
    pub async fn flush(&self) -> Result<(), TelemetryError> {
        let provider = self.provider.clone();
        self.blocking(move || provider.force_flush()).await
    }

    /// Flushes, then stops exporting for good.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        trace::set_on(false);
        let provider = self.provider.clone();
        let done = self.blocking(move || provider.shutdown()).await;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        done
    }

    /// Runs a blocking call of the provider on the exporter's own runtime, whose gRPC client
    /// it waits for: never on the caller's, which may have a single thread.
    async fn blocking(
        &self,
        call: impl FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send + 'static,
    ) -> Result<(), TelemetryError> {
        let Some(runtime) = &self.runtime else { return Ok(()) };
        match runtime.spawn_blocking(call).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TelemetryError::Flush(e.to_string())),
            Err(e) => Err(TelemetryError::Flush(e.to_string())),
        }
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            trace::set_on(false);
            // Spans ended so far still go out; the wait runs on the exporter's own thread.
            let provider = self.provider.clone();
            let _ = std::thread::spawn(move || provider.shutdown()).join();
            runtime.shutdown_background();
        }
    }
}

/// Exports to the collector the `OTEL_EXPORTER_OTLP_*` variables name and installs a global
/// subscriber: `RUST_LOG` (default `info`) to stderr as text, and every span to the exporter.
/// Keep the returned [`Otlp`] alive, and [`shutdown`](Otlp::shutdown) it before exiting.
pub fn init_otlp(service_name: impl Into<String>) -> Result<Otlp, TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    let otlp = Otlp::from_env(service_name)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::registry()
        .with(otlp.layer())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter));
    tracing::subscriber::set_global_default(subscriber).map_err(|_| TelemetryError::SubscriberSet)?;
    Ok(otlp)
}

/// Export's on/off switch as the layer's filter, which also turns away the spans of a saga
/// whose trace is not sampled (see `trace::Unsampled`). It decides for each span as it starts and
/// never lets a callsite's interest be cached as "never": a span first met while export is off
/// must still be exported once it is on (a `filter_fn` is cached at the callsite, and the
/// overhead bench, which turns export off and on, lost every step span to it).
struct ExportSwitch;

impl<S: tracing::Subscriber> tracing_subscriber::layer::Filter<S> for ExportSwitch {
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        trace::is_on() && *metadata.level() <= tracing::Level::INFO && !trace::sampled_out()
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if *metadata.level() <= tracing::Level::INFO {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::INFO)
    }
}
