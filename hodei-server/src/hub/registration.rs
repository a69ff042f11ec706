//! Registration: a new agent trades its one-time token and CSR for a certificate, over TLS that
//! authenticates the hub only.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pki::{HubPki, PkiError};
use hodei_agent::protocol::v1::control_plane_server::ControlPlane;
use hodei_agent::protocol::v1::{AgentMessage, HubMessage, RegisterRequest, RegisterResponse};
use hodei_agent::protocol::{PROTOCOL, negotiate};

/// `Register`, on the listener that asks for no client certificate.
#[derive(Debug)]
pub(super) struct RegistrationService {
    pub(super) pki: Arc<HubPki>,
}

#[tonic::async_trait]
impl ControlPlane for RegistrationService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.into_inner();
        let protocol = negotiate(PROTOCOL, request.protocol)?;
        let pki = self.pki.clone();
        let worker_id = request.worker_id.clone();
        // Parsing the CSR and signing are CPU work; keep them off the reactor threads.
        let certificate = tokio::task::spawn_blocking(move || {
            pki.register(&request.token, &request.worker_id, &request.csr_pem)
        })
        .await
        .map_err(|e| {
            tracing::error!(worker = %worker_id, error = %e, "registration task failed");
            Status::internal("registration failed")
        })?
        .map_err(|e| registration_status(&worker_id, e))?;
        let not_after_unix_ms = unix_ms(certificate.not_after);
        Ok(Response::new(RegisterResponse {
            protocol: Some(protocol),
            certificate_pem: certificate.cert_pem,
            not_after_unix_ms,
        }))
    }

    type SessionStream = ReceiverStream<Result<HubMessage, Status>>;

    async fn session(
        &self,
        _: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unauthenticated("sessions need a client certificate: use the session listener"))
    }
}

/// The status for a refused registration. PkiError messages never contain the token.
fn registration_status(worker_id: &str, error: PkiError) -> Status {
    match error {
        PkiError::UnknownToken
        | PkiError::TokenReplayed
        | PkiError::TokenExpired
        | PkiError::TokenWrongWorker { .. } => {
            tracing::warn!(worker = worker_id, error = %error, "registration refused");
            Status::unauthenticated(error.to_string())
        }
        PkiError::WorkerRevoked(_) => {
            tracing::warn!(worker = worker_id, error = %error, "registration refused");
            Status::permission_denied(error.to_string())
        }
        PkiError::InvalidCsr { .. } | PkiError::InvalidWorkerId { .. } => {
            Status::invalid_argument(error.to_string())
        }
        other => {
            // The hub's own failure: the details are for its log, not for the agent.
            tracing::error!(worker = worker_id, error = %other, "registration failed");
            Status::internal("registration failed on the control plane")
        }
    }
}

pub(super) fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).ok().and_then(|d| i64::try_from(d.as_millis()).ok()).unwrap_or(i64::MAX)
}
