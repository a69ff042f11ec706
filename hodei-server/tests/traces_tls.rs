//! Spans exported to an `https://` collector: TLS, with the collector's certificate checked
//! against a CA the code trusts (`OtlpBuilder::ca_certificate_pem`) besides the system's
//! roots. A test binary of its own: the exporter and the global subscriber are one per process.

#[path = "support/otlp_collector.rs"]
mod otlp_collector;

use std::time::Duration;

use hodei_core::telemetry::Otlp;
use tonic::transport::{Identity, ServerTlsConfig};
use tracing_subscriber::layer::SubscriberExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_whose_certificate_a_trusted_ca_signed() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (certified.cert.pem(), certified.signing_key.serialize_pem());
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(&cert_pem, &key_pem));
    let (received, port) = otlp_collector::start(Some(tls));
    let otlp = Otlp::builder("hodei-tls-test")
        .endpoint(format!("https://localhost:{port}"))
        .ca_certificate_pem(cert_pem.clone())
        .build()
        .unwrap();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otlp.layer())).unwrap();

    drop(tracing::info_span!("over-tls").entered());
    tokio::time::timeout(Duration::from_secs(60), otlp.flush()).await.unwrap().unwrap();
    let names: Vec<String> = received.0.lock().unwrap().iter().map(|span| span.name.clone()).collect();
    assert_eq!(names, ["over-tls"]);
}
