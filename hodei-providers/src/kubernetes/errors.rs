//! The provider's typed errors, and how a failed API call becomes one.

use super::{KubernetesProvider, NAME};
use crate::provider::ProviderError;

impl KubernetesProvider {
    pub(super) fn invalid(&self, reason: impl Into<String>) -> ProviderError {
        ProviderError::InvalidSpec { provider: NAME.to_owned(), reason: reason.into() }
    }

    /// The typed error for a failed API call: the API server's reason, code and message are kept.
    pub(super) fn classify(&self, action: &str, error: kube::Error) -> ProviderError {
        match error {
            kube::Error::Api(status) => {
                let said = format!("{action}: {} ({}): {}", status.reason, status.code, status.message);
                match status.code {
                    // Rejected as asked: invalid objects, a missing namespace, missing RBAC
                    // rights. Asking again changes nothing.
                    400 | 401 | 403 | 404 | 409 | 422 => self.invalid(said),
                    _ => ProviderError::Infrastructure { provider: NAME.to_owned(), reason: said },
                }
            }
            kube::Error::HyperError(e) => self.unreachable(action, e.to_string()),
            kube::Error::Service(e) => self.unreachable(action, e.to_string()),
            other => ProviderError::Infrastructure {
                provider: NAME.to_owned(),
                reason: format!("{action}: {other}"),
            },
        }
    }

    fn unreachable(&self, action: &str, reason: String) -> ProviderError {
        ProviderError::Unreachable {
            provider: NAME.to_owned(),
            endpoint: "the Kubernetes API server".to_owned(),
            reason: format!("{action}: {reason}"),
        }
    }
}
