//! The API's errors: an HTTP status, a stable machine-readable code and a sentence for people.
//!
//! Every refusal is a JSON body `{"error": {"code": "...", "message": "..."}}`. Codes are part
//! of the API's contract (scripts match on them); messages may be reworded. Bad input is always
//! a 4xx: only a failure of the control plane itself (its store, its disk) is a 5xx.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::tokens::TokenError;
use crate::logstore::LogStoreError;

/// An error the API answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// The JSON body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A stable code and a message.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthenticated`, `forbidden`, `not_found`, `invalid_request`,
    /// `invalid_input`, `conflict`, `invalid_state`, `payload_too_large`, `unavailable`,
    /// `internal`.
    pub code: String,
    /// For people; may change between releases.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub(crate) fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub(crate) fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_state", message)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "operator API request failed");
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message } };
        (self.status, Json(body)).into_response()
    }
}

impl From<hodei_core::Error> for ApiError {
    fn from(error: hodei_core::Error) -> Self {
        use hodei_core::Error as E;
        let message = error.to_string();
        match error {
            E::SagaNotFound(_) | E::UnknownSaga { .. } => Self::not_found(message),
            E::InvalidSagaId { .. } | E::InvalidActor { .. } => Self::invalid_request(message),
            E::InvalidInput { .. } | E::Codec { .. } => Self::invalid_input(message),
            E::PayloadTooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            E::IdempotencyConflict { .. } => Self::conflict(message),
            E::SagaFinished(_) | E::Fork { .. } | E::InvalidState { .. } | E::NothingToRetry(_) => {
                Self::invalid_state(message)
            }
            E::ShuttingDown | E::EngineStopped(_) => Self::unavailable(message),
            _ => Self::internal(message),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(error: TokenError) -> Self {
        let message = error.to_string();
        match error {
            TokenError::InvalidName(_) | TokenError::UnknownRole(_) => Self::invalid_request(message),
            TokenError::NameTaken(_) => Self::conflict(message),
            TokenError::Malformed | TokenError::Unknown | TokenError::Revoked(_) => {
                Self::unauthenticated(message)
            }
            TokenError::Shared { .. } => Self::unavailable(message),
            _ => Self::internal(message),
        }
    }
}

impl From<LogStoreError> for ApiError {
    fn from(error: LogStoreError) -> Self {
        let message = error.to_string();
        match error {
            LogStoreError::InvalidJobId { .. } => Self::invalid_request(message),
            _ => Self::internal(message),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::BytesRejection(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", rejection.body_text())
            }
            _ => Self::invalid_request(rejection.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::invalid_request(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::invalid_request(rejection.body_text())
    }
}
