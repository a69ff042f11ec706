//! The provider's typed errors, and how a failed Firecracker API call becomes one.

use super::ApiError;
use super::provider::PROVIDER;
use crate::provider::ProviderError;

pub(super) fn api_error(error: ApiError) -> ProviderError {
    match &error {
        ApiError::Rejected { status, .. } if status.is_client_error() => invalid(error.to_string()),
        ApiError::Connect { socket, source } => ProviderError::Unreachable {
            provider: PROVIDER.to_owned(),
            endpoint: socket.display().to_string(),
            reason: source.to_string(),
        },
        _ => infra(error.to_string()),
    }
}

pub(super) fn invalid(reason: impl Into<String>) -> ProviderError {
    ProviderError::InvalidSpec { provider: PROVIDER.to_owned(), reason: reason.into() }
}

pub(super) fn infra(reason: impl Into<String>) -> ProviderError {
    ProviderError::Infrastructure { provider: PROVIDER.to_owned(), reason: reason.into() }
}
