//! Webhook triggers: a `POST` to a named hook starts a run through a function the user
//! registers, payload in, run out.
//!
//! A hook with a secret checks GitHub's `X-Hub-Signature-256` (HMAC-SHA256 of the raw body) in
//! constant time and needs no bearer token, since senders like GitHub cannot hold one; a hook
//! without a secret needs an operator token like any other verb.

use std::fmt;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hodei_core::SagaRun;
use serde_json::Value;

use super::auth::authorize;
use super::error::{ApiError, ErrorBody};
use super::model::RunSummary;
use super::server::ApiState;
use super::signature::{SIGNATURE_HEADER, verify_signature};
use super::tokens::Role;
use super::view::summary;

/// What a hook's function gets.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WebhookRequest {
    /// The body, as JSON.
    pub payload: Value,
    /// The `X-GitHub-Event` header (`push`, `pull_request`, `ping`, ...), if sent.
    pub event: Option<String>,
    /// The `X-GitHub-Delivery` header, if sent: a unique id per delivery, a natural run id.
    pub delivery: Option<String>,
}

type StartFn = dyn Fn(&WebhookRequest) -> Result<Option<SagaRun>, String> + Send + Sync;

/// A named webhook: turns a delivery into the run to start, or into nothing (a `ping`, a push
/// to a branch nobody builds).
#[derive(Clone)]
pub struct Webhook {
    secret: Option<Arc<[u8]>>,
    start: Arc<StartFn>,
}

impl Webhook {
    /// A hook whose deliveries `start` turns into runs. `Ok(None)` ignores a delivery (answered
    /// 204); `Err` refuses it (422, with the message). Use the delivery id in the run id, so
    /// that a redelivery starts no second run.
    pub fn new(
        start: impl Fn(&WebhookRequest) -> Result<Option<SagaRun>, String> + Send + Sync + 'static,
    ) -> Self {
        Self { secret: None, start: Arc::new(start) }
    }

    /// Requires every delivery to be signed with `secret`, as GitHub signs them.
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(Arc::from(secret.as_ref()));
        self
    }
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook").field("signed", &self.secret.is_some()).finish_non_exhaustive()
    }
}

/// Starts a run from a webhook delivery.
#[utoipa::path(post, path = "/api/v1/hooks/{name}", tag = "webhooks",
    params(("name" = String, Path, description = "The hook's name"),
        ("X-Hub-Signature-256" = Option<String>, Header, description = "`sha256=<hex>`: required by hooks with a secret")),
    request_body(content = serde_json::Value, description = "The delivery, as JSON"),
    responses(
        (status = 201, description = "A run started", body = RunSummary),
        (status = 200, description = "The run this delivery names exists: that run", body = RunSummary),
        (status = 204, description = "The hook ignored the delivery"),
        (status = 401, description = "A missing or wrong signature (or token, for an unsigned hook)", body = ErrorBody),
        (status = 404, description = "No such hook", body = ErrorBody),
        (status = 422, description = "The hook refused the delivery", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub(crate) async fn trigger(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let hook =
        state.webhooks.get(&name).cloned().ok_or_else(|| ApiError::not_found(format!("no hook `{name}`")))?;
    match &hook.secret {
        Some(secret) => {
            let header = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
            verify_signature(secret, &body, header).map_err(|e| ApiError::unauthenticated(e.to_string()))?;
        }
        None => {
            authorize(&state.tokens, &headers, Role::Operator)?;
        }
    }
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_request(format!("the delivery is not JSON: {e}")))?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let request =
        WebhookRequest { payload, event: header("x-github-event"), delivery: header("x-github-delivery") };
    let Some(run) = (hook.start)(&request).map_err(ApiError::invalid_input)? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let existed = state.engine.status(run.id()).is_ok();
    let handle = state.engine.start(run).await?;
    let record = state.engine.status(handle.id())?;
    let code = if existed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(summary(&record))).into_response())
}
