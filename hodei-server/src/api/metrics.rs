//! `/metrics`: Hodei's [`Metrics`] for Prometheus, and who may scrape them.

use std::fmt;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use hodei_agent::pki::constant_time_eq;

use super::auth::authorize;
use super::error::{ApiError, ErrorBody};
use super::server::ApiState;
use super::tokens::{Role, digest};
use crate::metrics::{self, Metrics, Sources};

/// Who may read `/metrics` ([`ApiServerBuilder::metrics_access`]).
///
/// [`ApiServerBuilder::metrics_access`]: super::ApiServerBuilder::metrics_access
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum MetricsAccess {
    /// Any of the API's tokens (viewer or admin), as `Authorization: Bearer ...`. The default.
    #[default]
    ApiTokens,
    /// A scrape token of its own (Prometheus' `authorization: {credentials: ...}`), which
    /// reads `/metrics` and nothing else; the API's tokens still may.
    ScrapeToken(String),
    /// No token. Only on a loopback address: the server refuses to start with it elsewhere
    /// ([`ApiServeError::OpenMetrics`](super::ApiServeError::OpenMetrics)).
    Open,
}

impl fmt::Debug for MetricsAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAccess::ApiTokens => f.write_str("ApiTokens"),
            MetricsAccess::ScrapeToken(_) => f.write_str("ScrapeToken(..)"),
            MetricsAccess::Open => f.write_str("Open"),
        }
    }
}

/// The access as the handler checks it: a scrape token only as its digest.
#[derive(Debug, Clone)]
pub(crate) enum Scrapers {
    ApiTokens,
    ScrapeToken([u8; 32]),
    Open,
}

impl From<&MetricsAccess> for Scrapers {
    fn from(access: &MetricsAccess) -> Self {
        match access {
            MetricsAccess::ApiTokens => Scrapers::ApiTokens,
            MetricsAccess::ScrapeToken(token) => Scrapers::ScrapeToken(digest(token.as_bytes())),
            MetricsAccess::Open => Scrapers::Open,
        }
    }
}

impl Scrapers {
    fn admit(&self, state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
        let scrape_token = match self {
            Scrapers::Open => return Ok(()),
            Scrapers::ApiTokens => None,
            Scrapers::ScrapeToken(expected) => Some(expected),
        };
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if let (Some(expected), Some(bearer)) = (scrape_token, bearer)
            && constant_time_eq(expected, &digest(bearer.trim().as_bytes()))
        {
            return Ok(());
        }
        authorize(&state.tokens, headers, Role::Viewer).map(drop)
    }
}

/// The metrics in Prometheus' text format.
///
/// Needs a token unless the server was built with open metrics (`MetricsAccess`): one of the
/// API's tokens, or its scrape token.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses(
        (status = 200, description = "Prometheus' text exposition format, version 0.0.4", body = String,
            content_type = "text/plain"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "This server serves no metrics", body = ErrorBody),
    ),
    security((), ("bearer" = [])))]
pub(crate) async fn scrape(State(state): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.scrapers.admit(&state, &headers)?;
    let metrics: &Metrics = state.metrics.as_ref().ok_or_else(|| {
        ApiError::not_found("this server serves no metrics: give it some (ApiServerBuilder::metrics)")
    })?;
    let sources =
        Sources { engine: &state.engine, scheduler: state.scheduler.as_ref(), hub: state.hub.as_ref() };
    Ok(([(CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics.encode(sources)).into_response())
}
