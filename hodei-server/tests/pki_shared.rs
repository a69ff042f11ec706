//! Control planes sharing a PostgreSQL database share one PKI (`HubPki::open_shared`): one CA,
//! tokens any of them redeems once, revocations and rotations that hold on all of them. Each
//! "control plane" here is a `PostgresStore` of its own on one schema, as each engine process
//! has; handshakes are real TLS over loopback.

#[path = "../../hodei-core/src/store/postgres/test_database.rs"]
mod test_database;
#[path = "support/tls_pair.rs"]
mod tls_pair;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hodei_agent::pki::{AgentKey, agent_client_config};
// `PostgresOptions`: `test_database` names it from this crate's root.
use hodei_core::{PostgresOptions, PostgresStore};
use hodei_server::pki::{HubPki, ManualClock, PkiConfig, PkiError, WorkerCertificate};
use rustls::{CertificateError, ClientConfig, ServerConfig};
use test_database::TestDatabase;
use tls_pair::connect;

const TOKEN_TTL: Duration = Duration::from_secs(60);

/// Control planes on one database, with one clock.
struct Planes {
    _db: TestDatabase,
    planes: Vec<Arc<HubPki>>,
    clock: Arc<ManualClock>,
}

impl Planes {
    /// `n` control planes opened at once, each on a store of its own.
    async fn open(test: &str, n: usize) -> Option<Self> {
        let db = TestDatabase::new(test)?;
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (url, options, clock) = (db.url.clone(), db.options(), clock.clone());
            opening.spawn(async move {
                let store = Arc::new(PostgresStore::connect_with(&url, options).await.unwrap());
                let config = PkiConfig::default().clock(clock).token_ttl(TOKEN_TTL);
                // It blocks on the database: off the test's runtime thread.
                tokio::task::spawn_blocking(move || HubPki::open_shared(store, config)).await.unwrap()
            });
        }
        let planes = opening.join_all().await.into_iter().map(|pki| Arc::new(pki.unwrap())).collect();
        Some(Self { _db: db, planes, clock })
    }

    fn plane(&self, n: usize) -> &HubPki {
        &self.planes[n]
    }
}

struct Worker {
    key: AgentKey,
    cert: WorkerCertificate,
}

/// A worker registered with a token `issuer` issued and `redeemer` redeemed.
fn register(issuer: &HubPki, redeemer: &HubPki, worker_id: &str) -> Worker {
    let token = issuer.issue_token(worker_id).unwrap();
    let key = AgentKey::generate().unwrap();
    let cert = redeemer.register(token.as_str(), worker_id, &key.csr_pem(worker_id).unwrap()).unwrap();
    Worker { key, cert }
}

fn mtls(pki: &HubPki) -> Arc<ServerConfig> {
    pki.mtls_server_config(&pki.issue_server_identity(&["127.0.0.1", "localhost"]).unwrap()).unwrap()
}

fn client(pki: &HubPki, worker: &Worker) -> Arc<ClientConfig> {
    let identity = worker.key.identity(&worker.cert).unwrap();
    agent_client_config(pki.ca_bundle_pem(), Some(&identity)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_planes_opened_at_once_share_one_ca_and_accept_each_others_workers() {
    let Some(planes) = Planes::open("one ca", 3).await else { return };
    let bundles: Vec<&str> = planes.planes.iter().map(|pki| pki.ca_bundle_pem()).collect();
    assert!(bundles.iter().all(|bundle| *bundle == bundles[0]), "one CA for all: {bundles:#?}");

    // Issued by the first, redeemed on the second: a certificate every one of them accepts.
    let worker = register(planes.plane(0), planes.plane(1), "w-1");
    for pki in &planes.planes {
        assert_eq!(connect(mtls(pki), client(pki, &worker)).await.accepted(), "w-1");
        assert!(pki.has_certified("w-1"));
        assert!(!pki.has_certified("w-never"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_redeemed_once_whichever_control_planes_are_presented_it() {
    let Some(planes) = Planes::open("token once", 2).await else { return };
    let token = planes.plane(0).issue_token("w-1").unwrap();
    let csr = AgentKey::generate().unwrap().csr_pem("w-1").unwrap();

    // Refusals that leave it unused, each in the words a control plane of its own uses.
    let (selector, secret) = token.as_str().split_once('.').unwrap();
    let wrong_secret = format!("{selector}.{}", "0".repeat(secret.len()));
    assert!(matches!(planes.plane(1).register(&wrong_secret, "w-1", &csr), Err(PkiError::UnknownToken)));
    assert!(matches!(planes.plane(1).register("no-dot", "w-1", &csr), Err(PkiError::UnknownToken)));
    assert!(matches!(
        planes.plane(1).register(token.as_str(), "w-2", &csr),
        Err(PkiError::TokenWrongWorker { ref claimed }) if claimed == "w-2"
    ));

    // Both at once: exactly one gets a certificate.
    let attempts: Vec<_> = (0..2)
        .map(|n| {
            let (pki, token, csr) = (planes.planes[n].clone(), token.as_str().to_owned(), csr.clone());
            std::thread::spawn(move || pki.register(&token, "w-1", &csr))
        })
        .collect();
    let results: Vec<_> = attempts.into_iter().map(|attempt| attempt.join().unwrap()).collect();
    let won = results.iter().filter(|result| result.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(results.iter().any(|result| matches!(result, Err(PkiError::TokenReplayed))), "{results:?}");
    for pki in &planes.planes {
        assert!(matches!(pki.register(token.as_str(), "w-1", &csr), Err(PkiError::TokenReplayed)));
    }

    // A token past its time to live, on the other control plane.
    let late = planes.plane(1).issue_token("w-3").unwrap();
    planes.clock.advance(TOKEN_TTL);
    let csr = AgentKey::generate().unwrap().csr_pem("w-3").unwrap();
    assert!(matches!(planes.plane(0).register(late.as_str(), "w-3", &csr), Err(PkiError::TokenExpired)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_on_one_control_plane_holds_on_the_others_from_the_moment_it_returns() {
    let Some(planes) = Planes::open("revocation", 2).await else { return };
    let (first, second) = (planes.plane(0), planes.plane(1));
    let worker = register(first, first, "w-1");
    assert_eq!(connect(mtls(second), client(second, &worker)).await.accepted(), "w-1");

    assert!(first.revoke_worker("w-1").unwrap());
    assert!(!second.revoke_worker("w-1").unwrap(), "already revoked, as the other one did");
    let refused = connect(mtls(second), client(second, &worker)).await.refused_by_server();
    assert_eq!(refused, rustls::Error::InvalidCertificate(CertificateError::Revoked));
    assert!(second.is_worker_revoked("w-1"));
    assert!(matches!(second.issue_token("w-1"), Err(PkiError::WorkerRevoked(_))));
    let csr = worker.key.csr_pem("w-1").unwrap();
    assert!(matches!(second.rotate(&worker.cert.cert_der, &csr), Err(PkiError::WorkerRevoked(_))));

    assert!(second.reinstate_worker("w-1").unwrap());
    assert_eq!(connect(mtls(first), client(first, &worker)).await.accepted(), "w-1");

    // One certificate, revoked on the second, is refused by the first.
    assert!(second.revoke_serial(&worker.cert.serial).unwrap());
    assert!(matches!(
        first.verify_worker_certificate(&worker.cert.cert_der),
        Err(PkiError::CertificateRevoked(ref serial)) if *serial == worker.cert.serial
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_rotated_on_another_control_plane_is_accepted_and_recorded_by_all() {
    let Some(planes) = Planes::open("rotation", 2).await else { return };
    let (first, second) = (planes.plane(0), planes.plane(1));
    let worker = register(first, first, "w-1");
    let rotated = second.rotate(&worker.cert.cert_der, &worker.key.csr_pem("w-1").unwrap()).unwrap();
    assert_ne!(rotated.serial, worker.cert.serial);
    let worker = Worker { key: worker.key, cert: rotated };
    assert_eq!(connect(mtls(first), client(first, &worker)).await.accepted(), "w-1");

    // Certificates live an hour (the default); a second rotation half-way through. (No
    // handshake from here on: the agent's side checks the hub's certificate on the real clock.)
    let half = Duration::from_secs(30 * 60);
    planes.clock.advance(half);
    let csr = worker.key.csr_pem("w-1").unwrap();
    let later = second.rotate(&worker.cert.cert_der, &csr).unwrap();
    assert_eq!(first.verify_worker_certificate(&later.cert_der).unwrap(), "w-1");
    // Past the earlier certificates' end, the record written by the other control plane keeps
    // the later one's.
    planes.clock.advance(half + Duration::from_secs(1));
    assert!(first.has_certified("w-1"));
    planes.clock.advance(half);
    assert!(!first.has_certified("w-1"), "every certificate it holds has expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn control_planes_built_on_one_database_register_workers_for_each_other() {
    let Some(db) = TestDatabase::new("control planes") else { return };
    let mut planes = Vec::new();
    for _ in 0..2 {
        let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let plane = hodei_server::ControlPlane::builder(dir.path()).shared(store).start().await.unwrap();
        planes.push((dir, plane));
    }
    let (first, second) = (planes[0].1.hub().pki(), planes[1].1.hub().pki());
    assert_eq!(first.ca_bundle_pem(), second.ca_bundle_pem());
    let worker = register(first, second, "w-1");
    assert_eq!(second.verify_worker_certificate(&worker.cert.cert_der).unwrap(), "w-1");
    assert!(
        !planes[0].0.path().join(hodei_server::pki::PKI_DIR).join(hodei_server::pki::CA_KEY_FILE).exists(),
        "no CA key in the data directory: it lives in the database"
    );
    for (_, plane) in planes {
        plane.shutdown().await.unwrap();
    }
}
