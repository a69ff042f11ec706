//! Who is asking: the token of a request, and whether its role may do what it asks.
//!
//! A request carries its token as `Authorization: Bearer ...` (scripts, the CLI), or in the
//! session cookie the dashboard's login sets (HttpOnly, SameSite=Strict). A request that
//! relies on the cookie must also carry [`CSRF_HEADER`]: a page on another site can make a
//! browser send the cookie, but not a custom header without a CORS preflight this API never
//! grants, so a forged request is refused before it is read.

use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE};

use super::error::ApiError;
use super::tokens::{ApiToken, Role, TokenStore};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "hodei_session";
/// The header every cookie-authenticated request must carry (any value).
pub const CSRF_HEADER: &str = "x-hodei-csrf";

/// The live token a request carries, if its role allows `needed`. Every endpoint but the
/// health check, the OpenAPI document and the login calls this first.
pub(crate) fn authorize(
    tokens: &TokenStore,
    headers: &HeaderMap,
    needed: Role,
) -> Result<ApiToken, ApiError> {
    let token = match headers.get(AUTHORIZATION) {
        Some(value) => {
            let bearer = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| {
                ApiError::unauthenticated("the Authorization header is not `Bearer <token>`")
            })?;
            tokens.authenticate(bearer.trim())?
        }
        None => match session_token(headers) {
            Some(session) => {
                if !headers.contains_key(CSRF_HEADER) {
                    return Err(ApiError::forbidden(format!(
                        "a request authenticated by the session cookie must carry the {CSRF_HEADER} header"
                    )));
                }
                tokens.authenticate(&session)?
            }
            None => {
                return Err(ApiError::unauthenticated(
                    "this endpoint needs a bearer token (Authorization: Bearer hodei_...) or a session",
                ));
            }
        },
    };
    if !token.role.allows(needed) {
        return Err(ApiError::forbidden(format!(
            "token `{}` is a {} token; this needs {needed}",
            token.name, token.role
        )));
    }
    Ok(token)
}

/// The token in the session cookie, if the request has one.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('=').map(str::to_owned))
}

/// The `Set-Cookie` value of a session holding `bearer`; `secure` when served over TLS.
pub(crate) fn session_cookie(bearer: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={bearer}; HttpOnly; SameSite=Strict; Path=/{secure}")
}

/// The `Set-Cookie` value that ends a session.
pub(crate) fn ended_session_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}")
}
