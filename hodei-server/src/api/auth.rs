//! Who is asking: the bearer token of a request, and whether its role may do what it asks.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use super::error::ApiError;
use super::tokens::{ApiToken, Role, TokenStore};

/// The live token a request carries, if its role allows `needed`. Every endpoint but the
/// health check and the OpenAPI document calls this first.
pub(crate) fn authorize(
    tokens: &TokenStore,
    headers: &HeaderMap,
    needed: Role,
) -> Result<ApiToken, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::unauthenticated(
            "this endpoint needs a bearer token (Authorization: Bearer hodei_...)",
        ));
    };
    let bearer = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::unauthenticated("the Authorization header is not `Bearer <token>`"))?;
    let token = tokens.authenticate(bearer.trim())?;
    if !token.role.allows(needed) {
        return Err(ApiError::forbidden(format!(
            "token `{}` is a {} token; this needs {needed}",
            token.name, token.role
        )));
    }
    Ok(token)
}
