//! The agent's side of provisioning: its own key and CSR.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use super::certificate::WORKER_URI_PREFIX;
use super::{PkiError, Result, TlsIdentity, WorkerCertificate, validate_worker_id};

/// The agent's private key (ECDSA P-256), made on the worker so that it never travels.
pub struct AgentKey {
    key: KeyPair,
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentKey").field("algorithm", self.key.algorithm()).finish_non_exhaustive()
    }
}

impl AgentKey {
    /// A fresh key pair.
    pub fn generate() -> Result<Self> {
        KeyPair::generate().map(|key| Self { key }).map_err(PkiError::Generation)
    }

    /// A key the agent stored before (PKCS#8 PEM).
    pub fn from_pem(pem: &str) -> Result<Self> {
        KeyPair::from_pem(pem)
            .map(|key| Self { key })
            .map_err(|e| PkiError::InvalidPem { what: "agent private key", reason: e.to_string() })
    }

    /// The key as PKCS#8 PEM, to store (mode 0600) across agent restarts.
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A CSR (PEM) for `worker_id`. The hub ignores its subject and takes the id from the token or
    /// the presented certificate; the request names it anyway so that it reads right to a person.
    pub fn csr_pem(&self, worker_id: &str) -> Result<String> {
        validate_worker_id(worker_id)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, worker_id);
        let uri = format!("{WORKER_URI_PREFIX}{worker_id}").try_into().map_err(PkiError::Generation)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.serialize_request(&self.key).and_then(|csr| csr.pem()).map_err(PkiError::Generation)
    }

    /// The client identity made of this key and the certificate the hub issued for it.
    pub fn identity(&self, certificate: &WorkerCertificate) -> Result<TlsIdentity> {
        TlsIdentity::from_pem(&certificate.cert_pem, &self.private_key_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_ones_are_typed_errors() {
        let key = AgentKey::generate().unwrap();
        let again = AgentKey::from_pem(&key.private_key_pem()).unwrap();
        assert_eq!(key.private_key_pem(), again.private_key_pem());
        let truncated = &key.private_key_pem()[..40];
        assert!(matches!(AgentKey::from_pem(truncated), Err(PkiError::InvalidPem { .. })));
        assert!(matches!(key.csr_pem(""), Err(PkiError::InvalidWorkerId { .. })));
        assert!(key.csr_pem("w-1").unwrap().starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    }
}
