//! A fake Firecracker VMM for tests: its API on a Unix socket, checking every request against
//! Firecracker's own swagger spec (`firecracker-api.yaml`) and answering as the spec and the
//! real VMM do: 204 for an accepted PUT, 400 with `{"fault_message": ...}` otherwise.
//!
//! Beyond the schema, it keeps the few pieces of state the real VMM enforces on a boot
//! sequence: pre-boot calls are refused once started, `InstanceStart` needs a boot source,
//! MMDS may only name attached interfaces, and Ctrl-Alt-Del needs a started guest.

#![allow(dead_code)] // Each test binary that mounts this uses a different part of it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::watch;
use yaml_rust2::{Yaml, YamlLoader};

/// Firecracker's API, as its swagger spec describes it.
#[derive(Debug)]
pub struct ApiSpec {
    root: Yaml,
}

/// An operation of the spec a request matched.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub method: String,
    /// The spec's path template, e.g. `/drives/{drive_id}`.
    pub template: String,
    pub path: String,
    pub body: Option<Value>,
}

impl ApiSpec {
    /// The spec at `HODEI_FC_API_SPEC`, else the copy of Firecracker's own swagger file kept
    /// beside this module (in the repository, so that any checkout can run the tests).
    pub fn load() -> Self {
        let path = std::env::var_os("HODEI_FC_API_SPEC").map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/firecracker_support/firecracker-api.yaml")
        });
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("the Firecracker API spec {}: {e}", path.display()));
        let mut documents = YamlLoader::load_from_str(&text).expect("the Firecracker API spec is YAML");
        assert!(!documents.is_empty(), "the Firecracker API spec is empty");
        Self { root: documents.swap_remove(0) }
    }

    /// Checks a request; `Err` holds the fault message the VMM answers with.
    pub fn check(&self, method: &str, path: &str, body: &[u8]) -> Result<Operation, String> {
        let invalid_route = || format!("Invalid request method and/or path: {method} {path}.");
        let (template, params) = self.route(path).ok_or_else(invalid_route)?;
        let operation = &self.root["paths"][template.as_str()][method.to_ascii_lowercase().as_str()];
        if operation.is_badvalue() {
            return Err(invalid_route());
        }
        let parameters = operation["parameters"].as_vec().cloned().unwrap_or_default();
        let body_parameter = parameters.iter().find(|p| p["in"].as_str() == Some("body"));
        let body = match body_parameter {
            None if body.is_empty() => None,
            None => return Err(format!("{method} {path} takes no body.")),
            Some(parameter) if body.is_empty() => {
                if parameter["required"].as_bool() == Some(true) {
                    return Err("The body of the request is missing.".to_owned());
                }
                None
            }
            Some(parameter) => {
                let value: Value =
                    serde_json::from_slice(body).map_err(|e| deserialize_fault(&e.to_string()))?;
                self.validate(&parameter["schema"], &value, "body").map_err(|e| deserialize_fault(&e))?;
                Some(value)
            }
        };
        // The VMM refuses a body whose id disagrees with the path's.
        for (name, value) in &params {
            if let Some(in_body) = body.as_ref().and_then(|b| b.get(name)).and_then(Value::as_str)
                && in_body != value
            {
                return Err(format!(
                    "The id from the path [{value}] does not match the id from the body [{in_body}]!"
                ));
            }
        }
        Ok(Operation { method: method.to_owned(), template, path: path.to_owned(), body })
    }

    /// Whether the spec has `method` on the path template `template`.
    pub fn has_operation(&self, method: &str, template: &str) -> bool {
        !self.root["paths"][template][method.to_ascii_lowercase().as_str()].is_badvalue()
    }

    /// The path template matching `path`, with its path parameters.
    fn route(&self, path: &str) -> Option<(String, Vec<(String, String)>)> {
        let segments: Vec<&str> = path.split('/').collect();
        let templates = self.root["paths"].as_hash()?;
        templates.keys().filter_map(Yaml::as_str).find_map(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut params = Vec::new();
            for (part, segment) in parts.iter().zip(&segments) {
                match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(name) if !segment.is_empty() => {
                        params.push((name.to_owned(), (*segment).to_owned()))
                    }
                    Some(_) => return None,
                    None if part == segment => {}
                    None => return None,
                }
            }
            Some((template.to_owned(), params))
        })
    }

    fn resolve<'a>(&'a self, schema: &'a Yaml) -> &'a Yaml {
        match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/definitions/")) {
            Some(name) => self.resolve(&self.root["definitions"][name]),
            None => schema,
        }
    }

    /// Validates `value` against `schema` (types, required fields, enums, bounds); fields the
    /// schema does not list are refused unless it allows additional properties, as the VMM's
    /// deserializers (`deny_unknown_fields`) do.
    fn validate(&self, schema: &Yaml, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if let Some(allowed) = schema["enum"].as_vec() {
            let ok = allowed.iter().any(|a| yaml_scalar_eq(a, value));
            if !ok {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        match schema["type"].as_str() {
            Some("object") => {
                let Value::Object(fields) = value else { return Err(format!("{at}: expected an object")) };
                for required in schema["required"].as_vec().into_iter().flatten().filter_map(Yaml::as_str) {
                    if !fields.contains_key(required) {
                        return Err(format!("missing field `{required}` in {at}"));
                    }
                }
                for (name, field) in fields {
                    let property = &schema["properties"][name.as_str()];
                    let at = format!("{at}.{name}");
                    if !property.is_badvalue() {
                        self.validate(property, field, &at)?;
                        continue;
                    }
                    match &schema["additionalProperties"] {
                        Yaml::Boolean(true) => {}
                        additional @ Yaml::Hash(_) => self.validate(additional, field, &at)?,
                        _ => return Err(format!("unknown field `{name}` in {at}")),
                    }
                }
                Ok(())
            }
            Some("integer") => {
                let Some(number) = value.as_i64() else { return Err(format!("{at}: expected an integer")) };
                if let Some(minimum) = schema["minimum"].as_i64()
                    && number < minimum
                {
                    return Err(format!("{at}: {number} is below the minimum of {minimum}"));
                }
                if let Some(maximum) = schema["maximum"].as_i64()
                    && number > maximum
                {
                    return Err(format!("{at}: {number} is above the maximum of {maximum}"));
                }
                Ok(())
            }
            Some("string") if !value.is_string() => Err(format!("{at}: expected a string")),
            Some("boolean") if !value.is_boolean() => Err(format!("{at}: expected a boolean")),
            Some("array") => {
                let Value::Array(items) = value else { return Err(format!("{at}: expected an array")) };
                for (index, item) in items.iter().enumerate() {
                    self.validate(&schema["items"], item, &format!("{at}[{index}]"))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn yaml_scalar_eq(yaml: &Yaml, value: &Value) -> bool {
    match (yaml, value) {
        (Yaml::String(a), Value::String(b)) => a == b,
        (Yaml::Integer(a), Value::Number(b)) => b.as_i64() == Some(*a),
        (Yaml::Boolean(a), Value::Bool(b)) => a == b,
        // YAML reads an unquoted `2M` or `None` as a string already; anything else is a miss.
        _ => false,
    }
}

fn deserialize_fault(detail: &str) -> String {
    format!("An error occurred when deserializing the json body of a request: {detail}.")
}

/// How the fake behaves beyond the spec.
#[derive(Clone, Debug, Default)]
pub struct FakeOptions {
    /// Accept Ctrl-Alt-Del but keep running, like a guest without a keyboard driver.
    pub ignore_ctrl_alt_del: bool,
    /// Append every request, as a JSON line, to this file before answering it.
    pub log: Option<PathBuf>,
}

/// One request the fake answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Option<Value>,
    pub status: u16,
}

impl Recorded {
    pub fn from_json(line: &str) -> Self {
        let value: Value = serde_json::from_str(line).expect("a JSON request log line");
        Self {
            method: value["method"].as_str().expect("method").to_owned(),
            path: value["path"].as_str().expect("path").to_owned(),
            body: (!value["body"].is_null()).then(|| value["body"].clone()),
            status: u16::try_from(value["status"].as_u64().expect("status")).expect("a status"),
        }
    }

    fn is_accepted_ctrl_alt_del(&self) -> bool {
        self.path == "/actions"
            && self.status == 204
            && self.body.as_ref().and_then(|b| b["action_type"].as_str()) == Some("SendCtrlAltDel")
    }

    fn to_json(&self) -> String {
        serde_json::json!({ "method": self.method, "path": self.path, "body": self.body, "status": self.status })
            .to_string()
    }
}

#[derive(Debug, Default)]
struct VmState {
    started: bool,
    boot_source: bool,
    interfaces: BTreeSet<String>,
}

/// A running fake VMM.
#[derive(Debug)]
pub struct FakeFirecracker {
    pub socket: PathBuf,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Turns true once the guest was asked to shut down (and `ignore_ctrl_alt_del` is off).
    pub shutdown: watch::Receiver<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeFirecracker {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeFirecracker {
    /// Serves the fake API on `socket`.
    pub fn serve(socket: &Path, options: FakeOptions) -> std::io::Result<Self> {
        let listener = UnixListener::bind(socket)?;
        let spec = Arc::new(ApiSpec::load());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(VmState::default()));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let shutdown_tx = Arc::new(shutdown_tx);
        let shared = (requests.clone(), options);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (spec, state, shutdown_tx) = (spec.clone(), state.clone(), shutdown_tx.clone());
                let (requests, options) = (shared.0.clone(), shared.1.clone());
                // The real VMM exits some time after it answered; the fake waits until the
                // caller hung up, so that the 204 surely reached it.
                let asked_to_stop = Arc::new(AtomicBool::new(false));
                let stop_flag = asked_to_stop.clone();
                let ignore_ctrl_alt_del = options.ignore_ctrl_alt_del;
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let context = (spec.clone(), state.clone(), requests.clone(), options.log.clone());
                        let stop_flag = stop_flag.clone();
                        async move {
                            let (spec, state, requests, log) = context;
                            let (recorded, response) = answer(&spec, &state, request).await;
                            if let Some(log) = &log {
                                append_line(log, &recorded.to_json());
                            }
                            if recorded.is_accepted_ctrl_alt_del() {
                                stop_flag.store(true, Ordering::SeqCst);
                            }
                            requests.lock().expect("requests").push(recorded);
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if asked_to_stop.load(Ordering::SeqCst) && !ignore_ctrl_alt_del {
                        shutdown_tx.send_replace(true);
                    }
                });
            }
        });
        Ok(Self { socket: socket.to_owned(), requests, shutdown, server })
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("requests").clone()
    }
}

fn append_line(path: &Path, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("the request log");
    writeln!(file, "{line}").expect("the request log");
}

async fn answer(
    spec: &ApiSpec,
    state: &Mutex<VmState>,
    request: Request<Incoming>,
) -> (Recorded, Response<Full<Bytes>>) {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return reply(method, path, None, Err(e.to_string())),
    };
    let outcome = spec.check(&method, &path, &body).and_then(|operation| {
        let result = apply(&mut state.lock().expect("vm state"), &operation);
        result.map(|info| (operation, info))
    });
    match outcome {
        Ok((operation, info)) => reply(method, path, operation.body, Ok(info)),
        Err(fault) => {
            let body = serde_json::from_slice(&body).ok();
            reply(method, path, body, Err(fault))
        }
    }
}

/// The VMM's own rules on the order of calls, beyond the schema.
fn apply(state: &mut VmState, operation: &Operation) -> Result<Option<Value>, String> {
    const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
    let pre_boot_only =
        ["/machine-config", "/boot-source", "/drives/{drive_id}", "/network-interfaces/{iface_id}"];
    let body = operation.body.clone().unwrap_or(Value::Null);
    match (operation.method.as_str(), operation.template.as_str()) {
        ("GET", "/") => {
            let status = if state.started { "Running" } else { "Not started" };
            return Ok(Some(serde_json::json!({
                "app_name": "Firecracker", "id": "anonymous-instance", "state": status, "vmm_version": "1.17.0-dev"
            })));
        }
        ("PUT", template)
            if state.started && (pre_boot_only.contains(&template) || template == "/mmds/config") =>
        {
            return Err(AFTER_START.to_owned());
        }
        _ => {}
    }
    match operation.template.as_str() {
        "/boot-source" => state.boot_source = true,
        "/network-interfaces/{iface_id}" => {
            state.interfaces.insert(body["iface_id"].as_str().unwrap_or_default().to_owned());
        }
        "/mmds/config" => {
            let named: Vec<&str> = body["network_interfaces"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if named.is_empty() {
                return Err(
                    "The list of network interface IDs that allow forwarding MMDS requests is empty.".into(),
                );
            }
            if named.iter().any(|id| !state.interfaces.contains(*id)) {
                return Err(
                    "The list of network interface IDs provided contains at least one ID that does not \
                            correspond to any existing network interface."
                        .into(),
                );
            }
        }
        "/actions" => match body["action_type"].as_str() {
            Some("InstanceStart") if state.started => return Err(AFTER_START.to_owned()),
            Some("InstanceStart") if !state.boot_source => {
                return Err("Cannot start microvm without kernel configuration.".to_owned());
            }
            Some("InstanceStart") => state.started = true,
            Some("SendCtrlAltDel") if !state.started => {
                return Err(
                    "The requested operation is not supported before starting the microVM.".to_owned()
                );
            }
            _ => {}
        },
        _ => {}
    }
    Ok(None)
}

fn reply(
    method: String,
    path: String,
    body: Option<Value>,
    outcome: Result<Option<Value>, String>,
) -> (Recorded, Response<Full<Bytes>>) {
    let (status, payload) = match outcome {
        Ok(None) => (StatusCode::NO_CONTENT, Vec::new()),
        Ok(Some(json)) => (StatusCode::OK, json.to_string().into_bytes()),
        Err(fault) => {
            (StatusCode::BAD_REQUEST, serde_json::json!({ "fault_message": fault }).to_string().into_bytes())
        }
    };
    let mut builder = Response::builder().status(status);
    if !payload.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    let response = builder.body(Full::new(Bytes::from(payload))).expect("a response");
    (Recorded { method, path, body, status: status.as_u16() }, response)
}
