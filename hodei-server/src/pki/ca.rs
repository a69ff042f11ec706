//! The embedded CA: its files, the certificates it signs, and reading worker ids back.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::{PkiError, Result, validate_worker_id};
use hodei_agent::pki::{
    CertificateSerial, TlsIdentity, WORKER_URI_PREFIX, WorkerCertificate, hex, parse_certs, random_bytes,
};

/// The CA's private key (PKCS#8 PEM, mode 0600) in the PKI directory.
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// The CA's certificate (PEM) in the PKI directory.
pub const CA_CERT_FILE: &str = "ca.cert.pem";

/// Long, because replacing the CA means registering every worker again.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Certificates start this much before they are issued, so that a peer whose clock is a little
/// behind does not see them as not yet valid.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Validity {
    /// From `not_before` to `not_after`, which may both be in the past (to test expiry).
    pub fn new(not_before: SystemTime, not_after: SystemTime) -> Result<Self> {
        if not_after <= not_before {
            return Err(PkiError::InvalidValidity);
        }
        Ok(Self { not_before, not_after })
    }

    /// Valid for `ttl` from `now`, and a few minutes before it for clock skew.
    pub fn starting_at(now: SystemTime, ttl: Duration) -> Result<Self> {
        let not_before = now.checked_sub(CLOCK_SKEW).ok_or(PkiError::TimeOutOfRange("validity start"))?;
        let not_after = now.checked_add(ttl).ok_or(PkiError::TimeOutOfRange("validity end"))?;
        Self::new(not_before, not_after)
    }

    /// The first instant of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The last instant of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// The embedded CA of the control plane, persisted in a directory.
pub struct CertificateAuthority {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Issuer's Debug already leaves the key out.
        f.debug_struct("CertificateAuthority").field("dir", &self.dir).field("issuer", &self.issuer).finish()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, or creates one there (valid from `now`) if the directory holds
    /// none. One of the two files without the other is [`PkiError::IncompleteCa`]; an unreadable
    /// one is [`PkiError::CorruptFile`]. Neither is ever replaced.
    pub fn open_or_create(dir: &Path, now: SystemTime) -> Result<Self> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        match (crate::files::read_optional(&key_path)?, crate::files::read_optional(&cert_path)?) {
            (Some(key_pem), Some(cert_pem)) => Self::load(dir, &key_pem, cert_pem),
            (None, None) => Self::create(dir, now),
            (Some(_), None) => Err(PkiError::IncompleteCa { present: key_path, missing: cert_path }),
            (None, Some(_)) => Err(PkiError::IncompleteCa { present: cert_path, missing: key_path }),
        }
    }

    fn create(dir: &Path, now: SystemTime) -> Result<Self> {
        let (key_pem, cert_pem) = Self::generate(now)?;
        crate::files::create_private_dir(dir)?;
        crate::files::write_atomically(&dir.join(CA_KEY_FILE), key_pem.as_bytes(), 0o600)?;
        crate::files::write_atomically(&dir.join(CA_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "created the control-plane CA");
        // Through the same path as a reopen, so that what was written is what is used.
        Self::load(dir, &key_pem, cert_pem)
    }

    /// A new CA, valid from `now`: its key and certificate, PEM.
    pub(super) fn generate(now: SystemTime) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(PkiError::Generation)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // A random suffix so that two hubs' CAs never share a name, which would make a client
        // certificate from one look like it came from the other until its signature is checked.
        let suffix = hex(&random_bytes::<4>()?);
        params.distinguished_name.push(DnType::CommonName, format!("Hodei control-plane CA {suffix}"));
        params.distinguished_name.push(DnType::OrganizationName, "Hodei");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from_slice(CertificateSerial::random()?.as_bytes()));
        apply_validity(&mut params, Validity::starting_at(now, CA_LIFETIME)?);
        let cert = params.self_signed(&key).map_err(PkiError::Generation)?;
        Ok((key.serialize_pem(), cert.pem()))
    }

    /// The CA of `key_pem` and `cert_pem`, checked as a reopened one is; `dir` names where
    /// they were read from in errors.
    pub(super) fn load(dir: &Path, key_pem: &str, cert_pem: String) -> Result<Self> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let corrupt = |path: &Path, reason: String| PkiError::CorruptFile { path: path.to_owned(), reason };
        warn_if_readable_by_others(&key_path);

        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| corrupt(&key_path, format!("not a PEM private key ({e})")))?;
        let mut certs = parse_certs(&cert_pem, "CA certificate")
            .map_err(|e| corrupt(&cert_path, format!("not a PEM certificate ({e})")))?;
        if certs.len() != 1 {
            return Err(corrupt(&cert_path, format!("{} certificates where one was expected", certs.len())));
        }
        let cert_der = certs.swap_remove(0);
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| corrupt(&cert_path, format!("not an X.509 certificate ({e})")))?;
        if !x509.is_ca() {
            return Err(corrupt(&cert_path, "not a CA certificate".into()));
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(corrupt(&cert_path, format!("its public key does not match {}", key_path.display())));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| corrupt(&cert_path, format!("not usable as an issuer ({e})")))?;
        Ok(Self { dir: dir.to_owned(), issuer, cert_pem, cert_der })
    }

    /// The directory the CA lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Signs a client certificate for `worker_id` over the CSR's public key, valid for
    /// `validity`. Only the CSR's key (and its proof of possession) is used: its subject and
    /// extensions are ignored, the id comes from the caller.
    ///
    /// This is the bare signing step, with no token or revocation check: the hub goes through
    /// [`HubPki::register`](super::HubPki::register) and [`HubPki::rotate`](super::HubPki::rotate).
    pub fn sign_worker_csr(
        &self,
        worker_id: &str,
        csr_pem: &str,
        validity: Validity,
    ) -> Result<WorkerCertificate> {
        validate_worker_id(worker_id)?;
        self.sign_worker(worker_id, &parse_csr(csr_pem)?, validity)
    }

    pub(super) fn sign_worker(
        &self,
        worker_id: &str,
        csr: &CertificateSigningRequestParams,
        validity: Validity,
    ) -> Result<WorkerCertificate> {
        let uri = format!("{WORKER_URI_PREFIX}{worker_id}");
        let uri = uri.try_into().map_err(|e: rcgen::Error| PkiError::Generation(e))?;
        let params =
            leaf_params(worker_id, vec![SanType::URI(uri)], ExtendedKeyUsagePurpose::ClientAuth, validity)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer).map_err(PkiError::Generation)?;
        WorkerCertificate::from_pem(&cert.pem())
    }

    /// A server certificate and fresh key for the hub, for `names` (IP addresses or DNS names).
    pub fn issue_server_identity(&self, names: &[&str], validity: Validity) -> Result<TlsIdentity> {
        if names.is_empty() {
            return Err(PkiError::InvalidServerName { name: String::new(), reason: "no name given".into() });
        }
        let sans = names
            .iter()
            .map(|name| {
                let invalid = |e: rcgen::Error| PkiError::InvalidServerName {
                    name: (*name).to_owned(),
                    reason: e.to_string(),
                };
                CertificateParams::new(vec![(*name).to_owned()]).map(|p| p.subject_alt_names).map_err(invalid)
            })
            .collect::<Result<Vec<_>>>()?
            .concat();
        let params = leaf_params("Hodei control plane", sans, ExtendedKeyUsagePurpose::ServerAuth, validity)?;
        let key = KeyPair::generate().map_err(PkiError::Generation)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(PkiError::Generation)?;
        TlsIdentity::from_pem(&cert.pem(), &key.serialize_pem())
    }
}

/// The parameters common to worker and server certificates; `usage` keeps each to its role, so
/// that a worker certificate cannot serve TLS and the hub's cannot pass for a worker.
fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    validity: Validity,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(CertificateSerial::random()?.as_bytes()));
    apply_validity(&mut params, validity);
    Ok(params)
}

fn apply_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path)
        && metadata.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the CA key is readable by other users; it should be mode 0600");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Parses a CSR (PEM) and checks its signature, which proves the requester holds the key.
pub(super) fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams> {
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::InvalidCsr { reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hodei_agent::pki::{AgentKey, check_peer_worker_id, worker_id_from_certificate};
    use x509_parser::extensions::GeneralName;

    fn ca() -> (tempfile::TempDir, CertificateAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::open_or_create(&dir.path().join("pki"), SystemTime::now()).unwrap();
        (dir, ca)
    }

    fn hour() -> Validity {
        Validity::starting_at(SystemTime::now(), Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn the_csr_subject_is_not_trusted() {
        let (_dir, ca) = ca();
        // A CSR that asks for another identity in every field it can.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "admin");
        params.subject_alt_names.push(SanType::URI("hodei://worker/admin".try_into().unwrap()));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let cert = ca.sign_worker_csr("w-1", &csr, hour()).unwrap();
        assert_eq!(cert.worker_id, "w-1");
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.cert_der).unwrap();
        assert!(!x509.is_ca());
        let sans = x509.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names, vec![GeneralName::URI("hodei://worker/w-1")]);
        assert_eq!(x509.public_key().raw, key.subject_public_key_info().as_slice());
    }

    #[test]
    fn bad_csrs_are_typed_errors() {
        let (_dir, ca) = ca();
        assert!(matches!(ca.sign_worker_csr("w-1", "not a csr", hour()), Err(PkiError::InvalidCsr { .. })));
        let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();
        let mut tampered = csr.into_bytes();
        let middle = tampered.len() / 2;
        tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(matches!(ca.sign_worker_csr("w-1", &tampered, hour()), Err(PkiError::InvalidCsr { .. })));
        let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();
        assert!(matches!(ca.sign_worker_csr("a/b", &csr, hour()), Err(PkiError::InvalidWorkerId { .. })));
    }

    #[test]
    fn a_reopened_ca_is_the_same_ca() {
        let (dir, ca) = ca();
        let again = CertificateAuthority::open_or_create(&dir.path().join("pki"), SystemTime::now()).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());
    }

    #[test]
    fn a_ca_with_one_file_missing_is_incomplete() {
        let (dir, _ca) = ca();
        let pki = dir.path().join("pki");
        std::fs::remove_file(pki.join(CA_CERT_FILE)).unwrap();
        let err = CertificateAuthority::open_or_create(&pki, SystemTime::now()).unwrap_err();
        assert!(matches!(err, PkiError::IncompleteCa { ref missing, .. } if missing.ends_with(CA_CERT_FILE)));
        // Nothing was replaced.
        assert!(!pki.join(CA_CERT_FILE).exists());
    }

    #[test]
    fn a_ca_cert_for_another_key_is_corrupt() {
        let (dir, _ca) = ca();
        let (_other_dir, other) = ca();
        let pki = dir.path().join("pki");
        std::fs::write(pki.join(CA_CERT_FILE), other.cert_pem()).unwrap();
        let err = CertificateAuthority::open_or_create(&pki, SystemTime::now()).unwrap_err();
        assert!(
            matches!(err, PkiError::CorruptFile { ref path, .. } if path.ends_with(CA_CERT_FILE)),
            "{err}"
        );
    }

    #[test]
    fn server_names_are_checked() {
        let (_dir, ca) = ca();
        assert!(ca.issue_server_identity(&["127.0.0.1", "localhost", "::1"], hour()).is_ok());
        for bad in [&[][..], &["bad name é"][..]] {
            assert!(matches!(ca.issue_server_identity(bad, hour()), Err(PkiError::InvalidServerName { .. })));
        }
    }

    #[test]
    fn validity_must_end_after_it_starts() {
        let t = SystemTime::now();
        assert!(matches!(Validity::new(t, t), Err(PkiError::InvalidValidity)));
        assert!(Validity::starting_at(t, Duration::MAX).is_err());
    }
    #[test]
    fn worker_ids_are_read_back_and_compared() {
        let (_dir, ca) = ca();
        let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();
        let cert = ca.sign_worker_csr("w-1", &csr, hour()).unwrap();
        assert_eq!(worker_id_from_certificate(&cert.cert_der).unwrap(), "w-1");
        assert!(check_peer_worker_id(&cert.cert_der, "w-1").is_ok());
        assert!(matches!(
            check_peer_worker_id(&cert.cert_der, "w-2"),
            Err(PkiError::WorkerIdMismatch { ref certified, .. }) if certified == "w-1"
        ));
        assert!(matches!(worker_id_from_certificate(b"junk"), Err(PkiError::InvalidCertificate { .. })));
        // A certificate without a worker URI: the CA's own.
        assert!(matches!(worker_id_from_certificate(ca.cert_der()), Err(PkiError::NoWorkerId)));
        let reread = WorkerCertificate::from_pem(&cert.cert_pem).unwrap();
        assert_eq!((&reread.serial, reread.not_after), (&cert.serial, cert.not_after));
        assert!(cert.renew_at() > cert.not_before && cert.renew_at() < cert.not_after);
    }
}
