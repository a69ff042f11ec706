//! The worker's side of the PKI, and what both sides of the wire read the same way.
//!
//! - [`AgentKey`]: the key pair an agent makes for itself and the CSR it sends; its private key
//!   never leaves the worker.
//! - [`WorkerCertificate`]: the certificate the control plane signs, with the worker id in a
//!   `hodei://worker/<id>` URI SAN ([`worker_id_from_certificate`]).
//! - [`agent_client_config`]: the agent's rustls configuration, which trusts only the CA bundle
//!   it was provisioned with; [`server_config`] is the matching listener's, with the same
//!   protocol versions and ALPN.
//! - [`PkiError`]: every refusal of either side, so that an agent reports a registration the
//!   control plane refused in the same terms.
//!
//! The CA, registration tokens, revocation and the record of certified workers are the control
//! plane's (`hodei-server`'s `pki` module).

mod agent;
mod certificate;
mod tls;

use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::UnixTime;

pub use agent::AgentKey;
pub use certificate::{
    CertificateSerial, ParsedWorkerCert, WORKER_URI_PREFIX, WorkerCertificate, check_peer_worker_id,
    parse_worker_cert, worker_id_from_certificate,
};
pub use tls::{TlsIdentity, agent_client_config, server_config};
#[doc(hidden)]
pub use tls::{crypto_provider, parse_certs, root_store};

/// Longest worker id accepted, so that ids fit in logs, URIs and file lines without surprises.
pub const MAX_WORKER_ID_LEN: usize = 128;

/// Everything this module can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file or directory operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A stored file is unreadable: truncated, edited, or not what it should be. It is left as it
    /// is for an operator.
    #[error("{path} is corrupt: {reason}")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// One of the CA's two files exists without the other.
    #[error(
        "the CA is incomplete: {present} exists but {missing} does not; restore the missing file, \
         or remove both to start a new CA (every worker must then register again)"
    )]
    IncompleteCa {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A worker id is empty, too long, or has characters outside the allowed set.
    #[error("invalid worker id {id:?}: {reason}")]
    InvalidWorkerId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A certificate signing request could not be parsed, or its signature does not verify.
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr {
        /// Why it was refused.
        reason: String,
    },
    /// PEM input (a certificate, a bundle or a key) could not be used.
    #[error("invalid {what}: {reason}")]
    InvalidPem {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate could not be parsed as a worker certificate.
    #[error("invalid certificate: {reason}")]
    InvalidCertificate {
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate carries no `hodei://worker/<id>` URI.
    #[error("the certificate carries no Hodei worker id (no `hodei://worker/` URI SAN)")]
    NoWorkerId,
    /// The peer's certificate is for a different worker than the one it claims to be.
    #[error("the peer claims to be worker `{claimed}` but its certificate is for worker `{certified}`")]
    WorkerIdMismatch {
        /// The id claimed on the connection.
        claimed: String,
        /// The id in the certificate.
        certified: String,
    },
    /// The token was not issued by this control plane, or not since its last start.
    #[error("unknown registration token (tokens do not survive a restart of the control plane)")]
    UnknownToken,
    /// The token was already redeemed once.
    #[error("registration token already used")]
    TokenReplayed,
    /// The token's time to live is over.
    #[error("registration token expired")]
    TokenExpired,
    /// The token is bound to another worker id than the one presenting it.
    #[error("registration token is not bound to worker `{claimed}`")]
    TokenWrongWorker {
        /// The worker id that presented the token.
        claimed: String,
    },
    /// The worker is revoked: it gets no token, certificate or connection.
    #[error("worker `{0}` is revoked")]
    WorkerRevoked(String),
    /// The certificate's serial is revoked.
    #[error("certificate {0} is revoked")]
    CertificateRevoked(CertificateSerial),
    /// The certificate did not verify against the CA (expired, another CA, wrong key usage...).
    #[error("certificate rejected: {0}")]
    CertificateRejected(#[source] rustls::Error),
    /// A validity period ends before it starts.
    #[error("invalid validity: it must end after it starts")]
    InvalidValidity,
    /// A time or duration is too far from now to be represented.
    #[error("time out of range: {0}")]
    TimeOutOfRange(&'static str),
    /// A server name is neither an IP address nor a DNS name.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidServerName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rcgen failed to make a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generation(#[source] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration failed: {0}")]
    TlsConfig(String),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The database the control planes share their PKI in failed or is out of reach: nothing
    /// was issued, redeemed or revoked, and a handshake is refused rather than let through
    /// unchecked.
    #[error("the shared PKI could not {action}: {source}")]
    Shared {
        /// What was being done.
        action: &'static str,
        /// The database's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The result of this module's and the CA's operations.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// The time source for tokens, certificate validity and handshakes.
///
/// The hub uses one clock for all three so that a test can move time instead of waiting.
pub trait Clock: std::fmt::Debug + Send + Sync {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: SystemTime) -> Self {
        Self { now: Mutex::new(start) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = now.checked_add(by).unwrap_or(*now);
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: SystemTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Checks that `id` can name a worker: 1 to [`MAX_WORKER_ID_LEN`] bytes of ASCII letters, digits,
/// `-`, `_` and `.`, so that it goes into a URI, a log line and a file line as it is.
pub fn validate_worker_id(id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_WORKER_ID_LEN {
        "it is longer than 128 bytes"
    } else if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        "it may contain only ASCII letters, digits, '-', '_' and '.'"
    } else {
        return Ok(());
    };
    Err(PkiError::InvalidWorkerId { id: id.to_owned(), reason })
}

#[doc(hidden)]
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0; N];
    tls::crypto_provider().secure_random.fill(&mut bytes).map_err(|_| PkiError::Random)?;
    Ok(bytes)
}

#[doc(hidden)]
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

#[doc(hidden)]
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// Equality whose running time does not depend on where the inputs differ, for secrets. The
/// lengths are not secret (tokens have a fixed format), so they may short-circuit.
#[doc(hidden)]
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[doc(hidden)]
pub fn unix_time(time: SystemTime) -> Result<UnixTime> {
    let since_epoch =
        time.duration_since(UNIX_EPOCH).map_err(|_| PkiError::TimeOutOfRange("the clock is before 1970"))?;
    Ok(UnixTime::since_unix_epoch(since_epoch))
}

#[doc(hidden)]
pub fn time_from_unix(seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    let time =
        if seconds >= 0 { UNIX_EPOCH.checked_add(magnitude) } else { UNIX_EPOCH.checked_sub(magnitude) };
    time.unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_are_checked() {
        assert!(validate_worker_id("worker-1.eu_west").is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(MAX_WORKER_ID_LEN + 1)] {
            assert!(matches!(validate_worker_id(bad), Err(PkiError::InvalidWorkerId { .. })), "{bad:?}");
        }
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(unhex("00ab7f"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("éa"), None);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"sama"));
        assert!(!constant_time_eq(b"same", b"sam"));
    }

    #[test]
    fn random_bytes_differ() {
        let (a, b) = (random_bytes::<16>().unwrap(), random_bytes::<16>().unwrap());
        assert_ne!(a, b);
    }

    #[test]
    fn unix_times_convert_both_ways() {
        assert_eq!(time_from_unix(10), UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(time_from_unix(-10), UNIX_EPOCH - Duration::from_secs(10));
        assert!(unix_time(UNIX_EPOCH - Duration::from_secs(1)).is_err());
    }
}
