//! Certificates for the hub and its workers: an embedded CA, one-time registration tokens,
//! short-lived per-worker client certificates, revocation, and the rustls configurations that
//! enforce mutual TLS.
//!
//! # How a worker gets and keeps its identity
//!
//! 1. The operator asks the hub for a registration token bound to a worker id
//!    ([`HubPki::issue_token`]) and provisions the worker with it and the CA bundle
//!    ([`HubPki::ca_bundle_pem`]).
//! 2. The agent makes its own key pair and CSR ([`AgentKey`]): its private key never leaves the
//!    worker.
//! 3. On the registration listener ([`HubPki::registration_server_config`]) the hub redeems the
//!    token and signs the CSR ([`HubPki::register`]). The certificate names the worker id the
//!    token is bound to; whatever the CSR says about its subject is ignored.
//! 4. The agent dials the mTLS listener ([`HubPki::mtls_server_config`]) with
//!    [`agent_client_config`]; the hub reads the worker id off the verified peer certificate with
//!    [`worker_id_from_certificate`] and checks it against the id claimed on the stream
//!    ([`check_peer_worker_id`]).
//! 5. Before its certificate expires ([`WorkerCertificate::renew_at`]) the agent sends a new CSR
//!    over that connection ([`HubPki::rotate`]): the valid certificate is the credential, so no
//!    token is needed.
//!
//! # The worker id is a URI SAN, `hodei://worker/<id>`
//!
//! Not a DNS name: TLS libraries match DNS SANs against host names, so a worker certificate
//! with a DNS SAN could pass for a server of that name. Not the subject CN: it is free-form,
//! deprecated for identity, and often rewritten by tooling. A URI in its own scheme is typed,
//! parsed rather than guessed, and leaves room for other identities from the same CA (the way
//! SPIFFE ids do). The CN repeats the id for people reading `openssl x509` output; nothing reads
//! it back.
//!
//! # Revocation is checked by a wrapper around the webpki verifier
//!
//! [`HubPki::client_verifier`] runs rustls's `WebPkiClientVerifier` (chain, validity, client-auth
//! key usage) and then looks the certificate's serial and worker id up in the revocation set.
//! CRLs would need the verifier, and so every `ServerConfig`, rebuilt and swapped into the
//! listener on each revocation; the shared set takes effect on the next handshake with nothing to
//! swap, and can revoke a whole worker (all its certificates, past and future) in one entry,
//! which a CRL of serials cannot. The set is persisted next to the CA. TLS session resumption is
//! off on the mTLS listener, because a resumed session skips the verifier and would let a revoked
//! or expired certificate back in.
//!
//! # Two listeners: registration without client certificates, streams with them
//!
//! An agent has no certificate before it registers. Rather than one listener whose verifier
//! allows unauthenticated clients, which would make every RPC handler responsible for checking
//! that a certificate is there, the hub runs two: the registration listener does not ask for a
//! certificate and serves only [`HubPki::register`], which the token authenticates; the stream
//! listener refuses any handshake without a valid, unrevoked certificate.
//!
//! # What survives a restart
//!
//! The CA key and certificate and the revocation set are files in [`pki_dir`] of the control
//! plane's data directory, so a reopened hub trusts the certificates it issued before. Tokens are
//! kept in memory only: a restart invalidates the outstanding ones (they are short-lived, and
//! the operator issues a new one). The server certificate is not stored either: the hub issues a
//! fresh one at start ([`HubPki::issue_server_identity`]).

mod agent;
mod ca;
mod revocation;
mod tls;
mod tokens;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

pub use agent::AgentKey;
pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority, CertificateSerial, Validity, WorkerCertificate,
    check_peer_worker_id, worker_id_from_certificate,
};
pub use revocation::REVOCATIONS_FILE;
pub use tls::{TlsIdentity, agent_client_config};
pub use tokens::RegistrationToken;

use revocation::{RevocationCheckingVerifier, Revocations};
use tokens::RegistrationTokens;

/// The subdirectory of the control plane's data directory that holds the CA and revocations.
pub const PKI_DIR: &str = "pki";

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
}

type Result<T, E = PkiError> = std::result::Result<T, E>;

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

/// Lifetimes and the clock of a [`HubPki`].
#[derive(Debug, Clone)]
pub struct PkiConfig {
    token_ttl: Duration,
    worker_cert_ttl: Duration,
    server_cert_ttl: Duration,
    clock: Arc<dyn Clock>,
}

impl Default for PkiConfig {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(15 * 60),
            worker_cert_ttl: Duration::from_secs(60 * 60),
            server_cert_ttl: Duration::from_secs(30 * 24 * 60 * 60),
            clock: Arc::new(SystemClock),
        }
    }
}

impl PkiConfig {
    /// How long a registration token can be redeemed after it is issued (default 15 minutes). Zero
    /// makes every token expired on arrival.
    pub fn token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl;
        self
    }

    /// How long a worker certificate is valid (default 1 hour). Short, because rotation is cheap
    /// and a short life bounds what a stolen key is worth.
    pub fn worker_cert_ttl(mut self, ttl: Duration) -> Self {
        self.worker_cert_ttl = ttl;
        self
    }

    /// How long the hub's own server certificate is valid (default 30 days). It is issued anew at
    /// every start, so this only has to outlast one run of the hub.
    pub fn server_cert_ttl(mut self, ttl: Duration) -> Self {
        self.server_cert_ttl = ttl;
        self
    }

    /// The clock for tokens, validity and handshakes (default the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// Where the CA and revocation files live in the control plane's data directory.
pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(PKI_DIR)
}

/// The control plane's side: its CA, outstanding tokens and revocations.
///
/// Cheap to share behind an `Arc`: every method takes `&self`.
pub struct HubPki {
    ca: CertificateAuthority,
    tokens: RegistrationTokens,
    revocations: Arc<Revocations>,
    webpki: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
    config: PkiConfig,
}

impl std::fmt::Debug for HubPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPki")
            .field("ca", &self.ca)
            .field("tokens", &self.tokens)
            .field("revocations", &self.revocations)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HubPki {
    /// Opens the CA in [`pki_dir`]`(data_dir)`, creating it on first use, and loads the
    /// revocations.
    pub fn open(data_dir: &Path, config: PkiConfig) -> Result<Self> {
        let dir = pki_dir(data_dir);
        let ca = CertificateAuthority::open_or_create(&dir, config.clock.now())?;
        let revocations = Arc::new(Revocations::load(&dir)?);
        let provider = tls::provider();
        let webpki = WebPkiClientVerifier::builder_with_provider(
            Arc::new(tls::root_store(std::slice::from_ref(ca.cert_der()))?),
            provider.clone(),
        )
        .build()
        .map_err(|e| PkiError::TlsConfig(e.to_string()))?;
        Ok(Self { ca, tokens: RegistrationTokens::default(), revocations, webpki, provider, config })
    }

    /// The CA itself, to issue certificates with an explicit validity.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The CA certificate (PEM) that agents are provisioned with and trust alone.
    pub fn ca_bundle_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// A one-time token with which `worker_id` can register once, within the token TTL.
    pub fn issue_token(&self, worker_id: &str) -> Result<RegistrationToken> {
        validate_worker_id(worker_id)?;
        self.revocations.check_worker(worker_id)?;
        self.tokens.issue(worker_id, self.config.clock.now(), self.config.token_ttl)
    }

    /// Redeems `token` for `worker_id` and signs the CSR with a certificate for that id.
    ///
    /// The CSR is checked before the token is redeemed, so that a malformed CSR does not cost the
    /// worker its token.
    pub fn register(&self, token: &str, worker_id: &str, csr_pem: &str) -> Result<WorkerCertificate> {
        validate_worker_id(worker_id)?;
        let csr = ca::parse_csr(csr_pem)?;
        self.revocations.check_worker(worker_id)?;
        let now = self.config.clock.now();
        self.tokens.redeem(token, worker_id, now)?;
        let certificate =
            self.ca.sign_worker(worker_id, &csr, Validity::starting_at(now, self.config.worker_cert_ttl)?)?;
        tracing::info!(worker = worker_id, serial = %certificate.serial, "worker registered");
        Ok(certificate)
    }

    /// Issues a new certificate for the worker that `presented` (DER) belongs to.
    ///
    /// `presented` must pass the same checks as at the handshake: issued by this CA, valid now,
    /// neither it nor its worker revoked. The old certificate stays valid until it expires, so
    /// that connections made with it are not cut.
    pub fn rotate(&self, presented: &[u8], csr_pem: &str) -> Result<WorkerCertificate> {
        let csr = ca::parse_csr(csr_pem)?;
        let worker_id = self.verify_worker_certificate(presented)?;
        let validity = Validity::starting_at(self.config.clock.now(), self.config.worker_cert_ttl)?;
        let certificate = self.ca.sign_worker(&worker_id, &csr, validity)?;
        tracing::info!(worker = %worker_id, serial = %certificate.serial, "worker certificate rotated");
        Ok(certificate)
    }

    /// Checks a worker certificate (DER) as the mTLS handshake does and returns its worker id.
    pub fn verify_worker_certificate(&self, der: &[u8]) -> Result<String> {
        let parsed = ca::parse_worker_cert(der)?;
        self.revocations.check(&parsed)?;
        self.webpki
            .verify_client_cert(&CertificateDer::from(der), &[], unix_time(self.config.clock.now())?)
            .map_err(PkiError::CertificateRejected)?;
        Ok(parsed.worker_id)
    }

    /// Revokes every certificate of `worker_id` and refuses it new tokens and rotations, until
    /// [`reinstate_worker`](Self::reinstate_worker). Returns whether it was not revoked already.
    pub fn revoke_worker(&self, worker_id: &str) -> Result<bool> {
        validate_worker_id(worker_id)?;
        let changed = self.revocations.update(|set| set.workers.insert(worker_id.to_owned()))?;
        if changed {
            tracing::warn!(worker = worker_id, "worker revoked");
        }
        Ok(changed)
    }

    /// Lifts a worker's revocation. Its unexpired certificates become valid again, unless their
    /// serials were revoked on their own. Returns whether it was revoked.
    pub fn reinstate_worker(&self, worker_id: &str) -> Result<bool> {
        let changed = self.revocations.update(|set| set.workers.remove(worker_id))?;
        if changed {
            tracing::warn!(worker = worker_id, "worker reinstated");
        }
        Ok(changed)
    }

    /// Revokes one certificate. Returns whether it was not revoked already.
    pub fn revoke_serial(&self, serial: &CertificateSerial) -> Result<bool> {
        let changed = self.revocations.update(|set| set.serials.insert(serial.clone()))?;
        if changed {
            tracing::warn!(%serial, "certificate revoked");
        }
        Ok(changed)
    }

    /// The client-certificate verifier of the mTLS listener: webpki's checks, then revocation.
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(RevocationCheckingVerifier::new(self.webpki.clone(), self.revocations.clone()))
    }

    /// A fresh server certificate and key for the hub, valid for the server certificate TTL, for
    /// `names` (IP addresses or DNS names, e.g. `["127.0.0.1", "localhost"]`).
    pub fn issue_server_identity(&self, names: &[&str]) -> Result<TlsIdentity> {
        self.ca.issue_server_identity(
            names,
            Validity::starting_at(self.config.clock.now(), self.config.server_cert_ttl)?,
        )
    }

    /// The configuration of the stream listener: a client certificate from this CA, valid and not
    /// revoked, is required.
    pub fn mtls_server_config(&self, identity: &TlsIdentity) -> Result<Arc<ServerConfig>> {
        tls::server_config(&self.provider, &self.config.clock, self.client_verifier(), identity)
    }

    /// The configuration of the registration listener: no client certificate is asked for.
    pub fn registration_server_config(&self, identity: &TlsIdentity) -> Result<Arc<ServerConfig>> {
        tls::server_config(
            &self.provider,
            &self.config.clock,
            WebPkiClientVerifier::no_client_auth(),
            identity,
        )
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

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0; N];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).map_err(|_| PkiError::Random)?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// Equality whose running time does not depend on where the inputs differ, for secrets. The
/// lengths are not secret (tokens have a fixed format), so they may short-circuit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn unix_time(time: SystemTime) -> Result<UnixTime> {
    let since_epoch =
        time.duration_since(UNIX_EPOCH).map_err(|_| PkiError::TimeOutOfRange("the clock is before 1970"))?;
    Ok(UnixTime::since_unix_epoch(since_epoch))
}

fn time_from_unix(seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    let time =
        if seconds >= 0 { UNIX_EPOCH.checked_add(magnitude) } else { UNIX_EPOCH.checked_sub(magnitude) };
    time.unwrap_or(UNIX_EPOCH)
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PkiError {
    let path = path.to_owned();
    move |source| PkiError::Io { action, path, source }
}

/// Reads a file that may not exist yet.
fn read_optional(path: &Path) -> Result<Option<String>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", path)(e)),
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| PkiError::CorruptFile { path: path.to_owned(), reason: "it is not UTF-8 text".into() })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error("create directory", dir))
}

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one,
/// never a torn one. `mode` is applied at creation, so a key is never readable by others, not even
/// for a moment.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A temporary file left by a crash may have other permissions; create_new gets ours.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error("remove", &tmp)(e)),
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io_error("create", &tmp))?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(io_error("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_error("rename into place", path))?;
    if let Some(dir) = path.parent() {
        // The rename is durable only once the directory entry is.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("sync", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<HubPki>();
    }

    #[test]
    fn reinstating_a_worker_lifts_its_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubPki::open(dir.path(), PkiConfig::default()).unwrap();
        assert!(hub.revoke_worker("w-1").unwrap());
        assert!(matches!(hub.issue_token("w-1"), Err(PkiError::WorkerRevoked(_))));
        assert!(hub.reinstate_worker("w-1").unwrap());
        assert!(!hub.reinstate_worker("w-1").unwrap());
        assert_eq!(hub.issue_token("w-1").unwrap().worker_id(), "w-1");
    }

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

    #[test]
    fn atomic_writes_replace_and_set_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomically(&path, b"one", 0o600).unwrap();
        write_atomically(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(read_optional(&dir.path().join("absent")).unwrap(), None);
    }
}
