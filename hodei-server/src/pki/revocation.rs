//! The revocation set, its file, and the verifier that enforces it at the handshake.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::{PkiError, Result, validate_worker_id};
use hodei_agent::pki::{CertificateSerial, ParsedWorkerCert, parse_worker_cert};

/// What the handshake asks of revocations: a local set, or the shared one in the database.
pub(super) trait RevocationCheck: std::fmt::Debug + Send + Sync {
    /// Refuses `cert` if it, or its worker, is revoked.
    fn check(&self, cert: &ParsedWorkerCert) -> Result<()>;
}

impl RevocationCheck for Revocations {
    fn check(&self, cert: &ParsedWorkerCert) -> Result<()> {
        self.check_worker(&cert.worker_id)?;
        if self.set.read().unwrap_or_else(PoisonError::into_inner).serials.contains(&cert.serial) {
            return Err(PkiError::CertificateRevoked(cert.serial.clone()));
        }
        Ok(())
    }
}

/// The revocation set in the PKI directory: one `worker <id>` or `serial <hex>` a line.
pub const REVOCATIONS_FILE: &str = "revoked.txt";

#[derive(Debug, Clone, Default)]
pub(super) struct RevocationSet {
    pub(super) workers: BTreeSet<String>,
    pub(super) serials: BTreeSet<CertificateSerial>,
}

impl RevocationSet {
    fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut set = Self::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let corrupt = |reason: String| PkiError::CorruptFile {
                path: path.to_owned(),
                reason: format!("line {}: {reason}", number + 1),
            };
            match line.split_once(' ') {
                Some(("worker", id)) => {
                    validate_worker_id(id).map_err(|e| corrupt(e.to_string()))?;
                    set.workers.insert(id.to_owned());
                }
                Some(("serial", serial)) => {
                    set.serials.insert(serial.parse().map_err(|e: PkiError| corrupt(e.to_string()))?);
                }
                _ => return Err(corrupt(format!("{line:?} is neither `worker <id>` nor `serial <hex>`"))),
            }
        }
        Ok(set)
    }

    fn render(&self) -> String {
        let mut text =
            String::from("# Revoked Hodei workers and certificates, written by the control plane.\n");
        for id in &self.workers {
            let _ = writeln!(text, "worker {id}");
        }
        for serial in &self.serials {
            let _ = writeln!(text, "serial {serial}");
        }
        text
    }
}

/// The revocation set, shared by the hub and every verifier it made, and its file.
#[derive(Debug)]
pub(super) struct Revocations {
    path: PathBuf,
    set: RwLock<RevocationSet>,
}

impl Revocations {
    /// Loads the set from `dir`; no file is an empty set.
    pub(super) fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(REVOCATIONS_FILE);
        let set = match crate::files::read_optional(&path)? {
            Some(text) => RevocationSet::parse(&text, &path)?,
            None => RevocationSet::default(),
        };
        Ok(Self { path, set: RwLock::new(set) })
    }

    pub(super) fn check_worker(&self, worker_id: &str) -> Result<()> {
        if self.set.read().unwrap_or_else(PoisonError::into_inner).workers.contains(worker_id) {
            return Err(PkiError::WorkerRevoked(worker_id.to_owned()));
        }
        Ok(())
    }

    /// Applies `change` and, if it changed anything, writes the file before the new set takes
    /// effect: a revocation that was not persisted is reported as failed, not kept in memory only
    /// to vanish at the next restart.
    pub(super) fn update(&self, change: impl FnOnce(&mut RevocationSet) -> bool) -> Result<bool> {
        // Held across the write so that two revocations cannot persist out of order.
        let mut current = self.set.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = current.clone();
        if !change(&mut next) {
            return Ok(false);
        }
        if let Some(dir) = self.path.parent() {
            crate::files::create_private_dir(dir)?;
        }
        crate::files::write_atomically(&self.path, next.render().as_bytes(), 0o600)?;
        *current = next;
        Ok(true)
    }
}

/// rustls's webpki verifier, then the revocation set.
#[derive(Debug)]
pub(super) struct RevocationCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<dyn RevocationCheck>,
}

impl RevocationCheckingVerifier {
    pub(super) fn new(inner: Arc<dyn ClientCertVerifier>, revocations: Arc<dyn RevocationCheck>) -> Self {
        Self { inner, revocations }
    }
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        // Only after the chain checks out: before that, the contents are the peer's say-so.
        let parsed = parse_worker_cert(end_entity).map_err(|e| {
            tracing::warn!(error = %e, "client certificate from the CA carries no usable worker id");
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        self.revocations.check(&parsed).map_err(|e| {
            tracing::warn!(worker = %parsed.worker_id, serial = %parsed.serial, error = %e, "handshake refused");
            rustls::Error::InvalidCertificate(CertificateError::Revoked)
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let revocations = Revocations::load(dir.path()).unwrap();
        let serial: CertificateSerial = "0a0b".parse().unwrap();
        assert!(revocations.update(|set| set.workers.insert("w-1".into())).unwrap());
        assert!(revocations.update(|set| set.serials.insert(serial.clone())).unwrap());
        assert!(!revocations.update(|set| set.workers.insert("w-1".into())).unwrap());

        let reloaded = Revocations::load(dir.path()).unwrap();
        assert!(matches!(reloaded.check_worker("w-1"), Err(PkiError::WorkerRevoked(_))));
        assert!(reloaded.check_worker("w-2").is_ok());
        let cert = ParsedWorkerCert {
            worker_id: "w-2".into(),
            serial,
            not_before: std::time::UNIX_EPOCH,
            not_after: std::time::UNIX_EPOCH,
        };
        assert!(matches!(reloaded.check(&cert), Err(PkiError::CertificateRevoked(_))));
    }

    #[test]
    fn a_corrupt_file_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["worker a/b\n", "serial zz\n", "ban w-1\n", "worker\n"] {
            std::fs::write(dir.path().join(REVOCATIONS_FILE), bad).unwrap();
            let err = Revocations::load(dir.path()).unwrap_err();
            assert!(
                matches!(err, PkiError::CorruptFile { ref reason, .. } if reason.starts_with("line 1")),
                "{err}"
            );
        }
    }
}
