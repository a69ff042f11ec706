//! The operator API: what operators use to watch and steer Hodei from outside its process.
//!
//! [`ApiServer`] serves HTTP/JSON (server-sent events for anything that follows) from the
//! user's own process, over an [`Engine`](hodei_core::Engine) alone or a whole
//! [`Node`](crate::Node): runs (start, list, get, journal, follow), the operator verbs (signal,
//! cancel, fork, pause, resume, retry), replay checks and journal export, job logs, workers,
//! tokens and webhooks. Its OpenAPI
//! document ([`openapi_document`]) is served at `/api/v1/openapi.json`.
//!
//! Every endpoint but the health check and the document needs a bearer token ([`tokens`]);
//! what an operator does is journaled under the token's name. The API binds 127.0.0.1 unless
//! told otherwise, and refuses a non-loopback address without TLS. Errors are JSON with a
//! stable code ([`ErrorBody`]).

mod admin;
mod auth;
mod dashboard;
mod error;
mod logs;
mod metrics;
pub mod model;
mod openapi;
mod replay;
mod requests;
mod runs;
mod server;
pub mod signature;
mod time;
pub mod tokens;
#[cfg(feature = "postgres")]
mod tokens_shared;
mod view;
mod webhooks;
mod workers;

pub use auth::{CSRF_HEADER, SESSION_COOKIE};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use metrics::MetricsAccess;
pub use openapi::{ApiDoc, openapi_document};
pub use server::{ApiServeError, ApiServer, ApiServerBuilder, DEFAULT_ADDR, MAX_BODY_BYTES, tls_config};
pub use signature::{SIGNATURE_HEADER, SignatureError, verify_signature};
pub use tokens::{ApiToken, IssuedToken, Role, TokenError, TokenStore};
pub use webhooks::{Webhook, WebhookRequest};
