//! Shared by the end-to-end job tests: a real hub with a log store, the agent's run loop
//! in-process, real child processes, over mutual TLS on loopback; and by the operator API's
//! tests (`api`: a server for a test's engine, and its client).

// Each test crate uses its own part of this.
#![allow(dead_code)]

pub mod agent_binary;
pub mod api;
pub mod browser;
pub mod node_sagas;
pub mod raw_worker;
pub mod sagas;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hodei_agent::agent::{self, BackoffPolicy, Command, Settings};
use hodei_agent::protocol::v1;
use hodei_server::hub::{Hub, HubConfig, HubError, Listening};
use hodei_server::logstore::{LogStore, LogStream};
use hodei_server::pki::{HubPki, PkiConfig};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A guard against a hang, never a means of synchronisation.
pub const LIMIT: Duration = Duration::from_secs(60);

pub const WORKER: &str = "w-jobs";

pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .unwrap_or_else(|_| panic!("hung: did not finish within {LIMIT:?}"))
}

pub struct Setup {
    _dir: TempDir,
    pub hub: Hub,
    env: Vec<(&'static str, String)>,
    pub logs: Arc<LogStore>,
    settings: Settings,
    _registration: Listening,
    _sessions: Listening,
    stop: Option<oneshot::Sender<()>>,
    agent: Option<JoinHandle<Result<(), agent::AgentError>>>,
}

impl Setup {
    /// A hub with a log store, and an agent connected to it.
    pub async fn new() -> Self {
        let mut setup = Self::hub(Self::config()).await;
        setup.start_agent().await;
        setup
    }

    fn config() -> HubConfig {
        // Short batch delays keep the tests fast; the heartbeat never matters here.
        HubConfig::default()
            .heartbeat(Duration::from_secs(5), Duration::from_secs(15))
            .log_batches(64 * 1024, Duration::from_millis(10))
            // Long enough for an agent restarted by a test to reconnect, short for a worker that never comes.
            .worker_wait(Duration::from_secs(2))
    }

    /// A hub with a log store and `config`, and no agent yet.
    pub async fn hub(config: HubConfig) -> Self {
        Self::hub_with_pki(config, PkiConfig::default()).await
    }

    /// [`Setup::hub`] with its PKI configured by `pki`.
    pub async fn hub_with_pki(config: HubConfig, pki: PkiConfig) -> Self {
        Self::hub_in(config, pki, None).await
    }

    /// [`Setup::new`], with the log store in `store` (a small filesystem, say).
    pub async fn with_logs_in(store: &Path) -> Self {
        let mut setup = Self::hub_in(Self::config(), PkiConfig::default(), Some(store)).await;
        setup.start_agent().await;
        setup
    }

    /// A hub on `logs` (a store shared with other control planes, say), and no agent yet.
    pub async fn hub_on(logs: Arc<LogStore>) -> Self {
        Self::assemble(tempfile::tempdir().unwrap(), Self::config(), PkiConfig::default(), logs).await
    }

    async fn hub_in(config: HubConfig, pki: PkiConfig, store: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = store.map_or_else(|| dir.path().join("store"), Path::to_path_buf);
        let logs = Arc::new(LogStore::open(store).await.unwrap());
        Self::assemble(dir, config, pki, logs).await
    }

    async fn assemble(dir: TempDir, config: HubConfig, pki: PkiConfig, logs: Arc<LogStore>) -> Self {
        let pki = Arc::new(HubPki::open(&dir.path().join("hub"), pki).unwrap());
        let hub = Hub::new(pki.clone(), config).with_logs(logs.clone());
        let identity = pki.issue_server_identity(&["127.0.0.1"]).unwrap();
        let registration =
            hub.serve_registration(TcpListener::bind("127.0.0.1:0").await.unwrap(), &identity).unwrap();
        let sessions =
            hub.serve_sessions(TcpListener::bind("127.0.0.1:0").await.unwrap(), &identity).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pki.ca_bundle_pem()).unwrap();
        let env = [
            ("HODEI_REGISTRATION_ADDR", registration.local_addr().to_string()),
            ("HODEI_SESSION_ADDR", sessions.local_addr().to_string()),
            ("HODEI_WORKER_ID", WORKER.to_owned()),
            ("HODEI_CA_BUNDLE", ca.display().to_string()),
            ("HODEI_WORK_DIR", dir.path().join("work").display().to_string()),
            ("HODEI_TOKEN", pki.issue_token(WORKER).unwrap().as_str().to_owned()),
        ];
        let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        let Command::Run(mut settings) = Settings::parse([], lookup).unwrap() else { panic!("not run") };
        settings.backoff =
            BackoffPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(200) };
        Self {
            _dir: dir,
            hub,
            logs,
            env: env.to_vec(),
            settings,
            _registration: registration,
            _sessions: sessions,
            stop: None,
            agent: None,
        }
    }

    /// The agent binary's environment for [`WORKER`]: it registers with the token, or reuses
    /// the certificate stored in the work directory by an earlier agent.
    pub fn binary_env(&self) -> &[(&'static str, String)] {
        &self.env
    }

    /// Starts the agent's run loop and waits until its session is up.
    pub async fn start_agent(&mut self) {
        let mut workers = self.hub.watch_workers();
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.agent = Some(tokio::spawn(agent::run(self.settings.clone(), async move {
            let _ = stopped.await;
        })));
        within(workers.wait_for(|workers| workers.contains_key(WORKER))).await.unwrap();
    }

    /// Stops the agent and waits for its run loop to return.
    pub async fn stop_agent(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(agent) = self.agent.take() {
            within(agent).await.unwrap().unwrap();
        }
    }

    /// Everything stored for `stream` of `job`.
    pub async fn stored(&self, job: &str, stream: LogStream) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = self.logs.read(job, stream, out.len() as u64, 1 << 20).await.unwrap();
            if chunk.bytes.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk.bytes);
        }
    }

    /// Runs `echo ready; sleep 1000` as `job` and returns once `ready` is stored.
    pub async fn start_waiting_job(&self, job: &str) -> JoinHandle<Result<v1::JobResult, HubError>> {
        let (hub, spec) = (self.hub.clone(), shell(job, "echo ready; sleep 1000"));
        let run = tokio::spawn(async move { hub.run_job(WORKER, spec).await });
        self.wait_for_stdout(job, b"ready\n").await;
        run
    }

    /// Waits until `job`'s stored stdout contains `needle`, following the store (no polling).
    pub async fn wait_for_stdout(&self, job: &str, needle: &[u8]) {
        let mut follower = self.logs.follow(job, LogStream::Stdout, 0).await.unwrap();
        let mut seen = Vec::new();
        within(async {
            while !seen.windows(needle.len()).any(|w| w == needle) {
                let chunk = follower.next().await.expect("the log is still open").unwrap();
                seen.extend_from_slice(&chunk.bytes);
            }
        })
        .await;
    }
}

/// A spec running `sh -c script` with a minimal PATH (jobs start with an empty environment).
pub fn shell(job_id: &str, script: &str) -> v1::JobSpec {
    v1::JobSpec {
        job_id: job_id.to_owned(),
        command: vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()],
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        cancel_grace_ms: 2_000,
        ..v1::JobSpec::default()
    }
}

/// `GET path` over HTTPS to `addr`, trusting only `ca_pem`, with `server_name` as the TLS name;
/// the whole raw response (status line, headers, body).
pub async fn https_get(addr: std::net::SocketAddr, ca_pem: &str, server_name: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let roots =
        hodei_agent::pki::root_store(&hodei_agent::pki::parse_certs(ca_pem, "CA certificate").unwrap())
            .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(hodei_agent::pki::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let mut tls = within(connector.connect(name, tcp)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within(tls.read_to_string(&mut response)).await.unwrap();
    response
}
