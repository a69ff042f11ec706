//! Health, definitions and tokens.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::{authorize, ended_session_cookie, session_cookie};
use super::error::{ApiError, ErrorBody};
use super::model::{
    DefinitionView, Health, IssueToken, IssuedTokenView, Login, StepShapeView, TokenView, WhoAmI,
};
use super::server::ApiState;
use super::time::format_millis;
use super::tokens::{ApiToken, Role};

/// Whether the server answers. Needs no token.
#[utoipa::path(get, path = "/api/v1/health", tag = "meta",
    responses((status = 200, description = "Up", body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health { status: "ok".to_owned() })
}

/// The registered saga definitions, every version, with their static shape.
#[utoipa::path(get, path = "/api/v1/definitions", tag = "definitions",
    responses(
        (status = 200, description = "By name, then version", body = [DefinitionView]),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn definitions(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Vec<DefinitionView>>, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let views = state
        .engine
        .definitions()
        .into_iter()
        .map(|d| DefinitionView {
            steps: d
                .shape
                .map(|shape| {
                    shape
                        .steps
                        .iter()
                        .map(|s| StepShapeView {
                            name: s.name.to_owned(),
                            compensation: s.compensation.map(str::to_owned),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            name: d.name,
            version: d.version,
        })
        .collect();
    Ok(Json(views))
}

fn token_view(token: &ApiToken) -> TokenView {
    TokenView {
        name: token.name.clone(),
        role: token.role.to_string(),
        created_at: format_millis(token.created_unix.saturating_mul(1000)),
        revoked: token.revoked,
    }
}

/// Every API token, revoked ones too; never their secrets.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses(
        (status = 200, description = "By name", body = [TokenView]),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_tokens(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    authorize(&state.tokens, &headers, Role::Admin)?;
    Ok(Json(state.tokens.list()?.iter().map(token_view).collect()))
}

/// Issues a token; its secret is in this response only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = IssueToken,
    responses(
        (status = 201, description = "Issued", body = IssuedTokenView),
        (status = 400, description = "A malformed name or an unknown role", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn issue_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<IssueToken>, JsonRejection>,
) -> Result<(StatusCode, Json<IssuedTokenView>), ApiError> {
    authorize(&state.tokens, &headers, Role::Admin)?;
    let Json(body) = body?;
    let role: Role = body.role.parse()?;
    let issued = state.tokens.issue(&body.name, role)?;
    let view = IssuedTokenView { token: token_view(&issued.token), secret: issued.bearer().to_owned() };
    Ok((StatusCode::CREATED, Json(view)))
}

/// Revokes a token at once: its next request is refused.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", tag = "tokens",
    params(("name" = String, Path, description = "The token's name")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No live token of that name", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn revoke_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&state.tokens, &headers, Role::Admin)?;
    if state.tokens.revoke(&name)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no live token named `{name}`")))
    }
}

/// Logs in: checks the token and holds it in an HttpOnly, SameSite=Strict session cookie, for
/// the dashboard. Requests that rely on the cookie must carry the `X-Hodei-CSRF` header.
#[utoipa::path(post, path = "/api/v1/session", tag = "meta", request_body = Login,
    responses(
        (status = 200, description = "Logged in; the cookie is set", body = WhoAmI),
        (status = 401, description = "Not a live token", body = ErrorBody),
    ))]
pub(crate) async fn login(
    State(state): State<ApiState>,
    body: Result<Json<Login>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(login) = body?;
    let token = state.tokens.authenticate(login.token.trim())?;
    let who = WhoAmI { name: token.name, role: token.role.to_string() };
    Ok(([(SET_COOKIE, session_cookie(login.token.trim(), state.secure_cookies))], Json(who)).into_response())
}

/// Who the request's token (or session) is.
#[utoipa::path(get, path = "/api/v1/session", tag = "meta",
    responses(
        (status = 200, description = "The token's name and role", body = WhoAmI),
    ),
    security(("bearer" = [])))]
pub(crate) async fn whoami(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<WhoAmI>, ApiError> {
    let token = authorize(&state.tokens, &headers, Role::Viewer)?;
    Ok(Json(WhoAmI { name: token.name, role: token.role.to_string() }))
}

/// Logs out: clears the session cookie.
#[utoipa::path(delete, path = "/api/v1/session", tag = "meta",
    responses((status = 204, description = "The cookie is cleared")))]
pub(crate) async fn logout(State(state): State<ApiState>) -> Response {
    (StatusCode::NO_CONTENT, [(SET_COOKIE, ended_session_cookie(state.secure_cookies))]).into_response()
}
