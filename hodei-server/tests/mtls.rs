//! Mutual TLS between the hub and agents, over real loopback connections.

#[path = "support/tls_pair.rs"]
mod tls_pair;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hodei_agent::pki::{AgentKey, agent_client_config, check_peer_worker_id};
use hodei_server::pki::{
    CA_KEY_FILE, CERTIFIED_FILE, HubPki, ManualClock, PkiConfig, PkiError, TlsIdentity, Validity,
    WorkerCertificate, pki_dir,
};
use rustls::client::Resumption;
use rustls::{CertificateError, ClientConfig, ServerConfig};
use tempfile::TempDir;
use tls_pair::{connect, rustls_error};

struct Hub {
    dir: TempDir,
    pki: HubPki,
    clock: Arc<ManualClock>,
}

impl Hub {
    fn new() -> Self {
        Self::with(|config| config)
    }

    fn with(configure: impl FnOnce(PkiConfig) -> PkiConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let pki = HubPki::open(dir.path(), configure(PkiConfig::default().clock(clock.clone()))).unwrap();
        Self { dir, pki, clock }
    }

    fn server_identity(&self) -> TlsIdentity {
        self.pki.issue_server_identity(&["127.0.0.1", "localhost"]).unwrap()
    }

    fn mtls(&self) -> Arc<ServerConfig> {
        self.pki.mtls_server_config(&self.server_identity()).unwrap()
    }

    /// A worker that went through the whole registration: token, own key, CSR, certificate.
    fn register(&self, worker_id: &str) -> Worker {
        let token = self.pki.issue_token(worker_id).unwrap();
        let key = AgentKey::generate().unwrap();
        let cert = self.pki.register(token.as_str(), worker_id, &key.csr_pem(worker_id).unwrap()).unwrap();
        Worker { key, cert }
    }

    /// The agent's configuration towards this hub, presenting `worker`'s certificate if given.
    fn client(&self, worker: Option<&Worker>) -> Arc<ClientConfig> {
        let identity = worker.map(|w| w.key.identity(&w.cert).unwrap());
        agent_client_config(self.pki.ca_bundle_pem(), identity.as_ref()).unwrap()
    }
}

struct Worker {
    key: AgentKey,
    cert: WorkerCertificate,
}

fn is_expired(err: &rustls::Error) -> bool {
    matches!(
        err,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )
    )
}

#[tokio::test]
async fn a_registered_worker_connects_and_the_hub_sees_its_id() {
    let hub = Hub::new();
    let worker = hub.register("w-1");
    assert_eq!(worker.cert.worker_id, "w-1");

    let id = connect(hub.mtls(), hub.client(Some(&worker))).await.accepted();
    assert_eq!(id, "w-1");
}

#[tokio::test]
async fn the_registration_listener_takes_agents_without_a_certificate() {
    let hub = Hub::new();
    let server = hub.pki.registration_server_config(&hub.server_identity()).unwrap();
    assert_eq!(connect(server, hub.client(None)).await.accepted(), "");
}

#[tokio::test]
async fn the_mtls_listener_refuses_a_missing_certificate() {
    let hub = Hub::new();
    let err = connect(hub.mtls(), hub.client(None)).await.refused_by_server();
    assert_eq!(err, rustls::Error::NoCertificatesPresented);
}

#[tokio::test]
async fn the_mtls_listener_refuses_a_certificate_from_another_ca() {
    let hub = Hub::new();
    let other = Hub::new();
    let stranger = other.register("w-1");
    let identity = stranger.key.identity(&stranger.cert).unwrap();
    // Trusting this hub's CA for the server, presenting the other hub's certificate.
    let client = agent_client_config(hub.pki.ca_bundle_pem(), Some(&identity)).unwrap();

    let err = connect(hub.mtls(), client).await.refused_by_server();
    assert_eq!(err, rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
}

#[tokio::test]
async fn the_agent_trusts_only_its_provisioned_ca() {
    let hub = Hub::new();
    let impostor = Hub::new();
    let outcome = connect(impostor.mtls(), hub.client(None)).await;
    let err = outcome.client.expect_err("the agent refuses a server from another CA");
    assert_eq!(rustls_error(&err), rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
}

#[tokio::test]
async fn the_mtls_listener_refuses_an_expired_certificate() {
    let hub = Hub::new();
    let key = AgentKey::generate().unwrap();
    let now = SystemTime::now();
    let past = Validity::new(now - Duration::from_secs(7200), now - Duration::from_secs(3600)).unwrap();
    let cert = hub.pki.ca().sign_worker_csr("w-1", &key.csr_pem("w-1").unwrap(), past).unwrap();
    let worker = Worker { key, cert };

    let err = connect(hub.mtls(), hub.client(Some(&worker))).await.refused_by_server();
    assert!(is_expired(&err), "{err:?}");
}

#[tokio::test]
async fn a_certificate_expires_on_the_hubs_clock() {
    let hub = Hub::new();
    let worker = hub.register("w-1");
    let server = hub.mtls();
    assert_eq!(connect(server.clone(), hub.client(Some(&worker))).await.accepted(), "w-1");

    hub.clock.set(worker.cert.not_after + Duration::from_secs(1));
    let err = connect(server, hub.client(Some(&worker))).await.refused_by_server();
    assert!(is_expired(&err), "{err:?}");
}

#[tokio::test]
async fn revocation_takes_effect_on_the_next_handshake() {
    let hub = Hub::new();
    let by_serial = hub.register("w-1");
    let by_worker = hub.register("w-2");
    let server = hub.mtls();
    // Clients that would resume if the hub let them: a resumed session skips the verifier.
    let resuming = |worker: &Worker| {
        let mut config = (*hub.client(Some(worker))).clone();
        config.resumption = Resumption::default();
        Arc::new(config)
    };
    let (client_1, client_2) = (resuming(&by_serial), resuming(&by_worker));
    assert_eq!(connect(server.clone(), client_1.clone()).await.accepted(), "w-1");
    assert_eq!(connect(server.clone(), client_2.clone()).await.accepted(), "w-2");

    assert!(hub.pki.revoke_serial(&by_serial.cert.serial).unwrap());
    assert!(hub.pki.revoke_worker("w-2").unwrap());

    let revoked = rustls::Error::InvalidCertificate(CertificateError::Revoked);
    assert_eq!(connect(server.clone(), client_1).await.refused_by_server(), revoked);
    assert_eq!(connect(server.clone(), client_2).await.refused_by_server(), revoked);

    // A worker revoked by id gets no new token either; one revoked by serial can register again.
    assert!(matches!(hub.pki.issue_token("w-2"), Err(PkiError::WorkerRevoked(_))));
    let again = hub.register("w-1");
    assert_eq!(connect(server, hub.client(Some(&again))).await.accepted(), "w-1");
}

#[tokio::test]
async fn the_hub_checks_the_claimed_worker_id() {
    let hub = Hub::new();
    let worker = hub.register("w-1");
    let id = connect(hub.mtls(), hub.client(Some(&worker))).await.accepted();
    check_peer_worker_id(&worker.cert.cert_der, &id).unwrap();
    let err = check_peer_worker_id(&worker.cert.cert_der, "w-2").unwrap_err();
    assert!(
        matches!(err, PkiError::WorkerIdMismatch { ref claimed, ref certified } if claimed == "w-2" && certified == "w-1")
    );
}

#[test]
fn a_token_is_single_use_short_lived_and_bound_to_its_worker() {
    let hub = Hub::with(|config| config.token_ttl(Duration::from_secs(60)));
    let csr = |id: &str| AgentKey::generate().unwrap().csr_pem(id).unwrap();

    let token = hub.pki.issue_token("w-1").unwrap();
    let err = hub.pki.register(token.as_str(), "w-2", &csr("w-2")).unwrap_err();
    assert!(matches!(err, PkiError::TokenWrongWorker { ref claimed } if claimed == "w-2"), "{err}");
    // A malformed CSR is refused before the token is spent.
    assert!(matches!(hub.pki.register(token.as_str(), "w-1", "junk"), Err(PkiError::InvalidCsr { .. })));
    hub.pki.register(token.as_str(), "w-1", &csr("w-1")).unwrap();
    let err = hub.pki.register(token.as_str(), "w-1", &csr("w-1")).unwrap_err();
    assert!(matches!(err, PkiError::TokenReplayed), "{err}");

    let token = hub.pki.issue_token("w-3").unwrap();
    hub.clock.advance(Duration::from_secs(60));
    let err = hub.pki.register(token.as_str(), "w-3", &csr("w-3")).unwrap_err();
    assert!(matches!(err, PkiError::TokenExpired), "{err}");

    let err = hub.pki.register("0123456789abcdef.00", "w-1", &csr("w-1")).unwrap_err();
    assert!(matches!(err, PkiError::UnknownToken), "{err}");
}

#[test]
fn a_token_with_no_time_to_live_is_expired_on_arrival() {
    let hub = Hub::with(|config| config.token_ttl(Duration::ZERO));
    let token = hub.pki.issue_token("w-1").unwrap();
    let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();
    assert!(matches!(hub.pki.register(token.as_str(), "w-1", &csr), Err(PkiError::TokenExpired)));
}

#[test]
fn tokens_do_not_survive_a_restart() {
    let hub = Hub::new();
    let token = hub.pki.issue_token("w-1").unwrap();
    let reopened = HubPki::open(hub.dir.path(), PkiConfig::default()).unwrap();
    let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();
    assert!(matches!(reopened.register(token.as_str(), "w-1", &csr), Err(PkiError::UnknownToken)));
}

#[tokio::test]
async fn a_reopened_ca_still_trusts_what_it_issued_and_remembers_revocations() {
    let hub = Hub::new();
    let worker = hub.register("w-1");
    let revoked = hub.register("w-2");
    hub.pki.revoke_worker("w-2").unwrap();
    let Hub { dir, pki, clock } = hub;
    drop(pki);

    let reopened =
        Hub { pki: HubPki::open(dir.path(), PkiConfig::default().clock(clock.clone())).unwrap(), dir, clock };
    assert_eq!(connect(reopened.mtls(), reopened.client(Some(&worker))).await.accepted(), "w-1");
    let err = connect(reopened.mtls(), reopened.client(Some(&revoked))).await.refused_by_server();
    assert_eq!(err, rustls::Error::InvalidCertificate(CertificateError::Revoked));
}

#[test]
fn the_ca_key_is_private_and_a_truncated_one_is_a_typed_error() {
    let hub = Hub::new();
    let key_path = pki_dir(hub.dir.path()).join(CA_KEY_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let key = std::fs::read(&key_path).unwrap();
    std::fs::write(&key_path, &key[..key.len() / 2]).unwrap();

    let err = HubPki::open(hub.dir.path(), PkiConfig::default()).unwrap_err();
    assert!(matches!(err, PkiError::CorruptFile { ref path, .. } if *path == key_path), "{err}");
    // The damaged key was left for an operator, not replaced by a new CA.
    assert_eq!(std::fs::read(&key_path).unwrap(), &key[..key.len() / 2]);
}

#[tokio::test]
async fn rotation_renews_a_valid_certificate_and_refuses_a_revoked_worker() {
    let hub = Hub::new();
    let worker = hub.register("w-1");
    let new_key = AgentKey::generate().unwrap();
    // Issued before the hub's clock moves: the agent checks it against its own, real, clock.
    let server = hub.mtls();
    hub.clock.advance(Duration::from_secs(30 * 60));

    let renewed = hub.pki.rotate(&worker.cert.cert_der, &new_key.csr_pem("w-1").unwrap()).unwrap();
    assert_eq!(renewed.worker_id, "w-1");
    assert_ne!(renewed.serial, worker.cert.serial);
    assert!(renewed.not_after > worker.cert.not_after);
    let rotated = Worker { key: new_key, cert: renewed };
    assert_eq!(connect(server, hub.client(Some(&rotated))).await.accepted(), "w-1");

    // The id comes from the presented certificate, whatever the CSR says.
    let evil = AgentKey::generate().unwrap().csr_pem("admin").unwrap();
    assert_eq!(hub.pki.rotate(&rotated.cert.cert_der, &evil).unwrap().worker_id, "w-1");

    hub.pki.revoke_serial(&worker.cert.serial).unwrap();
    let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();
    assert!(matches!(hub.pki.rotate(&worker.cert.cert_der, &csr), Err(PkiError::CertificateRevoked(_))));

    hub.pki.revoke_worker("w-1").unwrap();
    assert!(matches!(hub.pki.rotate(&rotated.cert.cert_der, &csr), Err(PkiError::WorkerRevoked(_))));
}

#[test]
fn rotation_refuses_expired_and_foreign_certificates() {
    let hub = Hub::new();
    let worker = hub.register("w-1");
    let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();

    let other = Hub::new();
    let stranger = other.register("w-1");
    let err = hub.pki.rotate(&stranger.cert.cert_der, &csr).unwrap_err();
    assert!(
        matches!(
            err,
            PkiError::CertificateRejected(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
        ),
        "{err}"
    );

    hub.clock.set(worker.cert.not_after + Duration::from_secs(1));
    let err = hub.pki.rotate(&worker.cert.cert_der, &csr).unwrap_err();
    assert!(matches!(err, PkiError::CertificateRejected(ref e) if is_expired(e)), "{err}");
}

/// A restarted control plane knows which workers it certified in an earlier life, until their
/// certificates expire, rotations included; a worker only given a token is not among them, nor
/// one whose registration failed. Revocation is asked separately.
#[test]
fn which_workers_hold_a_certificate_survives_a_restart_until_their_certificates_expire() {
    let hub = Hub::with(|config| config.worker_cert_ttl(Duration::from_secs(3600)));
    let registered = hub.register("w-registered");
    let rotating = hub.register("w-rotating");
    hub.register("w-revoked");
    hub.pki.issue_token("w-token-only").unwrap();
    let token = hub.pki.issue_token("w-refused").unwrap();
    assert!(hub.pki.register(token.as_str(), "w-refused", "junk").is_err());
    assert!(hub.pki.has_certified("w-registered"));
    assert!(!hub.pki.has_certified("w-token-only"));

    // Half an hour on, `w-rotating` renews its certificate; `w-revoked` is revoked.
    hub.clock.advance(Duration::from_secs(30 * 60));
    let csr = AgentKey::generate().unwrap().csr_pem("w-rotating").unwrap();
    let renewed = hub.pki.rotate(&rotating.cert.cert_der, &csr).unwrap();
    hub.pki.revoke_worker("w-revoked").unwrap();

    let Hub { dir, pki, clock } = hub;
    drop(pki);
    let reopen = || HubPki::open(dir.path(), PkiConfig::default().clock(clock.clone())).unwrap();
    let reopened = reopen();
    for (worker, certified) in [
        ("w-registered", true),
        ("w-rotating", true),
        ("w-revoked", true),
        ("w-token-only", false),
        ("w-refused", false),
        ("w-never-heard-of", false),
    ] {
        assert_eq!(reopened.has_certified(worker), certified, "{worker}");
    }
    assert!(reopened.is_worker_revoked("w-revoked"));
    assert!(!reopened.is_worker_revoked("w-registered"));

    // Past the first certificates' end, only the rotated one is still held, reopened or not.
    clock.set(registered.cert.not_after + Duration::from_secs(1));
    assert!(!reopened.has_certified("w-registered"));
    assert!(reopened.has_certified("w-rotating"));
    drop(reopened);
    let later = reopen();
    assert!(!later.has_certified("w-registered"));
    assert!(later.has_certified("w-rotating"));
    clock.set(renewed.not_after);
    assert!(later.has_certified("w-rotating"), "valid through its last second, as at the handshake");
    clock.set(renewed.not_after + Duration::from_secs(1));
    assert!(!later.has_certified("w-rotating"));
}

/// The record is appended while workers register: one cut short by a crash is a line without
/// its newline, which the next open drops, and a record in a format of another version is
/// refused rather than misread.
#[test]
fn the_record_of_certified_workers_survives_a_torn_append_and_refuses_another_version() {
    let hub = Hub::new();
    hub.register("w-1");
    let path = pki_dir(hub.dir.path()).join(CERTIFIED_FILE);
    let whole = std::fs::read_to_string(&path).unwrap();
    assert!(whole.starts_with("hodei certified workers v1\n") && whole.ends_with('\n'), "{whole:?}");
    std::fs::write(&path, format!("{whole}w-2 17")).unwrap();

    let reopened = HubPki::open(hub.dir.path(), PkiConfig::default().clock(hub.clock.clone())).unwrap();
    assert!(reopened.has_certified("w-1"));
    assert!(!reopened.has_certified("w-2"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), whole, "the torn line is gone from the file");
    let token = reopened.issue_token("w-3").unwrap();
    let csr = AgentKey::generate().unwrap().csr_pem("w-3").unwrap();
    reopened.register(token.as_str(), "w-3", &csr).unwrap();
    drop(reopened);
    let again = HubPki::open(hub.dir.path(), PkiConfig::default().clock(hub.clock.clone())).unwrap();
    assert!(again.has_certified("w-1") && again.has_certified("w-3"));
    drop(again);

    std::fs::write(&path, "hodei certified workers v2\nw-1 1\n").unwrap();
    let err = HubPki::open(hub.dir.path(), PkiConfig::default()).unwrap_err();
    assert!(matches!(err, PkiError::CorruptFile { path: ref p, .. } if *p == path), "{err}");
}
