//! Certificates for the hub and its workers: an embedded CA, one-time registration tokens,
//! short-lived per-worker client certificates, revocation, and the rustls configurations that
//! enforce mutual TLS.
//!
//! # How a worker gets and keeps its identity
//!
//! 1. The operator asks the hub for a registration token bound to a worker id
//!    ([`HubPki::issue_token`]) and provisions the worker with it and the CA bundle
//!    ([`HubPki::ca_bundle_pem`]).
//! 2. The agent makes its own key pair and CSR (`AgentKey`): its private key never leaves the
//!    worker.
//! 3. On the registration listener ([`HubPki::registration_server_config`]) the hub redeems the
//!    token and signs the CSR ([`HubPki::register`]). The certificate names the worker id the
//!    token is bound to; whatever the CSR says about its subject is ignored.
//! 4. The agent dials the mTLS listener ([`HubPki::mtls_server_config`]) with
//!    [`agent_client_config`](hodei_agent::pki::agent_client_config); the hub reads the worker id off the verified peer certificate with
//!    [`worker_id_from_certificate`](hodei_agent::pki::worker_id_from_certificate) and checks it against the id claimed on the stream
//!    ([`check_peer_worker_id`](hodei_agent::pki::check_peer_worker_id)).
//! 5. Before its certificate expires ([`WorkerCertificate::renew_at`](hodei_agent::pki::WorkerCertificate::renew_at)) the agent sends a new CSR
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
//! plane's data directory, so a reopened hub trusts the certificates it issued before. So is the
//! record of which workers hold a certificate and until when ([`CERTIFIED_FILE`], appended and
//! synced before a certificate is handed out): a restarted control plane asks it
//! ([`HubPki::has_certified`]) to tell a worker that will reconnect from one that never
//! registered. Tokens are kept in memory only: a restart invalidates the outstanding ones (they
//! are short-lived, and the operator issues a new one), so a worker provisioned but not yet
//! registered when the control plane stopped can never register. The server certificate is not
//! stored either: the hub issues a fresh one at start ([`HubPki::issue_server_identity`]).
//!
//! # Control planes sharing a database
//!
//! [`HubPki::open_shared`] (feature `postgres`) keeps all of this in the PostgreSQL database the
//! engines share instead of the data directory: one CA for every control plane, tokens any of
//! them redeems once (and which survive a restart), revocations read at each handshake, and
//! one record of certified workers. An agent registered with one is accepted by all.

mod ca;
mod certified;
mod revocation;
#[cfg(feature = "postgres")]
mod shared;
mod tokens;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use hodei_agent::pki::{
    CertificateSerial, Clock, ManualClock, PkiError, Result, SystemClock, TlsIdentity, WorkerCertificate,
};
use hodei_agent::pki::{crypto_provider, root_store, server_config, unix_time, validate_worker_id};
#[cfg(feature = "postgres")]
use hodei_core::PostgresStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

pub use ca::{CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority, Validity};
pub use certified::CERTIFIED_FILE;
pub use revocation::REVOCATIONS_FILE;
pub use tokens::RegistrationToken;

use certified::Certified;
use revocation::{RevocationCheck, RevocationCheckingVerifier, Revocations};
#[cfg(feature = "postgres")]
use shared::{Revoked, SharedPki};
use tokens::RegistrationTokens;

/// The subdirectory of the control plane's data directory that holds the CA and revocations.
pub const PKI_DIR: &str = "pki";

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
    state: State,
    webpki: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
    config: PkiConfig,
}

/// Where tokens, revocations and the record of certified workers are kept.
#[derive(Debug)]
enum State {
    /// By this control plane alone: tokens in memory, the rest in its data directory.
    Local { tokens: RegistrationTokens, revocations: Arc<Revocations>, certified: Certified },
    /// In the database the control planes share.
    #[cfg(feature = "postgres")]
    Shared(Arc<SharedPki>),
}

impl std::fmt::Debug for HubPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPki")
            .field("ca", &self.ca)
            .field("state", &self.state)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HubPki {
    /// Opens the CA in [`pki_dir`]`(data_dir)`, creating it on first use, and loads the
    /// revocations and the record of certified workers.
    pub fn open(data_dir: &Path, config: PkiConfig) -> Result<Self> {
        let dir = pki_dir(data_dir);
        let ca = CertificateAuthority::open_or_create(&dir, config.clock.now())?;
        let state = State::Local {
            tokens: RegistrationTokens::default(),
            revocations: Arc::new(Revocations::load(&dir)?),
            certified: Certified::load(&dir, config.clock.now())?,
        };
        Self::with(ca, state, config)
    }

    /// The PKI shared by every control plane on the database of `store`: one CA (created by
    /// the first to open it), tokens any of them redeems once, revocations that hold on all of
    /// them from the moment they commit, and one record of certified workers. An agent may
    /// then reach any of them with the same certificate.
    #[cfg(feature = "postgres")]
    pub fn open_shared(store: Arc<PostgresStore>, config: PkiConfig) -> Result<Self> {
        let shared = Arc::new(SharedPki::new(store));
        let ca = shared.ca(config.clock.now())?;
        Self::with(ca, State::Shared(shared), config)
    }

    fn with(ca: CertificateAuthority, state: State, config: PkiConfig) -> Result<Self> {
        let provider = crypto_provider();
        let webpki = WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(std::slice::from_ref(ca.cert_der()))?),
            provider.clone(),
        )
        .build()
        .map_err(|e| PkiError::TlsConfig(e.to_string()))?;
        Ok(Self { ca, state, webpki, provider, config })
    }

    fn check_worker(&self, worker_id: &str) -> Result<()> {
        match &self.state {
            State::Local { revocations, .. } => revocations.check_worker(worker_id),
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.check_worker(worker_id),
        }
    }

    fn revocation_check(&self) -> Arc<dyn RevocationCheck> {
        match &self.state {
            State::Local { revocations, .. } => revocations.clone(),
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.clone(),
        }
    }

    fn record_certified(&self, worker_id: &str, not_after: SystemTime, now: SystemTime) -> Result<()> {
        match &self.state {
            State::Local { certified, .. } => certified.record(worker_id, not_after, now),
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.record_certified(worker_id, not_after),
        }
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
        self.check_worker(worker_id)?;
        let (now, ttl) = (self.config.clock.now(), self.config.token_ttl);
        match &self.state {
            State::Local { tokens, .. } => tokens.issue(worker_id, now, ttl),
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.issue_token(worker_id, now, ttl),
        }
    }

    /// Redeems `token` for `worker_id` and signs the CSR with a certificate for that id.
    ///
    /// The CSR is checked before the token is redeemed, so that a malformed CSR does not cost the
    /// worker its token. The certificate is recorded ([`HubPki::has_certified`]) before it is
    /// returned; if that fails, so does the registration.
    pub fn register(&self, token: &str, worker_id: &str, csr_pem: &str) -> Result<WorkerCertificate> {
        validate_worker_id(worker_id)?;
        let csr = ca::parse_csr(csr_pem)?;
        self.check_worker(worker_id)?;
        let now = self.config.clock.now();
        match &self.state {
            State::Local { tokens, .. } => tokens.redeem(token, worker_id, now)?,
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.redeem(token, worker_id, now)?,
        }
        let certificate =
            self.ca.sign_worker(worker_id, &csr, Validity::starting_at(now, self.config.worker_cert_ttl)?)?;
        self.record_certified(worker_id, certificate.not_after, now)?;
        tracing::info!(worker = worker_id, serial = %certificate.serial, "worker registered");
        Ok(certificate)
    }

    /// Issues a new certificate for the worker that `presented` (DER) belongs to.
    ///
    /// `presented` must pass the same checks as at the handshake: issued by this CA, valid now,
    /// neither it nor its worker revoked. The old certificate stays valid until it expires, so
    /// that connections made with it are not cut. The new one is recorded like a registration's.
    pub fn rotate(&self, presented: &[u8], csr_pem: &str) -> Result<WorkerCertificate> {
        let csr = ca::parse_csr(csr_pem)?;
        let worker_id = self.verify_worker_certificate(presented)?;
        let now = self.config.clock.now();
        let validity = Validity::starting_at(now, self.config.worker_cert_ttl)?;
        let certificate = self.ca.sign_worker(&worker_id, &csr, validity)?;
        self.record_certified(&worker_id, certificate.not_after, now)?;
        tracing::info!(worker = %worker_id, serial = %certificate.serial, "worker certificate rotated");
        Ok(certificate)
    }

    /// Whether [`register`](Self::register) or [`rotate`](Self::rotate) gave `worker_id` a
    /// certificate that has not expired yet, in this life of the control plane or an earlier one.
    ///
    /// A worker for which this is false cannot open a session: it never registered (and, once
    /// the control plane that issued its token has stopped, never will), or its certificates have
    /// all expired. So it runs no job for this hub. Revocation does not change the answer; see
    /// [`is_worker_revoked`](Self::is_worker_revoked). Certificates signed directly with
    /// [`ca`](Self::ca) are not recorded. With a shared PKI whose database is out of reach,
    /// the answer is yes (logged): a worker is not destroyed for a database hiccup, and the
    /// handshake still checks it.
    pub fn has_certified(&self, worker_id: &str) -> bool {
        let now = self.config.clock.now();
        match &self.state {
            State::Local { certified, .. } => certified.holds_certificate(worker_id, now),
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.holds_certificate(worker_id, now).unwrap_or_else(|e| {
                tracing::warn!(worker = worker_id, error = %e, "assumed certified");
                true
            }),
        }
    }

    /// Whether `worker_id` is revoked as a whole ([`revoke_worker`](Self::revoke_worker)). With
    /// a shared PKI whose database is out of reach, the answer is no (logged), for the reason
    /// [`has_certified`](Self::has_certified) gives.
    pub fn is_worker_revoked(&self, worker_id: &str) -> bool {
        match self.check_worker(worker_id) {
            Ok(()) => false,
            Err(PkiError::WorkerRevoked(_)) => true,
            Err(e) => {
                tracing::warn!(worker = worker_id, error = %e, "assumed not revoked");
                false
            }
        }
    }

    /// Checks a worker certificate (DER) as the mTLS handshake does and returns its worker id.
    pub fn verify_worker_certificate(&self, der: &[u8]) -> Result<String> {
        let parsed = hodei_agent::pki::parse_worker_cert(der)?;
        self.revocation_check().check(&parsed)?;
        self.webpki
            .verify_client_cert(&CertificateDer::from(der), &[], unix_time(self.config.clock.now())?)
            .map_err(PkiError::CertificateRejected)?;
        Ok(parsed.worker_id)
    }

    /// Revokes every certificate of `worker_id` and refuses it new tokens and rotations, until
    /// [`reinstate_worker`](Self::reinstate_worker). Returns whether it was not revoked already.
    pub fn revoke_worker(&self, worker_id: &str) -> Result<bool> {
        validate_worker_id(worker_id)?;
        let changed = match &self.state {
            State::Local { revocations, .. } => {
                revocations.update(|set| set.workers.insert(worker_id.to_owned()))?
            }
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.set_revoked(Revoked::Worker, worker_id, true)?,
        };
        if changed {
            tracing::warn!(worker = worker_id, "worker revoked");
        }
        Ok(changed)
    }

    /// Lifts a worker's revocation. Its unexpired certificates become valid again, unless their
    /// serials were revoked on their own. Returns whether it was revoked.
    pub fn reinstate_worker(&self, worker_id: &str) -> Result<bool> {
        let changed = match &self.state {
            State::Local { revocations, .. } => revocations.update(|set| set.workers.remove(worker_id))?,
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.set_revoked(Revoked::Worker, worker_id, false)?,
        };
        if changed {
            tracing::warn!(worker = worker_id, "worker reinstated");
        }
        Ok(changed)
    }

    /// Revokes one certificate. Returns whether it was not revoked already.
    pub fn revoke_serial(&self, serial: &CertificateSerial) -> Result<bool> {
        let changed = match &self.state {
            State::Local { revocations, .. } => {
                revocations.update(|set| set.serials.insert(serial.clone()))?
            }
            #[cfg(feature = "postgres")]
            State::Shared(shared) => shared.set_revoked(Revoked::Serial, &serial.to_string(), true)?,
        };
        if changed {
            tracing::warn!(%serial, "certificate revoked");
        }
        Ok(changed)
    }

    /// The client-certificate verifier of the mTLS listener: webpki's checks, then revocation.
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(RevocationCheckingVerifier::new(self.webpki.clone(), self.revocation_check()))
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
        server_config(&self.provider, &self.config.clock, self.client_verifier(), identity)
    }

    /// The configuration of the registration listener: no client certificate is asked for.
    pub fn registration_server_config(&self, identity: &TlsIdentity) -> Result<Arc<ServerConfig>> {
        server_config(&self.provider, &self.config.clock, WebPkiClientVerifier::no_client_auth(), identity)
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PkiError {
    let path = path.to_owned();
    move |source| PkiError::Io { action, path, source }
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
    fn file_errors_become_pki_errors() {
        use crate::files::read_optional;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("latin1"), [0xe9]).unwrap();
        let error: PkiError = read_optional(&dir.path().join("latin1")).unwrap_err().into();
        assert!(matches!(error, PkiError::CorruptFile { .. }), "{error}");
    }
}
