//! The operator API served for a test's engine on loopback, and an HTTP client holding the
//! admin token its first start wrote.

use std::net::SocketAddr;
use std::path::Path;

use hodei_core::Engine;
use hodei_server::api::ApiServer;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::within;

/// An API server and a client of it.
pub struct ServedApi {
    pub server: ApiServer,
    pub http: reqwest::Client,
    /// The admin token the server's first start wrote to `<dir>/api/admin-token`.
    pub admin: String,
}

impl ServedApi {
    /// Serves the API for `engine` on a free loopback port, its tokens in `dir`, and reads the
    /// admin token that the first start on `dir` wrote there.
    pub async fn start(engine: &Engine, dir: &Path) -> Self {
        let server = ApiServer::builder(engine.clone(), dir)
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .serve()
            .await
            .unwrap();
        let admin = std::fs::read_to_string(dir.join("api/admin-token")).unwrap().trim().to_owned();
        Self { server, http: reqwest::Client::new(), admin }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.local_addr())
    }

    /// The status and the body: JSON, `Null` when empty, else the text as a JSON string.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = within(request.send()).await.unwrap();
        let status = response.status();
        let text = within(response.text()).await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    /// `GET path` as the admin.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(&self.admin), None).await
    }

    /// `GET path` as the admin, which must answer 200: its body.
    pub async fn get_ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// `POST path` with a JSON body as the admin.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(&self.admin), Some(body)).await
    }
}

/// The stable code of an error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}
