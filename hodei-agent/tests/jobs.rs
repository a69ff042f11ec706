//! Jobs end to end: a real hub with a log store, the agent's run loop in-process, real child
//! processes, over mutual TLS on loopback.

use std::sync::Arc;
use std::time::Duration;

use hodei_agent::agent::{self, BackoffPolicy, Command, Settings};
use hodei_agent::hub::{Hub, HubConfig, HubError, Listening};
use hodei_agent::logstore::{LogStore, LogStream};
use hodei_agent::pki::{HubPki, PkiConfig};
use hodei_agent::protocol::v1::{self, job_result::Outcome};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A guard against a hang, never a means of synchronisation.
const LIMIT: Duration = Duration::from_secs(20);

const WORKER: &str = "w-jobs";

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future).await.expect("finished in time")
}

struct Setup {
    _dir: TempDir,
    hub: Hub,
    logs: Arc<LogStore>,
    _registration: Listening,
    _sessions: Listening,
    stop: Option<oneshot::Sender<()>>,
    agent: Option<JoinHandle<Result<(), agent::AgentError>>>,
}

impl Setup {
    /// A hub with a log store, and an agent connected to it.
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(HubPki::open(&dir.path().join("hub"), PkiConfig::default()).unwrap());
        let logs = Arc::new(LogStore::open(dir.path().join("store")).await.unwrap());
        // Short batch delays keep the tests fast; the heartbeat never matters here.
        let config = HubConfig::default()
            .heartbeat(Duration::from_secs(5), Duration::from_secs(15))
            .log_batches(64 * 1024, Duration::from_millis(10));
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
        let lookup = move |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        let Command::Run(mut settings) = Settings::parse([], lookup).unwrap() else { panic!("not run") };
        settings.backoff =
            BackoffPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(200) };
        let mut workers = hub.watch_workers();
        let (stop, stopped) = oneshot::channel::<()>();
        let agent = tokio::spawn(agent::run(settings, async move {
            let _ = stopped.await;
        }));
        within(workers.wait_for(|workers| workers.contains_key(WORKER))).await.unwrap();
        Self {
            _dir: dir,
            hub,
            logs,
            _registration: registration,
            _sessions: sessions,
            stop: Some(stop),
            agent: Some(agent),
        }
    }

    /// Stops the agent and waits for its run loop to return.
    async fn stop_agent(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(agent) = self.agent.take() {
            within(agent).await.unwrap().unwrap();
        }
    }

    /// Everything stored for `stream` of `job`.
    async fn stored(&self, job: &str, stream: LogStream) -> Vec<u8> {
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
    async fn start_waiting_job(&self, job: &str) -> JoinHandle<Result<v1::JobResult, HubError>> {
        let (hub, spec) = (self.hub.clone(), shell(job, "echo ready; sleep 1000"));
        let run = tokio::spawn(async move { hub.run_job(WORKER, spec).await });
        self.wait_for_stdout(job, b"ready\n").await;
        run
    }

    /// Waits until `job`'s stored stdout contains `needle`, following the store (no polling).
    async fn wait_for_stdout(&self, job: &str, needle: &[u8]) {
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
fn shell(job_id: &str, script: &str) -> v1::JobSpec {
    v1::JobSpec {
        job_id: job_id.to_owned(),
        command: vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()],
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        cancel_grace_ms: 2_000,
        ..v1::JobSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_and_its_whole_output_and_exit_code_are_stored() {
    let mut setup = Setup::new().await;
    let spec = shell("saga-1/build", "for i in $(seq 1 2000); do echo line $i; done; echo oops >&2; exit 3");
    let result = within(setup.hub.run_job(WORKER, spec)).await.unwrap();

    let expected: String = (1..=2000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(3)), "{result:?}");
    assert_eq!(result.stdout_bytes, expected.len() as u64);
    assert_eq!(result.stderr_bytes, "oops\n".len() as u64);
    assert!(["cgroup", "proc"].contains(&result.metrics_source.as_str()), "{result:?}");
    assert_eq!(setup.stored("saga-1/build", LogStream::Stdout).await, expected.as_bytes());
    assert_eq!(setup.stored("saga-1/build", LogStream::Stderr).await, b"oops\n");
    assert!(setup.logs.status("saga-1/build").await.unwrap().closed, "closed once the result is in");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_sent_with_the_job_is_masked_in_the_stored_log() {
    let mut setup = Setup::new().await;
    let secret = "hunter2-very-secret";
    // The runner's stdin header sets `TOKEN=<base64>` for `sh -s`; the script prints it decoded.
    let spec = v1::JobSpec {
        job_id: "saga-2/deploy".to_owned(),
        interpreter: vec!["/bin/sh".to_owned(), "-s".to_owned()],
        script: "echo \"token: $(printf %s \"$TOKEN\" | base64 -d)\"\n".to_owned(),
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        secrets: [("TOKEN".to_owned(), secret.to_owned())].into(),
        ..v1::JobSpec::default()
    };
    let result = within(setup.hub.run_job(WORKER, spec)).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");

    let stored = setup.stored("saga-2/deploy", LogStream::Stdout).await;
    assert_eq!(String::from_utf8_lossy(&stored), "token: ***\n");
    assert!(!stored.windows(secret.len()).any(|w| w == secret.as_bytes()));
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_returns_a_cancelled_result() {
    let mut setup = Setup::new().await;
    let run = setup.start_waiting_job("saga-3/wait").await;

    within(setup.hub.cancel_job(WORKER, "saga-3/wait", "the saga was aborted")).await.unwrap();
    let result = within(run).await.unwrap().unwrap();
    assert_eq!(result.outcome, Some(Outcome::Cancelled("the saga was aborted".to_owned())), "{result:?}");
    assert_eq!(setup.stored("saga-3/wait", LogStream::Stdout).await, b"ready\n");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_goes_away_fails_with_worker_lost() {
    let mut setup = Setup::new().await;
    let run = setup.start_waiting_job("saga-4/wait").await;

    setup.stop_agent().await;
    let error = within(run).await.unwrap().unwrap_err();
    assert!(matches!(&error, HubError::WorkerLost { job_id, .. } if job_id == "saga-4/wait"), "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_for_an_unknown_worker_are_refused() {
    let mut setup = Setup::new().await;
    let error = within(setup.hub.run_job("w-nobody", shell("saga-5/x", "true"))).await.unwrap_err();
    assert!(matches!(&error, HubError::UnknownWorker { worker_id } if worker_id == "w-nobody"), "{error:?}");
    setup.stop_agent().await;
}

#[tokio::test]
async fn a_hub_without_a_log_store_runs_no_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(HubPki::open(dir.path(), PkiConfig::default()).unwrap());
    let hub = Hub::new(pki, HubConfig::default());
    let error = hub.run_job(WORKER, shell("saga-6/x", "true")).await.unwrap_err();
    assert!(matches!(error, HubError::NoLogStore), "{error:?}");
}
