//! A fake Kubernetes API server on kube's `tower-test` mock service: each test scripts the
//! exact requests it expects and answers each with JSON shaped like the real API server's.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use hodei_providers::AgentEnv;
use hodei_providers::kubernetes::kube;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// The namespace every scripted test uses.
pub const NAMESPACE: &str = "ci";
/// The hang guard on every wait for a request or an answer.
pub const LIMIT: Duration = Duration::from_secs(60);
/// The agent image of the Docker work, which the real-cluster test starts.
pub const AGENT_IMAGE: &str = "hodei-agent:test";

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A kube client whose every request reaches the returned fake server.
pub fn fake_cluster() -> (kube::Client, FakeApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), FakeApiServer { handle })
}

/// The server side of the mock: requests in order, each answered by the test.
pub struct FakeApiServer {
    handle: Handle,
}

/// One request received: its query and JSON body, and the way to answer it.
pub struct Exchange {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Value,
    respond: tower_test::mock::SendResponse<Response<Body>>,
}

impl FakeApiServer {
    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Exchange {
        let next = tokio::time::timeout(LIMIT, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"));
        let (request, respond) =
            next.unwrap_or_else(|| panic!("the client hung up; expected {method} {path}"));
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("the request body is readable");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request bodies are JSON")
        };
        let exchange = Exchange {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(parse_query).unwrap_or_default(),
            body,
            respond,
        };
        assert_eq!(
            (&exchange.method, exchange.path.as_str()),
            (&method, path),
            "unexpected request (query {:?})",
            exchange.query
        );
        exchange
    }

    /// Asserts that the client sends nothing more: every clone of it has been dropped.
    pub async fn expect_no_more(mut self) {
        let next = tokio::time::timeout(LIMIT, self.handle.next_request())
            .await
            .expect("the client is still alive: drop the provider first");
        if let Some((request, _)) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }

    /// Answers the destroy sequence of `worker`'s pod: the delete (answered with the pod,
    /// marked for deletion), the watch from its version until a DELETED event, then the
    /// ConfigMap's delete. Returns the pod delete's body.
    pub async fn answer_destroy(&mut self, worker_pod: &str) -> Value {
        let delete = self.expect(Method::DELETE, &pod_path(worker_pod)).await;
        let body = delete.body.clone();
        let terminating = terminating(pod(worker_pod, "700", running()));
        delete.reply(200, terminating.clone());
        let watch = self.expect(Method::GET, &pods_path()).await;
        assert_watch_of(&watch, worker_pod, "700");
        let mut stopped = terminating.clone();
        stopped["metadata"]["resourceVersion"] = json!("701");
        stopped["status"]["phase"] = json!("Failed");
        watch.reply_events(&[("MODIFIED", stopped.clone()), ("DELETED", stopped)]);
        self.expect(Method::DELETE, &config_map_path(&format!("{worker_pod}-ca")))
            .await
            .reply(200, success_status(&format!("{worker_pod}-ca"), "configmaps"));
        body
    }

    /// Answers the creation of `worker_pod`'s ConfigMap and pod, then one watch of it from the
    /// created version with `events`. Returns the ConfigMap's and the pod's bodies.
    pub async fn answer_start(&mut self, worker_pod: &str, events: Vec<(&str, Value)>) -> (Value, Value) {
        let bodies = self.answer_creates().await;
        let watch = self.expect(Method::GET, &pods_path()).await;
        assert_watch_of(&watch, worker_pod, "101");
        watch.reply_events(&events);
        bodies
    }

    /// Answers the creation of a ConfigMap (version 100) and a pod (version 101). Returns their
    /// bodies.
    pub async fn answer_creates(&mut self) -> (Value, Value) {
        let config_map = self.expect(Method::POST, &config_maps_path()).await;
        let config_map_body = config_map.body.clone();
        config_map.reply(201, created(config_map_body.clone(), "100"));
        let pod = self.expect(Method::POST, &pods_path()).await;
        let pod_body = pod.body.clone();
        pod.reply(201, created(pod_body.clone(), "101"));
        (config_map_body, pod_body)
    }

    /// Answers the read of `worker_pod`'s output (the last 100 lines of its agent) with `text`.
    pub async fn answer_logs(&mut self, worker_pod: &str, text: &str) {
        let logs = self.expect(Method::GET, &format!("{}/log", pod_path(worker_pod))).await;
        assert_eq!(logs.query.get("container").map(String::as_str), Some("agent"));
        assert_eq!(logs.query.get("tailLines").map(String::as_str), Some("100"));
        logs.reply_text(text);
    }

    /// Answers a destroy of a worker whose pod and ConfigMap are already gone.
    pub async fn answer_destroy_of_missing(&mut self, worker_pod: &str) {
        self.expect(Method::DELETE, &pod_path(worker_pod)).await.reply(404, not_found(worker_pod, "pods"));
        let config_map = format!("{worker_pod}-ca");
        self.expect(Method::DELETE, &config_map_path(&config_map))
            .await
            .reply(404, not_found(&config_map, "configmaps"));
    }
}

impl Exchange {
    /// Answers with `status` and a JSON body.
    pub fn reply(self, status: u16, body: Value) {
        self.send(status, serde_json::to_vec(&body).unwrap());
    }

    /// Answers a watch: one JSON event per line, then the end of the stream, as the API server
    /// does when a watch's timeout ends it.
    pub fn reply_events(self, events: &[(&str, Value)]) {
        let mut body = Vec::new();
        for (kind, object) in events {
            body.extend(serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap());
            body.push(b'\n');
        }
        self.send(200, body);
    }

    /// Answers with plain text (pod logs).
    pub fn reply_text(self, text: &str) {
        let response = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain")
            .body(Body::from(text.as_bytes().to_vec()))
            .unwrap();
        self.respond.send_response(response);
    }

    fn send(self, status: u16, body: Vec<u8>) {
        let response = Response::builder()
            .status(StatusCode::from_u16(status).unwrap())
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        self.respond.send_response(response);
    }
}

/// `a=b&c=d`, percent-decoded.
fn parse_query(query: &str) -> BTreeMap<String, String> {
    fn decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                byte => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

pub fn pods_path() -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/pods")
}

pub fn pod_path(name: &str) -> String {
    format!("{}/{name}", pods_path())
}

pub fn config_maps_path() -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/configmaps")
}

pub fn config_map_path(name: &str) -> String {
    format!("{}/{name}", config_maps_path())
}

/// Asserts that `watch` watches the one pod `name` from `version`.
pub fn assert_watch_of(watch: &Exchange, name: &str, version: &str) {
    assert_eq!(watch.query.get("watch").map(String::as_str), Some("true"), "{:?}", watch.query);
    assert_eq!(
        watch.query.get("fieldSelector").map(String::as_str),
        Some(format!("metadata.name={name}").as_str())
    );
    assert_eq!(watch.query.get("resourceVersion").map(String::as_str), Some(version));
    let seconds: u32 = watch.query["timeoutSeconds"].parse().unwrap();
    assert!((1..=290).contains(&seconds), "watch timeout {seconds}");
}

/// A pod as the API server returns it, with `status`.
pub fn pod(name: &str, version: &str, status: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": format!("uid-{name}"),
            "resourceVersion": version,
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "labels": {"hodei.dev/managed-by": "hodei", "hodei.dev/worker-id": name.trim_start_matches("hodei-")},
        },
        "spec": {"containers": [{"name": "agent", "image": AGENT_IMAGE}], "restartPolicy": "Never"},
        "status": status,
    })
}

/// What the API server returns for a created pod: the body it was sent, with a uid, a version
/// and the status of a pod not scheduled yet.
pub fn created(mut body: Value, version: &str) -> Value {
    let metadata = body["metadata"].as_object_mut().unwrap();
    metadata.insert("uid".into(), json!("3f1c0a52-0b6e-4f0e-9d7a-1c2b3d4e5f60"));
    metadata.insert("resourceVersion".into(), json!(version));
    metadata.insert("creationTimestamp".into(), json!("2026-12-01T10:00:00Z"));
    if body["kind"] == "Pod" {
        body["status"] = json!({"phase": "Pending", "qosClass": "Guaranteed"});
    }
    body
}

/// Marked for deletion, as a delete's answer is.
pub fn terminating(mut pod: Value) -> Value {
    pod["metadata"]["deletionTimestamp"] = json!("2026-12-01T10:05:00Z");
    pod["metadata"]["deletionGracePeriodSeconds"] = json!(10);
    pod
}

/// A pod's status: scheduled, the agent's container in `state`.
pub fn scheduled_with(phase: &str, state: Value) -> Value {
    json!({
        "phase": phase,
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T10:00:01Z"}],
        "hostIP": "10.0.0.7",
        "containerStatuses": [{
            "name": "agent", "image": AGENT_IMAGE, "imageID": "", "ready": false, "restartCount": 0,
            "started": false, "state": state,
        }],
        "qosClass": "Guaranteed",
    })
}

pub fn running() -> Value {
    scheduled_with("Running", json!({"running": {"startedAt": "2026-12-01T10:00:03Z"}}))
}

pub fn waiting(reason: &str, message: &str) -> Value {
    scheduled_with("Pending", json!({"waiting": {"reason": reason, "message": message}}))
}

/// A `Status` object, as the API server answers a failed request.
pub fn failure_status(code: u16, reason: &str, message: &str, name: &str, kind: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": {"name": name, "kind": kind}, "code": code,
    })
}

pub fn not_found(name: &str, kind: &str) -> Value {
    failure_status(404, "NotFound", &format!("{kind} \"{name}\" not found"), name, kind)
}

pub fn success_status(name: &str, kind: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": {"name": name, "kind": kind, "uid": format!("uid-{name}")},
    })
}

/// A list, as `GET` on a collection answers.
pub fn list_of(kind: &str, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "900"}, "items": items})
}

/// An agent environment with a recognisable token and CA.
pub fn agent_env() -> AgentEnv {
    AgentEnv::new(
        "10.0.0.1:7001",
        "10.0.0.1:7002",
        "tok-ONE-TIME-5f2e",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
}
