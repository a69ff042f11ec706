//! What the Kubernetes provider adds to the API requests it makes, in the same run.
//!
//! - provision: `KubernetesProvider::provision` until it returns, against a fake API server on
//!   loopback that answers at once: create the CA ConfigMap, create the Pod, watch it until a
//!   MODIFIED event says its agent's container runs;
//! - the limit: the same three requests (the very bytes the provider sent, captured by the fake)
//!   through the same `kube::Client`, raw: `Client::request_text`, no typed objects.
//!
//! The same pair for `destroy` (delete the pod, watch until DELETED, delete the ConfigMap).
//! Runs alternate, so that both see the same load. Prints the medians and their ratio.
//!
//! The fake is a plain HTTP/1.1 responder on loopback rather than kube's `tower-test` mock (a
//! dev-dependency of hodei-providers only): both sides pay the same transport, so the ratio is
//! the provider's own work. Real figures (scheduling, image pull, container start) need a real
//! cluster: `HODEI_K8S_HUB_HOST=<ip> cargo test -p hodei-providers --features kubernetes --test
//! kubernetes -- --ignored --nocapture real_cluster_end_to_end` prints them.
//!
//! `cargo bench --bench kubernetes --features kubernetes`. `HODEI_BENCH_SCALE` multiplies the
//! 300 runs of each (at least 1).

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hodei_providers::kubernetes::kube::api::{DeleteParams, PostParams, PropagationPolicy, WatchParams};
use hodei_providers::kubernetes::kube::core::Request;
use hodei_providers::kubernetes::kube::{self, Config};
use hodei_providers::kubernetes::{KubernetesConfig, KubernetesProvider};
use hodei_providers::{AgentEnv, Provider, WorkerSpec};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const RUNS: usize = 300;
const NAMESPACE: &str = "bench";
const WORKER: &str = "bench-1";
const POD: &str = "hodei-bench-1";

/// What the fake saw last: the provider's request bodies, which the raw runs replay and the
/// watch answers echo.
#[derive(Default)]
struct Seen {
    config_map: Vec<u8>,
    pod: Vec<u8>,
}

/// One HTTP/1.1 request off a kept-alive connection: method, target, body.
async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).await.ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.ok()?;
    Some((method, target, body))
}

/// `object` (a JSON object) with `"resourceVersion"` set in its metadata and, when given, a
/// status: the API server's answer to a create, or the object of a watch event.
fn as_stored(object: &[u8], version: &str, status: Option<&str>) -> String {
    let text = String::from_utf8_lossy(object);
    let mut stored =
        text.replacen("\"metadata\":{", &format!("\"metadata\":{{\"resourceVersion\":\"{version}\","), 1);
    if let Some(status) = status {
        stored.pop();
        stored.push_str(&format!(",\"status\":{status}}}"));
    }
    stored
}

const RUNNING: &str = r#"{"phase":"Running","containerStatuses":[{"name":"agent","image":"hodei-agent:test","imageID":"","ready":true,"restartCount":0,"state":{"running":{"startedAt":"2026-12-01T10:00:03Z"}}}]}"#;

fn answer(method: &str, target: &str, body: &[u8], seen: &Mutex<Seen>) -> String {
    let path = target.split('?').next().unwrap_or_default();
    let pods = format!("/api/v1/namespaces/{NAMESPACE}/pods");
    let config_maps = format!("/api/v1/namespaces/{NAMESPACE}/configmaps");
    let mut seen = seen.lock().unwrap();
    match method {
        "POST" if path == config_maps => {
            seen.config_map = body.to_vec();
            as_stored(body, "100", None)
        }
        "POST" if path == pods => {
            seen.pod = body.to_vec();
            as_stored(body, "101", Some(r#"{"phase":"Pending"}"#))
        }
        "GET" if path == pods && target.contains("watch=true") && target.contains("resourceVersion=101") => {
            format!("{{\"type\":\"MODIFIED\",\"object\":{}}}\n", as_stored(&seen.pod, "102", Some(RUNNING)))
        }
        "DELETE" if path == format!("{pods}/{POD}") => {
            let terminating = as_stored(&seen.pod, "700", Some(RUNNING));
            terminating.replacen(
                "\"metadata\":{",
                "\"metadata\":{\"deletionTimestamp\":\"2026-12-01T10:05:00Z\",",
                1,
            )
        }
        "GET" if path == pods && target.contains("watch=true") && target.contains("resourceVersion=700") => {
            format!("{{\"type\":\"DELETED\",\"object\":{}}}\n", as_stored(&seen.pod, "701", Some(RUNNING)))
        }
        "DELETE" if path.starts_with(&config_maps) => {
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Success"}"#.to_owned()
        }
        _ => panic!("the bench's fake does not know {method} {target}"),
    }
}

async fn serve(listener: TcpListener, seen: Arc<Mutex<Seen>>) {
    loop {
        let (stream, _) = listener.accept().await.expect("accepted");
        let seen = seen.clone();
        // One write per answer, without Nagle: else the client's delayed ACK (40 ms) would be
        // what is measured.
        stream.set_nodelay(true).expect("nodelay");
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            while let Some((method, target, body)) = read_request(&mut reader).await {
                let reply = answer(&method, &target, &body, &seen);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                reader.get_mut().write_all(response.as_bytes()).await.expect("written");
            }
        });
    }
}

fn spec() -> WorkerSpec {
    let agent = AgentEnv::new(
        "10.0.0.1:7001",
        "10.0.0.1:7002",
        "tok-bench",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    WorkerSpec::new(WORKER, agent)
}

/// The provision's three requests, raw, with the bodies the provider sent.
async fn raw_provision(client: &kube::Client, seen: &Mutex<Seen>) {
    let (config_map, pod) = {
        let seen = seen.lock().unwrap();
        (seen.config_map.clone(), seen.pod.clone())
    };
    let params = PostParams::default();
    let config_maps = Request::new(format!("/api/v1/namespaces/{NAMESPACE}/configmaps"));
    let pods = Request::new(format!("/api/v1/namespaces/{NAMESPACE}/pods"));
    client.request_text(config_maps.create(&params, config_map).unwrap()).await.expect("created");
    client.request_text(pods.create(&params, pod).unwrap()).await.expect("created");
    let watch = WatchParams::default().fields(&format!("metadata.name={POD}")).timeout(290);
    let events = client.request_text(pods.watch(&watch, "101").unwrap()).await.expect("watched");
    assert!(events.contains("\"running\""), "{events}");
}

/// The destroy's three requests, raw.
async fn raw_destroy(client: &kube::Client) {
    let params = DeleteParams {
        grace_period_seconds: Some(10),
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    let pods = Request::new(format!("/api/v1/namespaces/{NAMESPACE}/pods"));
    let config_maps = Request::new(format!("/api/v1/namespaces/{NAMESPACE}/configmaps"));
    client.request_text(pods.delete(POD, &params).unwrap()).await.expect("deleted");
    let watch = WatchParams::default().fields(&format!("metadata.name={POD}")).timeout(290);
    let events = client.request_text(pods.watch(&watch, "700").unwrap()).await.expect("watched");
    assert!(events.contains("DELETED"), "{events}");
    client
        .request_text(config_maps.delete(&format!("{POD}-ca"), &DeleteParams::default()).unwrap())
        .await
        .expect("deleted");
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn timed(future: impl Future<Output = ()>) -> Duration {
    let started = Instant::now();
    future.await;
    started.elapsed()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bound");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(serve(listener, seen.clone()));
    let client = kube::Client::try_from(Config::new(url.parse().unwrap())).expect("a client");
    let provider = KubernetesProvider::new(client.clone(), KubernetesConfig::default().namespace(NAMESPACE));
    let spec = spec();

    // Warm up the connection, and capture the provider's bodies for the raw runs.
    provider.provision(&spec).await.expect("provisioned");
    provider.destroy(WORKER).await.expect("destroyed");

    let (mut provisions, mut raw_provisions, mut destroys, mut raw_destroys) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let runs = common::scaled(RUNS);
    for _ in 0..runs {
        provisions
            .push(timed(async { provider.provision(&spec).await.map(drop).expect("provisioned") }).await);
        raw_provisions.push(timed(raw_provision(&client, &seen)).await);
        destroys.push(timed(async { provider.destroy(WORKER).await.expect("destroyed") }).await);
        raw_destroys.push(timed(raw_destroy(&client)).await);
    }
    for (what, provider_runs, raw_runs) in
        [("provision", provisions, raw_provisions), ("destroy", destroys, raw_destroys)]
    {
        let (provider_median, raw_median) = (median(provider_runs), median(raw_runs));
        println!(
            "{what}: provider median {:.0} us, the same 3 requests raw {:.0} us, ratio {:.2}x ({runs} runs each)",
            us(provider_median),
            us(raw_median),
            provider_median.as_secs_f64() / raw_median.as_secs_f64()
        );
    }
}
