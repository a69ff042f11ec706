//! Worker certificates as both sides read them: the serial, the worker id in the URI SAN, and
//! the validity. Signing them is the control plane's CA (`hodei-server`).

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::tls::parse_certs;
use super::{
    PkiError, Result, constant_time_eq, hex, random_bytes, time_from_unix, unhex, validate_worker_id,
};

/// Where the worker id goes in a worker certificate's URI SAN.
pub const WORKER_URI_PREFIX: &str = "hodei://worker/";

/// A certificate serial number, shown and parsed as lowercase hex.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CertificateSerial(Vec<u8>);

impl CertificateSerial {
    /// The serial with these big-endian bytes. Leading zero bytes are dropped, so that the same
    /// number has one form whichever way it was encoded.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        Self(bytes[first..].to_vec())
    }

    /// The big-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A fresh serial: random rather than rcgen's default, which is derived from the public key
    /// and so would repeat when a worker rotates with the same key (revoking one serial would
    /// then revoke both).
    pub fn random() -> Result<Self> {
        let mut bytes = random_bytes::<16>()?;
        // Positive and without a leading zero, so that DER stores these exact bytes.
        bytes[0] = (bytes[0] & 0x7f).max(1);
        Ok(Self(bytes.to_vec()))
    }
}

impl fmt::Display for CertificateSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for CertificateSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertificateSerial({self})")
    }
}

impl FromStr for CertificateSerial {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        match unhex(s) {
            Some(bytes) if !bytes.is_empty() && bytes.len() <= 20 => Ok(Self::from_bytes(&bytes)),
            _ => Err(PkiError::InvalidCertificate {
                reason: format!("{s:?} is not a serial number (1 to 20 bytes of hex)"),
            }),
        }
    }
}

/// A worker's client certificate, as issued.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerCertificate {
    /// The worker it identifies.
    pub worker_id: String,
    /// Its serial, to revoke it by.
    pub serial: CertificateSerial,
    /// The certificate, PEM, to send to the agent.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// Start of validity (whole seconds, as X.509 stores it).
    pub not_before: SystemTime,
    /// End of validity (whole seconds, as X.509 stores it).
    pub not_after: SystemTime,
}

impl WorkerCertificate {
    /// Reads a worker certificate (PEM), e.g. the one an agent stored. Its signature is not
    /// checked here; the hub does that at the handshake.
    pub fn from_pem(cert_pem: &str) -> Result<Self> {
        let mut certs = parse_certs(cert_pem, "worker certificate")?;
        let cert_der = certs.swap_remove(0);
        let parsed = parse_worker_cert(&cert_der)?;
        Ok(Self {
            worker_id: parsed.worker_id,
            serial: parsed.serial,
            cert_pem: cert_pem.to_owned(),
            cert_der,
            not_before: parsed.not_before,
            not_after: parsed.not_after,
        })
    }

    /// When the agent should rotate: two thirds into the validity, which leaves a third of it to
    /// retry in if the hub is unreachable for a while.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + lifetime / 3 * 2
    }
}

/// What the hub reads from a worker certificate.
#[derive(Debug)]
pub struct ParsedWorkerCert {
    pub worker_id: String,
    pub serial: CertificateSerial,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub fn parse_worker_cert(der: &[u8]) -> Result<ParsedWorkerCert> {
    let invalid = |reason: String| PkiError::InvalidCertificate { reason };
    let (rest, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("not an X.509 certificate ({e})")))?;
    if !rest.is_empty() {
        return Err(invalid(format!("{} bytes after the certificate", rest.len())));
    }
    let sans =
        x509.subject_alternative_name().map_err(|e| invalid(format!("unreadable SAN extension ({e})")))?;
    let mut ids = sans.iter().flat_map(|san| san.value.general_names.iter()).filter_map(|name| match name {
        GeneralName::URI(uri) => uri.strip_prefix(WORKER_URI_PREFIX),
        _ => None,
    });
    let worker_id = ids.next().ok_or(PkiError::NoWorkerId)?;
    if ids.next().is_some() {
        return Err(invalid("more than one worker id".into()));
    }
    validate_worker_id(worker_id).map_err(|e| invalid(e.to_string()))?;
    Ok(ParsedWorkerCert {
        worker_id: worker_id.to_owned(),
        serial: CertificateSerial::from_bytes(x509.raw_serial()),
        not_before: time_from_unix(x509.validity().not_before.timestamp()),
        not_after: time_from_unix(x509.validity().not_after.timestamp()),
    })
}

/// The worker id in a peer certificate (DER), as the hub reads it off a connection.
///
/// This does not verify the certificate: use it on the certificate that the mTLS handshake
/// already verified (or after the control plane verified it).
pub fn worker_id_from_certificate(der: &[u8]) -> Result<String> {
    parse_worker_cert(der).map(|parsed| parsed.worker_id)
}

/// Checks that the peer certificate (DER) is for the worker the peer claims to be.
pub fn check_peer_worker_id(der: &[u8], claimed: &str) -> Result<()> {
    let certified = worker_id_from_certificate(der)?;
    // The ids are not secret, but the comparison is on the authentication path; keep it uniform.
    if constant_time_eq(certified.as_bytes(), claimed.as_bytes()) {
        Ok(())
    } else {
        Err(PkiError::WorkerIdMismatch { claimed: claimed.to_owned(), certified })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_parse_and_normalise() {
        let serial: CertificateSerial = "00ab01".parse().unwrap();
        assert_eq!(serial.as_bytes(), &[0xab, 0x01]);
        assert_eq!(serial.to_string(), "ab01");
        assert!("".parse::<CertificateSerial>().is_err());
        assert!("xyz".parse::<CertificateSerial>().is_err());
        let random = CertificateSerial::random().unwrap();
        assert_eq!(random.as_bytes().len(), 16);
        assert!(random.as_bytes()[0] != 0 && random.as_bytes()[0] < 0x80);
    }
}
