//! Registration and the session handshake over real tonic gRPC and mutual TLS on loopback.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hodei_agent::connect::{self, ConnectError, Session};
use hodei_agent::pki::{AgentKey, agent_client_config};
use hodei_agent::protocol::PROTOCOL;
use hodei_agent::protocol::v1::{
    AgentMessage, Heartbeat, Hello, ProtocolVersion, agent_message, hub_message,
};
use hodei_server::hub::{Hub, HubConfig, Listening};
use hodei_server::pki::{HubPki, PkiConfig, TlsIdentity, WorkerCertificate};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::Code;

/// A guard against a hang, never a means of synchronisation.
const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    _dir: TempDir,
    hub: Hub,
    registration: Listening,
    sessions: Listening,
}

impl Setup {
    async fn new() -> Self {
        Self::with_config(HubConfig::default().heartbeat(Duration::from_secs(5), Duration::from_secs(15)))
            .await
    }

    async fn with_config(config: HubConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(HubPki::open(dir.path(), PkiConfig::default()).unwrap());
        let hub = Hub::new(pki.clone(), config);
        let identity = pki.issue_server_identity(&["127.0.0.1", "localhost"]).unwrap();
        let registration = hub.serve_registration(bind().await, &identity).unwrap();
        let sessions = hub.serve_sessions(bind().await, &identity).unwrap();
        Self { _dir: dir, hub, registration, sessions }
    }

    fn ca(&self) -> &str {
        self.hub.pki().ca_bundle_pem()
    }

    fn token(&self, worker_id: &str) -> String {
        self.hub.pki().issue_token(worker_id).unwrap().as_str().to_owned()
    }

    async fn register(&self, worker_id: &str) -> TlsIdentity {
        let token = self.token(worker_id);
        let (key, cert): (AgentKey, WorkerCertificate) =
            within(connect::register(self.registration.local_addr(), self.ca(), worker_id, &token))
                .await
                .unwrap();
        assert_eq!(cert.worker_id, worker_id);
        key.identity(&cert).unwrap()
    }

    async fn open_session(&self, identity: &TlsIdentity, worker_id: &str) -> Result<Session, ConnectError> {
        within(connect::open_session(self.sessions.local_addr(), self.ca(), identity, worker_id)).await
    }

    /// Checks that a session was refused with `code` and a message naming each of `named`, that
    /// no worker got connected, and stops the hub.
    async fn refused(self, result: Result<Session, ConnectError>, code: Code, named: &[&str]) {
        let status = refused(result);
        assert_eq!(status.code(), code, "{status:?}");
        assert!(named.iter().all(|name| status.message().contains(name)), "{status:?}");
        assert!(self.hub.connected_workers().is_empty());
        self.stop().await;
    }

    async fn stop(self) {
        within(self.registration.shutdown()).await.unwrap();
        within(self.sessions.shutdown()).await.unwrap();
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .unwrap_or_else(|_| panic!("hung: did not finish within {LIMIT:?}"))
}

fn refused(result: Result<Session, ConnectError>) -> tonic::Status {
    match result {
        Err(ConnectError::Refused(status)) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_opens_a_session_and_heartbeats() {
    let setup = Setup::new().await;
    let identity = setup.register("w-1").await;
    let mut workers = setup.hub.watch_workers();
    assert!(setup.hub.connected_workers().is_empty());

    let before = SystemTime::now();
    let mut session = setup.open_session(&identity, "w-1").await.unwrap();
    let welcome = &session.welcome;
    assert_eq!(welcome.protocol, Some(PROTOCOL));
    assert_eq!(welcome.heartbeat_interval_ms, 5_000);
    assert_eq!(welcome.heartbeat_timeout_ms, 15_000);
    assert_eq!(welcome.log_batch_max_bytes, HubConfig::default().log_batch_max_bytes);
    assert_eq!(welcome.log_batch_max_delay_ms, 200);

    // The hub registers the worker before it sends Welcome, so it is listed by now.
    let connected = setup.hub.connected_workers();
    assert_eq!(connected.keys().collect::<Vec<_>>(), ["w-1"]);
    let since = connected["w-1"];
    assert!(since >= before - Duration::from_secs(1) && since <= SystemTime::now(), "{since:?}");
    assert_eq!(workers.current(), connected);

    let heartbeat =
        AgentMessage { kind: Some(agent_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: 1 })) };
    session.sender.send(heartbeat).await.unwrap();
    let reply = within(session.receiver.message()).await.unwrap().unwrap();
    match reply.kind {
        Some(hub_message::Kind::Heartbeat(beat)) => assert!(beat.sent_unix_ms > 1, "{beat:?}"),
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    // The hub answered the heartbeat, so it had noted it: the worker was heard from since it
    // connected.
    let heard = setup.hub.last_heard();
    assert_eq!(heard.keys().collect::<Vec<_>>(), ["w-1"]);
    assert!(heard["w-1"] >= since && heard["w-1"] <= SystemTime::now(), "{heard:?}");

    // The agent goes away: its side of the stream closes, and the hub forgets the worker.
    drop(session);
    let left = within(workers.wait_for(|workers| !workers.contains_key("w-1"))).await.unwrap();
    assert!(left.is_empty());
    assert!(setup.hub.connected_workers().is_empty());
    assert!(setup.hub.last_heard().is_empty());
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_token_is_refused_as_unauthenticated() {
    let setup = Setup::new().await;
    let token = setup.token("w-2");
    let addr = setup.registration.local_addr();
    within(connect::register(addr, setup.ca(), "w-2", &token)).await.unwrap();

    let err = within(connect::register(addr, setup.ca(), "w-2", &token)).await.unwrap_err();
    let ConnectError::Refused(status) = err else { panic!("expected a refusal, got {err:?}") };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("already used"), "{status:?}");
    assert!(!status.message().contains(&token), "the token does not leak into the status");

    // A session on the registration listener is refused too: it asks for no certificate.
    let channel = connect::channel(addr, agent_client_config(setup.ca(), None).unwrap()).await.unwrap();
    let status = refused(within(connect::start_session(channel, connect::hello("w-2"))).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_protocol_2_is_refused_with_both_versions_named() {
    let setup = Setup::new().await;
    let identity = setup.register("w-3").await;
    let tls = agent_client_config(setup.ca(), Some(&identity)).unwrap();
    let channel = connect::channel(setup.sessions.local_addr(), tls).await.unwrap();
    let mut hello = connect::hello("w-3");
    hello.protocol = Some(ProtocolVersion { major: 2, minor: 0 });

    let result = within(connect::start_session(channel, hello)).await;
    let ours = format!("{}.{}", PROTOCOL.major, PROTOCOL.minor);
    setup.refused(result, Code::FailedPrecondition, &["2.0", &ours]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_for_another_worker_is_permission_denied() {
    let setup = Setup::new().await;
    let identity = setup.register("w-4").await;

    let result = setup.open_session(&identity, "w-5").await;
    setup.refused(result, Code::PermissionDenied, &["w-4", "w-5"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_cannot_open_a_session() {
    let setup = Setup::new().await;
    let tls = agent_client_config(setup.ca(), None).unwrap();
    // In TLS 1.3 the refusal of a missing certificate may arrive after the client's handshake
    // is done, so it shows either as a failed connection or as a failed call.
    let outcome = match within(connect::channel(setup.sessions.local_addr(), tls)).await {
        Err(err) => err,
        Ok(channel) => within(connect::start_session(channel, connect::hello("w-6"))).await.unwrap_err(),
    };
    assert!(
        matches!(outcome, ConnectError::Transport { .. } | ConnectError::Refused(_)),
        "unexpected failure: {outcome:?}"
    );
    if let ConnectError::Refused(status) = &outcome {
        // A connection-level failure (the `CertificateRequired` alert, or the connection closed
        // by it), not a status the service sent: no request reached it.
        assert!(matches!(status.code(), Code::Unavailable | Code::Cancelled | Code::Unknown), "{status:?}");
        let source = std::error::Error::source(status);
        assert!(source.is_some_and(|e| e.is::<tonic::transport::Error>()), "a transport error: {status:?}");
    }
    assert!(setup.hub.connected_workers().is_empty());
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_hub_ends_open_sessions() {
    let setup = Setup::new().await;
    let identity = setup.register("w-7").await;
    let mut session = setup.open_session(&identity, "w-7").await.unwrap();
    let mut workers = setup.hub.watch_workers();
    assert!(workers.current().contains_key("w-7"));

    // The agent keeps its stream open; the shutdown must not wait for it.
    let Setup { hub, registration, sessions, _dir } = setup;
    within(sessions.shutdown()).await.unwrap();
    within(registration.shutdown()).await.unwrap();
    let status = within(session.receiver.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    within(workers.wait_for(|workers| workers.is_empty())).await.unwrap();
    assert!(hub.connected_workers().is_empty());
}

/// Opens a session for `w-held` whose Hello offers `offered` bytes of held output per job, and
/// returns what the hub's Welcome allows.
async fn negotiated_max_held(config: HubConfig, offered: u64) -> u64 {
    let setup = Setup::with_config(config).await;
    let identity = setup.register("w-held").await;
    let tls = agent_client_config(setup.ca(), Some(&identity)).unwrap();
    let channel = connect::channel(setup.sessions.local_addr(), tls).await.unwrap();
    let hello = Hello { max_held_bytes: offered, ..connect::hello("w-held") };
    let session = within(connect::start_session(channel, hello)).await.unwrap();
    let allowed = session.welcome.max_held_bytes;
    drop(session);
    setup.stop().await;
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_held_output_bound_is_the_smaller_of_the_agent_s_and_the_hub_s() {
    let hub_allows_4_mib = HubConfig::default().max_held_bytes(4 << 20);
    assert_eq!(negotiated_max_held(hub_allows_4_mib.clone(), 1 << 20).await, 1 << 20);
    assert_eq!(negotiated_max_held(hub_allows_4_mib, 16 << 20).await, 4 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_protocol_1_0_is_taken_to_hold_8_mib() {
    // A 1.0 agent sends no bound (0): it holds 8 MiB, so a hub sized for more offers 8 MiB.
    let hub_allows_16_mib = HubConfig::default().max_held_bytes(16 << 20);
    assert_eq!(negotiated_max_held(hub_allows_16_mib, 0).await, 8 << 20);
}
