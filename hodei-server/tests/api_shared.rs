//! Engines sharing a PostgreSQL share their operator API's tokens
//! (`ApiServerBuilder::shared_tokens`): a token issued through one engine's API works on
//! another's, a revocation holds on all of them, and the first admin token is issued once. Real
//! HTTP to two API servers, each over an engine of its own on one database.

mod support;
#[path = "../../hodei-core/src/store/postgres/test_database.rs"]
mod test_database;

use std::sync::Arc;
use std::time::Duration;

// `PostgresOptions`: `test_database` names it from this crate's root.
use hodei_core::{Engine, PostgresOptions, PostgresStore};
use hodei_server::api::ApiServer;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::within;
use test_database::TestDatabase;

struct Api {
    _dir: tempfile::TempDir,
    engine: Engine,
    server: ApiServer,
}

async fn api(db: &TestDatabase) -> Api {
    let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
    let engine = Engine::builder().store(store.clone()).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = ApiServer::builder(engine.clone(), dir.path())
        .bind("127.0.0.1:0".parse().unwrap())
        .shared_tokens(store)
        .serve()
        .await
        .unwrap();
    Api { _dir: dir, engine, server }
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let url = format!("http://{}{path}", self.server.local_addr());
        let mut request = reqwest::Client::new().request(method, url).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = within(request.send()).await.unwrap();
        let status = response.status();
        let text = within(response.text()).await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn admin_token(&self) -> Option<String> {
        let file = self.server.admin_token_file()?;
        Some(std::fs::read_to_string(file).unwrap().trim().to_owned())
    }

    async fn stop(self) {
        self.server.shutdown().await;
        self.engine.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_issued_through_one_engines_api_works_on_another_until_revoked() {
    let Some(db) = TestDatabase::new("api tokens") else { return };
    // Started at once: one of them issues the first admin token.
    let (first, second) = tokio::join!(api(&db), api(&db));
    let admins: Vec<String> = [&first, &second].iter().filter_map(|api| api.admin_token()).collect();
    assert_eq!(admins.len(), 1, "one first admin token for all the engines");
    let admin = &admins[0];

    // Issued through the second, used on the first.
    let (status, body) = second
        .call(reqwest::Method::POST, "/api/v1/tokens", admin, Some(json!({"name": "ci", "role": "operator"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let ci = body["secret"].as_str().unwrap().to_owned();
    let (status, body) = first.call(reqwest::Method::GET, "/api/v1/runs", &ci, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = first.call(reqwest::Method::GET, "/api/v1/tokens", admin, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<&str> = body.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "ci"]);

    // A name is taken on every engine.
    let (status, body) = first
        .call(reqwest::Method::POST, "/api/v1/tokens", admin, Some(json!({"name": "ci", "role": "viewer"})))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Revoked through the first: refused by the second at its next request.
    let (status, body) = first.call(reqwest::Method::DELETE, "/api/v1/tokens/ci", admin, None).await;
    assert!(status.is_success(), "{status}: {body}");
    let (status, body) = second.call(reqwest::Method::GET, "/api/v1/runs", &ci, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthenticated", "{body}");

    first.stop().await;
    second.stop().await;
}
