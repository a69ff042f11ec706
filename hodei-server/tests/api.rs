//! The operator API over real HTTP on loopback: an engine on a sled directory, the API server
//! in front of it, requests from a real HTTP client.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use hodei_core::{Engine, Outcome, SagaId, SledStore};
use hodei_server::api::{ApiServeError, ApiServer, openapi_document};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::api::{ServedApi, code};
use support::sagas::{Deploy, flaky, gated, journaled, parent, signal_wait};
use support::within;
use tempfile::TempDir;

/// A server on its own directory, and the engine behind it.
struct Api {
    dir: TempDir,
    engine: Engine,
    served: ServedApi,
}

// The tests call the server as `api.get(...)`: the client's calls read as the API's.
impl std::ops::Deref for Api {
    type Target = ServedApi;

    fn deref(&self) -> &ServedApi {
        &self.served
    }
}

impl Api {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::open(dir).await
    }

    async fn open(dir: TempDir) -> Self {
        let engine = Engine::builder()
            .store(SledStore::open(dir.path().join("journal")).unwrap())
            .register(gated())
            .register(flaky())
            .register(parent())
            .start()
            .await
            .unwrap();
        let served = ServedApi::start(&engine, dir.path()).await;
        Self { dir, engine, served }
    }

    async fn restart(self) -> Self {
        let Self { dir, engine, served } = self;
        served.server.shutdown().await;
        engine.shutdown(std::time::Duration::from_secs(5)).await.unwrap();
        // Every handle on the store goes before it is opened again.
        drop(engine);
        Self::open(dir).await
    }

    async fn issue(&self, name: &str, role: &str) -> String {
        let (status, body) = self.post("/api/v1/tokens", json!({"name": name, "role": role})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["secret"].as_str().unwrap().to_owned()
    }

    async fn outcome(&self, id: &str) -> Outcome<String> {
        self.outcome_of(id).await
    }

    async fn outcome_of<O: serde::de::DeserializeOwned>(&self, id: &str) -> Outcome<O> {
        within(self.engine.handle(&SagaId::new(id).unwrap()).unwrap().outcome::<O>()).await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_run_is_started_approved_and_completes_with_the_approver_journaled() {
    let api = Api::start().await;
    let (status, body) = api.get("/api/v1/health").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));

    let start = json!({"definition": "gated", "id": "deploy-1", "input": {"service": "api"}});
    let (status, run) = api.post("/api/v1/runs", start.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{run}");
    assert_eq!(
        (run["id"].as_str(), run["definition"].as_str(), run["version"].as_u64()),
        (Some("deploy-1"), Some("gated"), Some(1))
    );
    // Idempotent: the same id and input is the same run; another input is a conflict.
    let (status, again) = api.post("/api/v1/runs", start).await;
    assert_eq!((status, again["id"].as_str()), (StatusCode::OK, Some("deploy-1")));
    let other = json!({"definition": "gated", "id": "deploy-1", "input": {"service": "web"}});
    let (status, body) = api.post("/api/v1/runs", other).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");

    // The run waits at its gate: its wait shows, with the staged step done.
    within(journaled(&api.engine, "deploy-1", signal_wait)).await;
    let (_, detail) = api.get("/api/v1/runs/deploy-1").await;
    // The input as it was given (the run's code reads the absent region as `None`).
    assert_eq!(detail["input"], json!({"service": "api"}));
    assert_eq!(detail["steps"][0]["name"], "stage");
    assert_eq!(detail["steps"][0]["state"], "completed");
    assert_eq!(detail["steps"][0]["output"], "api on staging");
    assert_eq!(detail["signal_waits"][0]["name"], "approval");
    assert_eq!(detail["signal_waits"][0]["state"], "waiting");
    // The payload's shape, traced from the `Approval` the saga reads, for the dashboard's form.
    let schema = &detail["signal_waits"][0]["payload_schema"];
    assert_eq!(schema["$ref"], "#/$defs/Approval");
    let optional = |schema: Value| json!({"anyOf": [schema, {"type": "null"}]});
    assert_eq!(
        schema["$defs"]["Approval"]["properties"],
        json!({
            "comment": {"type": "string"},
            "ticket": optional(json!({"type": "integer", "minimum": 0, "maximum": u32::MAX})),
            "risk": optional(json!({"$ref": "#/$defs/Risk"})),
        }),
        "{schema}"
    );
    assert_eq!(schema["$defs"]["Approval"]["required"], json!(["comment"]));

    let alice = api.issue("alice", "operator").await;
    let approve = json!({"name": "approval", "payload": {"comment": "ship it"}});
    let (status, body) =
        api.call(reqwest::Method::POST, "/api/v1/runs/deploy-1/signals", Some(&alice), Some(approve)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        api.outcome("deploy-1").await,
        Outcome::Completed("api on staging, released in default (ship it)".into())
    );

    let (_, detail) = api.get("/api/v1/runs/deploy-1").await;
    assert_eq!(detail["status"], "completed");
    assert_eq!(detail["output"], "api on staging, released in default (ship it)");
    assert_eq!(detail["signals"][0]["by"], "alice", "{detail}");
    assert_eq!(detail["signals"][0]["payload"], json!({"comment": "ship it"}));
    let (_, events) = api.get("/api/v1/runs/deploy-1/events").await;
    let kinds: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"saga_started"));
    assert_eq!(kinds.last(), Some(&"saga_completed"));
    let signal = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"]["by"] == "alice")
        .expect("the signal names alice");
    assert_eq!(signal["data"]["payload"], json!({"comment": "ship it"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_with_a_stable_code() {
    let api = Api::start().await;
    let cases = [
        (json!({"definition": "nope", "id": "x", "input": null}), StatusCode::NOT_FOUND, "not_found"),
        (
            json!({"definition": "gated", "id": "x", "input": {"service": 7}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
        ),
        (
            json!({"definition": "gated", "id": "", "input": {"service": "a"}}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (json!({"definition": "gated"}), StatusCode::BAD_REQUEST, "invalid_request"),
    ];
    for (body, status, expected) in cases {
        let (got, answer) = api.post("/api/v1/runs", body.clone()).await;
        assert_eq!((got, code(&answer)), (status, expected), "{body} -> {answer}");
    }
    let (status, body) = api.get("/api/v1/runs/none-such").await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = api.get("/api/v1/runs?limit=0").await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (status, body) = api.get("/api/v1/runs?created_after=yesterday").await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (status, body) = api.get("/api/v1/nowhere").await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    // Malformed JSON.
    let response = within(
        api.http
            .post(api.url("/api/v1/runs"))
            .bearer_auth(&api.admin)
            .header("content-type", "application/json")
            .body("{")
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // A body over the cap is refused before it is read whole. Last: the server then closes
    // the connection rather than read the rest, and a request on it would find it closed. Just
    // over the cap, so that the whole body fits the loopback socket's buffers and the client
    // is done sending when the refusal comes (a reset while it still sends would lose it).
    let huge =
        json!({"definition": "gated", "id": "big", "input": {"service": "x".repeat((1 << 20) + 1024)}});
    let (status, body) = api.post("/api/v1/runs", huge).await;
    assert_eq!((status, code(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_but_health_needs_a_token_and_roles_are_enforced() {
    let api = Api::start().await;
    let (status, _) =
        api.post("/api/v1/runs", json!({"definition": "gated", "id": "r", "input": {"service": "a"}})).await;
    assert_eq!(status, StatusCode::CREATED);
    let viewer = api.issue("viewer-1", "viewer").await;
    let operator = api.issue("operator-1", "operator").await;
    let revoked = api.issue("gone", "admin").await;
    let (status, _) = api.call(reqwest::Method::DELETE, "/api/v1/tokens/gone", Some(&api.admin), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let reads = [
        "/api/v1/runs",
        "/api/v1/runs/r",
        "/api/v1/runs/r/events",
        "/api/v1/runs/r/journal",
        "/api/v1/runs/r/replay",
        "/api/v1/check",
        "/api/v1/definitions",
        "/api/v1/workers",
    ];
    for path in reads {
        for (token, expected) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("hodei_0011223344556677_00"), StatusCode::UNAUTHORIZED),
            (Some("not-a-token"), StatusCode::UNAUTHORIZED),
            (Some(revoked.as_str()), StatusCode::UNAUTHORIZED),
            (Some(viewer.as_str()), StatusCode::OK),
        ] {
            let (status, body) = api.call(reqwest::Method::GET, path, token, None).await;
            assert_eq!(status, expected, "GET {path} with {token:?}: {body}");
            if expected == StatusCode::UNAUTHORIZED {
                assert_eq!(code(&body), "unauthenticated");
            }
        }
    }
    let writes: [(&str, Value); 8] = [
        ("/api/v1/runs", json!({"definition": "gated", "id": "v", "input": {"service": "a"}})),
        ("/api/v1/runs/r/signals", json!({"name": "approval", "payload": {"comment": "no"}})),
        ("/api/v1/runs/r/cancel", json!({"reason": "no"})),
        ("/api/v1/runs/r/fork", json!({"id": "r2", "from_step": 0})),
        ("/api/v1/runs/r/pause", json!({})),
        ("/api/v1/runs/r/resume", json!({})),
        ("/api/v1/runs/r/retry", json!({})),
        ("/api/v1/runs/r/retry-compensation", json!({})),
    ];
    for (path, body) in writes {
        let (status, answer) = api.call(reqwest::Method::POST, path, Some(&viewer), Some(body)).await;
        assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "forbidden"), "POST {path} as viewer");
    }
    for (method, path, body) in [
        (reqwest::Method::GET, "/api/v1/tokens", None),
        (reqwest::Method::POST, "/api/v1/tokens", Some(json!({"name": "x", "role": "admin"}))),
        (reqwest::Method::DELETE, "/api/v1/tokens/viewer-1", None),
    ] {
        let (status, answer) = api.call(method.clone(), path, Some(&operator), body).await;
        assert_eq!(
            (status, code(&answer)),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{method} {path} as operator"
        );
    }
    // The run was not touched by any refused request.
    let (_, detail) = api.get("/api/v1/runs/r").await;
    assert_eq!(detail["status"], "running");
    assert_eq!(detail["requests"], json!([]));
    let (status, body) = api.call(reqwest::Method::GET, "/api/v1/health", None, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_list_every_run_once_in_id_order_with_filters() {
    let api = Api::start().await;
    for i in 0..7 {
        let (status, _) = api
            .post("/api/v1/runs", json!({"definition": "flaky", "id": format!("f-{i}"), "input": false}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    for i in 0..3 {
        let (status, _) = api
            .post(
                "/api/v1/runs",
                json!({"definition": "gated", "id": format!("g-{i}"), "input": {"service": "a"}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    for i in 0..7 {
        assert_eq!(api.outcome_of::<u32>(&format!("f-{i}")).await, Outcome::Completed(20));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/runs?limit=3&cursor={c}"),
            None => "/api/v1/runs?limit=3".to_owned(),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let runs = page["runs"].as_array().unwrap();
        assert!(runs.len() <= 3);
        seen.extend(runs.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> =
        (0..7).map(|i| format!("f-{i}")).chain((0..3).map(|i| format!("g-{i}"))).collect();
    assert_eq!(seen, expected);
    let (_, page) = api.get("/api/v1/runs?definition=gated&status=running").await;
    let ids: Vec<&str> = page["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["g-0", "g-1", "g-2"]);
    let (_, page) = api.get("/api/v1/runs?status=completed&limit=100").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 7);
    let (_, page) = api.get("/api/v1/runs?created_after=2999-01-01T00:00:00Z").await;
    assert_eq!(page["runs"], json!([]));
    // A search by id, across pages: the server reads on until the page is full.
    let (_, page) = api.get("/api/v1/runs?q=-1&limit=1").await;
    let ids: Vec<&str> = page["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["f-1"]);
    let next = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, page) = api.get(&format!("/api/v1/runs?q=-1&limit=5&cursor={next}")).await;
    let ids: Vec<&str> = page["runs"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["g-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_fork_and_pause_resume_across_a_restart() {
    let api = Api::start().await;
    // Cancel: the staged step is compensated, and the request names its token.
    api.post("/api/v1/runs", json!({"definition": "gated", "id": "c", "input": {"service": "a"}})).await;
    let ops = api.issue("ops", "operator").await;
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/api/v1/runs/c/cancel",
            Some(&ops),
            Some(json!({"reason": "wrong branch"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(matches!(api.outcome("c").await, Outcome::Compensated { .. }));
    let (_, detail) = api.get("/api/v1/runs/c").await;
    assert_eq!(detail["status"], "compensated");
    assert_eq!(detail["requests"][0]["action"], "cancel");
    assert_eq!(detail["requests"][0]["by"], "ops");
    assert_eq!(detail["requests"][0]["reason"], "wrong branch");
    let (status, body) = api.post("/api/v1/runs/c/cancel", json!({})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "invalid_state"), "{body}");

    // Fork from the failure: the fork reuses step a and runs b live.
    api.post("/api/v1/runs", json!({"definition": "flaky", "id": "x", "input": true})).await;
    assert!(matches!(api.outcome_of::<u32>("x").await, Outcome::Failed { .. } | Outcome::Compensated { .. }));
    let (status, fork) = api.post("/api/v1/runs/x/fork", json!({"id": "x-fork"})).await;
    assert_eq!(status, StatusCode::CREATED, "{fork}");
    let (_, detail) = api.get("/api/v1/runs/x-fork").await;
    assert_eq!(detail["forked_from"], json!({"run": "x", "step": 1}));
    let (status, body) = api.post("/api/v1/runs/x-fork/fork", json!({"id": "x-fork-2"})).await;
    // The fork has the same input, so it fails the same way; forking it needs a failure too.
    assert!(status == StatusCode::CREATED || code(&body) == "invalid_state", "{body}");

    // Pause at the gate, restart, still paused; resume, approve, completes.
    api.post("/api/v1/runs", json!({"definition": "gated", "id": "p", "input": {"service": "a"}})).await;
    let (status, body) = api.post("/api/v1/runs/p/pause", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let api = api.restart().await;
    let (_, detail) = api.get("/api/v1/runs/p").await;
    assert_eq!(detail["status"], "paused", "{detail}");
    let (status, _) = api.post("/api/v1/runs/p/resume", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    api.post("/api/v1/runs/p/signals", json!({"name": "approval", "payload": {"comment": "later"}})).await;
    assert_eq!(
        api.outcome("p").await,
        Outcome::Completed("a on staging, released in default (later)".into())
    );
    let (_, detail) = api.get("/api/v1/runs/p").await;
    let actions: Vec<&str> =
        detail["requests"].as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["pause", "resume"]);
    assert!(detail["requests"].as_array().unwrap().iter().all(|r| r["by"] == "admin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_the_journal_streams_every_event_once_to_the_end() {
    let api = Api::start().await;
    api.post("/api/v1/runs", json!({"definition": "gated", "id": "f", "input": {"service": "a"}})).await;
    let response =
        within(api.http.get(api.url("/api/v1/runs/f/events?follow=true")).bearer_auth(&api.admin).send())
            .await
            .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    api.post("/api/v1/runs/f/signals", json!({"name": "approval", "payload": {"comment": "ok"}})).await;
    // The stream ends with the run.
    let text = within(response.text()).await.unwrap();
    let ids: Vec<u64> = text.lines().filter_map(|l| l.strip_prefix("id: ")?.parse().ok()).collect();
    let journal = api.engine.history(&SagaId::new("f").unwrap()).unwrap();
    let last_final = journal.iter().rposition(|r| r.event.is_final()).unwrap();
    assert_eq!(ids, (0..=journal[last_final].seq).collect::<Vec<_>>());
    // A reconnect naming the last id it saw gets nothing twice.
    let response = within(
        api.http
            .get(api.url("/api/v1/runs/f/events?follow=true"))
            .bearer_auth(&api.admin)
            .header("last-event-id", "2")
            .send(),
    )
    .await
    .unwrap();
    let text = within(response.text()).await.unwrap();
    let ids: Vec<u64> = text.lines().filter_map(|l| l.strip_prefix("id: ")?.parse().ok()).collect();
    assert_eq!(ids, (3..=journal[last_final].seq).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_address_without_tls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder().store(hodei_core::MemoryStore::new()).start().await.unwrap();
    let error = ApiServer::builder(engine, dir.path())
        .bind(SocketAddr::from(([0, 0, 0, 0], 0)))
        .serve()
        .await
        .unwrap_err();
    assert!(matches!(error, ApiServeError::NeedsTls(_)), "{error}");
    assert!(error.to_string().contains("without TLS"), "{error}");
    // Nothing was written: the refusal comes before the token store is created.
    assert!(!dir.path().join("api").exists());
}

/// The committed document is the one the code generates; `HODEI_UPDATE_OPENAPI=1` rewrites it.
#[test]
fn the_committed_openapi_document_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = openapi_document();
    if std::env::var_os("HODEI_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} differs from the API's code: run `HODEI_UPDATE_OPENAPI=1 cargo test -p hodei-server --test api` and commit it",
        path.display()
    );
}

/// GitHub's form: `sha256=` and the hex HMAC-SHA256 of the raw body.
fn github_signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    format!("sha256={}", tag.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_starts_one_run_per_delivery_and_refuses_bad_signatures() {
    use hodei_server::api::{Webhook, WebhookRequest};
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder()
        .store(SledStore::open(dir.path().join("journal")).unwrap())
        .register(gated())
        .start()
        .await
        .unwrap();
    // A push starts a deploy of its repository; anything else is ignored.
    let on_push = |request: &WebhookRequest| -> Result<Option<hodei_core::SagaRun>, String> {
        if request.event.as_deref() != Some("push") {
            return Ok(None);
        }
        let repository =
            request.payload["repository"]["name"].as_str().ok_or("the push names no repository")?;
        let delivery = request.delivery.clone().ok_or("no delivery id")?;
        let deploy = Deploy { service: repository.to_owned(), region: None };
        hodei_core::SagaRun::new("gated", format!("push-{delivery}"), &deploy)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    let server = ApiServer::builder(engine.clone(), dir.path())
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .webhook("github", Webhook::new(on_push).secret("It's a Secret to Everybody"))
        .webhook("unsigned", Webhook::new(on_push))
        .serve()
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = |hook: &str| format!("http://{}/api/v1/hooks/{hook}", server.local_addr());
    let body = br#"{"ref":"refs/heads/main","repository":{"name":"shop"}}"#;
    let deliver = |hook: &'static str, event: &'static str, signature: Option<String>| {
        let mut request = http
            .post(url(hook))
            .header("x-github-event", event)
            .header("x-github-delivery", "72d3162e")
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        async move {
            let response = within(request.send()).await.unwrap();
            let status = response.status();
            (status, within(response.text()).await.unwrap())
        }
    };
    let signed = github_signature("It's a Secret to Everybody", body);
    let (status, text) = deliver("github", "push", Some(signed.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["id"], "push-72d3162e");
    // A redelivery is the same run.
    let (status, _) = deliver("github", "push", Some(signed.clone())).await;
    assert_eq!(status, StatusCode::OK);
    // A ping is ignored.
    let (status, text) = deliver("github", "ping", Some(signed)).await;
    assert_eq!((status, text.as_str()), (StatusCode::NO_CONTENT, ""));
    // A wrong secret, a missing signature, a body changed after signing: refused, nothing run.
    for signature in [
        Some(github_signature("another secret", body)),
        None,
        Some(github_signature("It's a Secret to Everybody", b"{}")),
    ] {
        let (status, text) = deliver("github", "push", signature).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["code"], "unauthenticated");
    }
    // A hook without a secret needs an operator token instead.
    let (status, _) = deliver("unsigned", "push", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = deliver("nowhere", "push", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let runs = engine.list(&hodei_core::SagaFilter::default()).unwrap();
    assert_eq!(runs.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), ["push-72d3162e"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_with_a_given_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder().store(hodei_core::MemoryStore::new()).start().await.unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (certified.cert.pem(), certified.signing_key.serialize_pem());
    let tls = hodei_server::api::tls_config(&cert_pem, &key_pem).unwrap();
    let server = ApiServer::builder(engine, dir.path())
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .tls(tls)
        .serve()
        .await
        .unwrap();
    let response = support::https_get(server.local_addr(), &cert_pem, "localhost", "/api/v1/health").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with(r#"{"status":"ok"}"#), "{response}");
    // Plain HTTP on the TLS port gets no answer from the API.
    let mut plain = tokio::net::TcpStream::connect(server.local_addr()).await.unwrap();
    plain
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = within(plain.read_to_end(&mut answer)).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_lists_the_child_sagas_it_started() {
    let api = Api::start().await;
    let (status, body) =
        api.post("/api/v1/runs", json!({"definition": "parent", "id": "p-1", "input": "p-1-child"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(api.outcome_of::<u32>("p-1").await, Outcome::Completed(20));
    let (_, detail) = api.get("/api/v1/runs/p-1").await;
    assert_eq!(detail["children"], json!([{"run": "p-1-child", "definition": "flaky", "step": 0}]));
    // The child's input, a payload inside the step's input, shows as JSON too.
    assert_eq!(detail["steps"][0]["input"]["input"], json!(false));
    let (_, child) = api.get("/api/v1/runs/p-1-child").await;
    assert_eq!((child["status"].as_str(), child["output"].as_u64()), (Some("completed"), Some(20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_works_only_with_the_csrf_header_and_ends_with_its_token() {
    let api = Api::start().await;
    let ops = api.issue("ops", "operator").await;
    let login = |token: String| {
        let request = api.http.post(api.url("/api/v1/session")).json(&json!({ "token": token }));
        async move { within(request.send()).await.unwrap() }
    };
    let refused = login("hodei_0011223344556677_00".into()).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get("set-cookie").is_none());
    let response = login(ops.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "plain HTTP on loopback: {cookie}");
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"name": "ops", "role": "operator"}));
    let session = cookie.split(';').next().unwrap().to_owned();

    api.post("/api/v1/runs", json!({"definition": "gated", "id": "s", "input": {"service": "a"}})).await;
    let with_cookie = |method: reqwest::Method, path: &str, csrf: bool| {
        let mut request = api.http.request(method, api.url(path)).header("cookie", &session);
        if csrf {
            request = request.header("x-hodei-csrf", "1");
        }
        async move { within(request.send()).await.unwrap() }
    };
    // What another site could make a browser send: the cookie without the header.
    for (method, path) in
        [(reqwest::Method::POST, "/api/v1/runs/s/cancel"), (reqwest::Method::GET, "/api/v1/session")]
    {
        let response = with_cookie(method, path, false).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(code(&response.json().await.unwrap()), "forbidden");
    }
    let (_, detail) = api.get("/api/v1/runs/s").await;
    assert_eq!(detail["requests"], json!([]), "the forged cancel did nothing");
    let whoami = with_cookie(reqwest::Method::GET, "/api/v1/session", true).await;
    assert_eq!(whoami.json::<Value>().await.unwrap(), json!({"name": "ops", "role": "operator"}));
    let cancel = with_cookie(reqwest::Method::POST, "/api/v1/runs/s/cancel", true).await;
    assert_eq!(cancel.status(), StatusCode::ACCEPTED);
    let (_, detail) = api.get("/api/v1/runs/s").await;
    assert_eq!(detail["requests"][0]["by"], "ops");

    // Logging out clears the cookie; revoking the token ends every session holding it.
    let logout = with_cookie(reqwest::Method::DELETE, "/api/v1/session", true).await;
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    assert!(logout.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let (status, _) = api.call(reqwest::Method::DELETE, "/api/v1/tokens/ops", Some(&api.admin), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let after = with_cookie(reqwest::Method::GET, "/api/v1/session", true).await;
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_the_list_sends_each_matching_run_as_it_starts_and_changes() {
    let api = Api::start().await;
    let mut stream = within(
        api.http.get(api.url("/api/v1/runs?definition=flaky&follow=true")).bearer_auth(&api.admin).send(),
    )
    .await
    .unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    // A gated run, which the filter leaves out, then a flaky one that completes.
    api.post("/api/v1/runs", json!({"definition": "gated", "id": "other", "input": {"service": "a"}})).await;
    api.post("/api/v1/runs", json!({"definition": "flaky", "id": "watched", "input": false})).await;
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut buffer = Vec::new();
    while !seen.iter().any(|(_, status)| status == "completed") {
        let chunk = within(stream.chunk()).await.unwrap().expect("the stream stays open");
        buffer.extend_from_slice(&chunk);
        while let Some(at) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=at).collect();
            if let Some(data) = std::str::from_utf8(&line).unwrap().trim_end().strip_prefix("data: ") {
                let run: Value = serde_json::from_str(data).unwrap();
                seen.push((
                    run["id"].as_str().unwrap().to_owned(),
                    run["status"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    assert!(seen.iter().all(|(id, _)| id == "watched"), "{seen:?}");
    assert_eq!(seen.last().map(|(_, s)| s.as_str()), Some("completed"), "{seen:?}");
}
