//! Certificate rotation: asking the hub for a certificate for a new key, and taking its answer.

use tokio::sync::mpsc;

use super::credentials::store;
use super::pump::message;
use super::settings::Settings;
use super::status::say;
use super::worker::Worker;
use crate::pki::{AgentKey, WorkerCertificate};
use crate::protocol::v1::{self, AgentMessage, agent_message};

impl Worker {
    /// Asks the hub for a certificate for a new key, kept until the hub answers; once per session
    /// ([`Worker::rotation_asked`]). The error, when no key could be made, ends the session.
    pub(super) fn ask_rotation(
        &mut self,
        settings: &Settings,
        control: &mpsc::UnboundedSender<AgentMessage>,
    ) -> Result<(), String> {
        self.rotation_asked = true;
        match AgentKey::generate().and_then(|key| Ok((key.csr_pem(&settings.worker_id)?, key))) {
            Ok((csr_pem, key)) => {
                say(
                    settings.status_to_stderr,
                    format_args!("rotating the certificate (valid until {:?})", self.certificate.not_after),
                );
                self.rotating = Some(key);
                let _ = control.send(message(agent_message::Kind::Rotate(v1::RotateRequest { csr_pem })));
                Ok(())
            }
            Err(e) => Err(format!("could not make a key to rotate the certificate: {e}")),
        }
    }

    /// Takes the hub's new certificate, if it is for the key this session asked with, stores
    /// it, and uses it from the next session on (this one stays up with the old one).
    pub(super) fn rotated(
        &mut self,
        settings: &Settings,
        response: v1::RotateResponse,
    ) -> Result<(), String> {
        let key = self.rotating.take().ok_or("a certificate nobody asked for")?;
        let certificate =
            WorkerCertificate::from_pem(&response.certificate_pem).map_err(|e| e.to_string())?;
        if certificate.worker_id != settings.worker_id {
            return Err(format!("the certificate is for worker `{}`", certificate.worker_id));
        }
        let identity = key.identity(&certificate).map_err(|e| e.to_string())?;
        store(settings, &key, &certificate).map_err(|e| e.to_string())?;
        self.identity = identity;
        self.certificate = certificate;
        Ok(())
    }
}
