//! The examples' logs: `HODEI_LOG_FORMAT=json` for JSON lines, text otherwise, to stderr and
//! filtered by `RUST_LOG` (default `info`). A JSON line inside a step lists its spans, so it
//! names the saga (`hodei.saga.id`), the step (`hodei.step.name`) and, while traces are
//! exported, the trace (`trace_id`). Built with the `otel` feature and given
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, the examples also export their spans over OTLP.

// Each example and test uses its own part of this.
#![allow(dead_code)]

use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;

/// One JSON object per line, with the fields of every span the line is in.
pub fn json_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true)
        .with_writer(writer)
}

/// What to keep until the example exits: the exporter, if spans are exported.
pub struct Logging {
    #[cfg(feature = "otel")]
    otlp: Option<hodei::telemetry::Otlp>,
}

impl Logging {
    /// Sends what is left to the collector, if spans are exported.
    pub async fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(otlp) = self.otlp
            && let Err(e) = otlp.shutdown().await
        {
            eprintln!("traces: {e}");
        }
    }
}

/// Installs the global subscriber for `service`.
pub fn init(service: &str) -> Result<Logging, String> {
    let json = match std::env::var("HODEI_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => return Err(format!("HODEI_LOG_FORMAT={other}: use json or text")),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    #[cfg(feature = "otel")]
    let otlp = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(_) => Some(hodei::telemetry::Otlp::from_env(service).map_err(|e| e.to_string())?),
        None => None,
    };
    #[cfg(not(feature = "otel"))]
    let _ = service;
    let registry = tracing_subscriber::registry();
    #[cfg(feature = "otel")]
    let registry = registry.with(otlp.as_ref().map(|otlp| otlp.layer()));
    let logs = if json {
        json_layer(std::io::stderr).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed()
    };
    tracing::subscriber::set_global_default(registry.with(logs.with_filter(filter)))
        .map_err(|e| e.to_string())?;
    Ok(Logging {
        #[cfg(feature = "otel")]
        otlp,
    })
}
