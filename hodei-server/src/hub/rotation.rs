//! Certificate rotation on an open session: the agent's new key certified while its current
//! certificate is still good.

use super::registration::unix_ms;
use super::task::{Flow, SessionTask};
use hodei_agent::protocol::v1::{self, hub_message};

impl SessionTask {
    /// Issues a new certificate for the key the agent generated, if its current certificate
    /// still passes the handshake's checks. A refusal is logged and not answered: the agent
    /// keeps its certificate and asks again on its next session.
    pub(super) async fn rotate(&mut self, request: v1::RotateRequest) -> Flow {
        let (pki, peer) = (self.pki.clone(), self.peer.clone());
        let worker = self.guard.worker_id.clone();
        // Parsing the CSR and signing are CPU work; keep them off the reactor threads.
        let issued = tokio::task::spawn_blocking(move || pki.rotate(&peer, &request.csr_pem)).await;
        match issued {
            Ok(Ok(certificate)) if certificate.worker_id == worker => {
                let response = v1::RotateResponse {
                    not_after_unix_ms: unix_ms(certificate.not_after),
                    certificate_pem: certificate.cert_pem,
                };
                self.send(hub_message::Kind::Rotate(response)).await
            }
            Ok(Ok(certificate)) => {
                tracing::warn!(worker, issued_for = %certificate.worker_id, "rotation refused: the CSR's certificate is for another worker");
                Flow::Continue(())
            }
            Ok(Err(error)) => {
                tracing::warn!(worker, %error, "certificate rotation refused");
                Flow::Continue(())
            }
            Err(error) => {
                tracing::error!(worker, %error, "certificate rotation task failed");
                Flow::Continue(())
            }
        }
    }
}
