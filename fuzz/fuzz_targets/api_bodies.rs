//! The operator API's request bodies, over HTTP to a real `ApiServer` on loopback: whatever a
//! client posts to a verb that takes a body, the answer is a success or a 4xx whose body is the
//! documented `{"error": {"code", "message"}}`, never a 5xx, a panic or a hang.
//!
//! Input: a route byte, a byte choosing the run it names (one waiting for a signal, one
//! completed, one whose compensation failed, one that does not exist), then the body. The route
//! byte's high bit asks for the body of `POST /api/v1/replay` to be sealed as a journal file
//! with a checksum that matches, and a signed hook's body is signed here, so that both reach
//! the code behind their gate.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use hodei_core::__fuzz::{RECORD_FORMAT_V2, seal_record};
use hodei_core::{CompensationContext, Engine, MemoryStore, Outcome, SagaDefinition, SagaRun, StepError};
use hodei_fuzz::{Cursor, ScratchDir};
use hodei_server::api::{ApiServer, Webhook, WebhookRequest};
use http::{Method, Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

const HOOK_SECRET: &[u8] = b"fuzz-hook-secret";
const RUNS: [&str; 4] = ["waiting", "done", "compensation-failed", "missing"];

#[derive(Serialize, Deserialize)]
struct Release {
    version: String,
}

fn definitions() -> Vec<SagaDefinition> {
    vec![
        SagaDefinition::new("release", 1, |ctx, release: Release| async move {
            let approver: String = ctx.wait_signal("approve").await?;
            ctx.step("ship")
                .input(release.version)
                .compensate(|_: CompensationContext<String, String>| async { Ok(()) })
                .run(move |_, version: String| {
                    let approver = approver.clone();
                    async move { Ok::<_, StepError>(format!("{version} approved by {approver}")) }
                })
                .await
        }),
        SagaDefinition::new("rollback", 1, |ctx, _: ()| async move {
            ctx.step("deploy")
                .compensate(|_: CompensationContext<(), ()>| async { Err(StepError::terminal("stuck")) })
                .run(|_, _: ()| async { Ok::<_, StepError>(()) })
                .await?;
            ctx.step("verify").run(|_, _: ()| async { Err::<(), _>(StepError::terminal("unhealthy")) }).await
        }),
    ]
}

/// A hook as a user would write one: the delivery's payload is a release's input.
fn release_hook(request: &WebhookRequest) -> Result<Option<SagaRun>, String> {
    let Some(delivery) = &request.delivery else { return Ok(None) };
    SagaRun::from_json("release", format!("hook-{delivery}"), &request.payload)
        .map(Some)
        .map_err(|e| e.to_string())
}

struct Server {
    runtime: tokio::runtime::Runtime,
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    bearer: String,
    _data: ScratchDir,
    _api: ApiServer,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = hodei_fuzz::runtime();
        let data = ScratchDir::new();
        let (api, bearer) = runtime.block_on(async {
            let mut builder = Engine::builder().store(MemoryStore::new());
            for definition in definitions() {
                builder = builder.register(definition);
            }
            let engine = builder.start().await.expect("an engine");
            let release = |id: &str| SagaRun::new("release", id, &Release { version: "1.0".into() });
            engine.start(release("waiting").expect("a run")).await.expect("started");
            let done = engine.start(release("done").expect("a run")).await.expect("started");
            engine.signal(done.id(), "approve", &"alice").await.expect("signalled");
            assert!(matches!(done.outcome::<String>().await, Ok(Outcome::Completed(_))));
            let stuck =
                engine.start(SagaRun::new("rollback", RUNS[2], &()).expect("a run")).await.expect("started");
            assert!(matches!(stuck.outcome::<()>().await, Ok(Outcome::CompensationFailed { .. })));
            let api = ApiServer::builder(engine, data.path())
                .bind("127.0.0.1:0".parse().expect("an address"))
                .webhook("signed", Webhook::new(release_hook).secret(HOOK_SECRET))
                .webhook("unsigned", Webhook::new(release_hook))
                .serve()
                .await
                .expect("the API serves");
            let token_file = api.admin_token_file().expect("the first start writes the admin token");
            let bearer = std::fs::read_to_string(token_file).expect("the admin token").trim().to_owned();
            (api, bearer)
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        let base = format!("http://{}", api.local_addr());
        Server { runtime, client, base, bearer, _data: data, _api: api }
    })
}

/// GitHub's `X-Hub-Signature-256` of a body.
fn signature(body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HOOK_SECRET);
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let mut input = Cursor::new(data);
    let route = input.u8();
    let run = RUNS[usize::from(input.u8()) % RUNS.len()];
    let delivery = input.short();
    let mut body = input.rest().to_vec();
    let verb = |name: &str| format!("/api/v1/runs/{run}/{name}");
    let path = match route & 0x7F {
        0 => "/api/v1/runs".to_owned(),
        1 => verb("signals"),
        2 => verb("cancel"),
        3 => verb("fork"),
        4 => verb("pause"),
        5 => verb("resume"),
        6 => verb("retry"),
        7 => verb("retry-compensation"),
        8 => "/api/v1/replay".to_owned(),
        9 => "/api/v1/session".to_owned(),
        10 => "/api/v1/tokens".to_owned(),
        11 => "/api/v1/hooks/signed".to_owned(),
        _ => "/api/v1/hooks/unsigned".to_owned(),
    };
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", server.base))
        .header(header::AUTHORIZATION, format!("Bearer {}", server.bearer));
    if path == "/api/v1/replay" {
        if route & 0x80 != 0 {
            body = seal_record(RECORD_FORMAT_V2, &body);
        }
        request = request.header(header::CONTENT_TYPE, "application/octet-stream");
    } else {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if path.starts_with("/api/v1/hooks/") {
        if let Ok(delivery) = http::HeaderValue::from_bytes(delivery) {
            request = request.header("x-github-delivery", delivery);
        }
        if path.ends_with("/signed") {
            request = request.header("x-hub-signature-256", signature(&body));
        }
    }
    let request = request.body(Full::new(Bytes::from(body.clone()))).expect("a request");
    let (status, answer) = server.runtime.block_on(async {
        // A replay check of a journal whose operations the code cannot reach waits out its
        // 10 s limit; nothing else should come near.
        let response = tokio::time::timeout(Duration::from_secs(25), server.client.request(request))
            .await
            .expect("the API answers within 25 s")
            .expect("the API answers");
        let status = response.status();
        let answer = response.into_body().collect().await.expect("the whole answer").to_bytes();
        (status, answer)
    });
    assert!(
        !status.is_server_error(),
        "POST {path} {:?}: {status} {:?}",
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&answer)
    );
    if status.is_client_error() {
        let error: serde_json::Value = serde_json::from_slice(&answer).expect("an error body is JSON");
        assert!(error["error"]["code"].is_string(), "POST {path}: {status} without a code: {error}");
        assert!(error["error"]["message"].is_string(), "POST {path}: {status} without a message: {error}");
    }
});
