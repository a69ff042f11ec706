//! The real path every agent figure is taken on: a hub with its PKI, both listeners and its log
//! store in a temporary directory, and agents connected to it over mutual TLS on loopback,
//! either in this process (as the local provider runs them in-process) or as a child process:
//! this bench binary run again with [`CHILD_FLAG`], so that its memory can be read from `/proc`.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hodei::agent::agent::{self, AgentError, Command, Settings};
use hodei::agent::pki::AgentKey;
use hodei::agent::protocol::v1;
use hodei::server::hub::{Hub, HubConfig, Listening};
use hodei::server::logstore::{LogStore, LogStoreConfig, LogStream};
use hodei::server::pki::{HubPki, PkiConfig, TlsIdentity};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The first argument that makes this binary an agent instead of a benchmark.
pub const CHILD_FLAG: &str = "--hodei-agent-child";

/// A guard against a hang, never a means of synchronisation: long enough for a gigabyte on a
/// loaded machine.
pub const LIMIT: Duration = Duration::from_secs(600);

pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future).await.unwrap_or_else(|_| panic!("{what} took over {LIMIT:?}"))
}

/// A hub as the control plane embeds it, with the production defaults for sessions and batches.
pub struct HubSetup {
    dir: TempDir,
    pub pki: Arc<HubPki>,
    pub hub: Hub,
    pub logs: Arc<LogStore>,
    pub identity: TlsIdentity,
    pub ca_path: PathBuf,
    pub registration: Listening,
    pub sessions: Listening,
}

impl HubSetup {
    /// `max_stream_bytes` is the log store's per-stream cap: a throughput figure sets it above its
    /// volume, so that every byte is written and fsync'd as a normal job's log is.
    pub async fn start(max_stream_bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("creating the hub's directory");
        let pki = Arc::new(HubPki::open(&dir.path().join("hub"), PkiConfig::default()).expect("the hub PKI"));
        let config = LogStoreConfig::default().with_max_stream_bytes(max_stream_bytes);
        let logs = Arc::new(
            LogStore::open_with_config(dir.path().join("store"), config)
                .await
                .expect("opening the log store"),
        );
        let hub = Hub::new(pki.clone(), HubConfig::default()).with_logs(logs.clone());
        let identity = pki.issue_server_identity(&["127.0.0.1"]).expect("the hub's server identity");
        let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port") };
        let registration = hub.serve_registration(bind().await, &identity).expect("serving registration");
        let sessions = hub.serve_sessions(bind().await, &identity).expect("serving sessions");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, pki.ca_bundle_pem()).expect("writing the CA bundle");
        Self { dir, pki, hub, logs, identity, ca_path, registration, sessions }
    }

    /// What an operator gives a new worker: the addresses, the CA bundle, a fresh one-time token
    /// and an empty work directory, so that the agent generates its key and registers.
    fn agent_env(&self, worker: &str) -> Vec<(&'static str, String)> {
        let token = self.pki.issue_token(worker).expect("issuing a registration token");
        vec![
            ("HODEI_REGISTRATION_ADDR", self.registration.local_addr().to_string()),
            ("HODEI_SESSION_ADDR", self.sessions.local_addr().to_string()),
            ("HODEI_WORKER_ID", worker.to_owned()),
            ("HODEI_CA_BUNDLE", self.ca_path.display().to_string()),
            ("HODEI_WORK_DIR", self.dir.path().join("work").join(worker).display().to_string()),
            ("HODEI_TOKEN", token.as_str().to_owned()),
        ]
    }

    /// A registered worker's mTLS identity, made without an agent: for the raw baselines.
    pub fn worker_identity(&self, worker: &str) -> TlsIdentity {
        let key = AgentKey::generate().expect("generating a worker key");
        let token = self.pki.issue_token(worker).expect("issuing a registration token");
        let csr = key.csr_pem(worker).expect("a CSR");
        let certificate = self.pki.register(token.as_str(), worker, &csr).expect("registering");
        key.identity(&certificate).expect("the worker's identity")
    }

    /// Starts `agent::run` in this process as a new worker and waits until the hub lists its
    /// session. Returns the agent and the time from the call to `run` to that point.
    pub async fn start_in_process(&self, worker: &str) -> (InProcessAgent, Duration) {
        let env = self.agent_env(worker);
        let mut workers = self.hub.watch_workers();
        let started = Instant::now();
        let lookup = move |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        let Command::Run(settings) = Settings::parse([], lookup).expect("valid agent settings") else {
            panic!("the agent's settings asked for help")
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent::run(settings, async move {
            let _ = stopped.await;
        }));
        within("registration", workers.wait_for(|workers| workers.contains_key(worker)))
            .await
            .expect("the hub is up");
        let took = started.elapsed();
        (InProcessAgent { stop, task }, took)
    }

    /// Starts this binary as an agent process for a new worker and waits until the hub lists its
    /// session. Returns the agent and the time from the spawn to that point.
    pub async fn start_child(&self, worker: &str) -> (ChildAgent, Duration) {
        let env = self.agent_env(worker);
        let mut workers = self.hub.watch_workers();
        let verbose = std::env::var_os("HODEI_BENCH_VERBOSE").is_some();
        let output = || if verbose { Stdio::inherit() } else { Stdio::null() };
        let started = Instant::now();
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("this bench's path"))
            .arg(CHILD_FLAG)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(output())
            .stderr(output())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the agent process");
        // Taken first: `Child::wait` closes a stdin it still holds, which would stop the agent.
        let stdin = child.stdin.take();
        within("registration of the agent process", async {
            tokio::select! {
                seen = workers.wait_for(|workers| workers.contains_key(worker)) => seen.expect("the hub is up"),
                status = child.wait() => panic!(
                    "the agent process ended before connecting ({status:?}); HODEI_BENCH_VERBOSE=1 shows its output"
                ),
            }
        })
        .await;
        let took = started.elapsed();
        let pid = child.id().expect("the agent process is running");
        (ChildAgent { child, pid, stdin }, took)
    }
}

pub struct InProcessAgent {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl InProcessAgent {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        within("stopping the agent", self.task)
            .await
            .expect("the agent task")
            .expect("the agent ran cleanly");
    }
}

/// An agent process; it stops when its stdin closes, so that no signal handling is involved.
pub struct ChildAgent {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
}

impl ChildAgent {
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        let status = within("stopping the agent process", self.child.wait()).await.expect("waiting");
        assert!(status.success(), "the agent process ended with {status}");
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`), `None` once the process is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line =
        status.lines().find(|line| line.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// A job spec as a step would send it: an empty environment but a PATH.
pub fn job(job_id: &str, command: &[&str]) -> v1::JobSpec {
    v1::JobSpec {
        job_id: job_id.to_owned(),
        command: command.iter().map(|&arg| arg.to_owned()).collect(),
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        cancel_grace_ms: 2_000,
        ..v1::JobSpec::default()
    }
}

/// Runs `spec` on `worker` and checks that it exited 0 with `stdout_bytes` of output, all of it
/// in the log store. Returns the time `run_job` took.
pub async fn run_checked_job(
    setup: &HubSetup,
    worker: &str,
    spec: v1::JobSpec,
    stdout_bytes: u64,
) -> Duration {
    let job_id = spec.job_id.clone();
    let started = Instant::now();
    let result = within("a job", setup.hub.run_job(worker, spec)).await.expect("running the job");
    let took = started.elapsed();
    assert_eq!(result.outcome, Some(v1::job_result::Outcome::ExitCode(0)), "job {job_id}");
    assert_eq!(result.stdout_bytes, stdout_bytes, "stdout bytes the agent sent for {job_id}");
    let status = setup.logs.status(&job_id).await.expect("the job's log status");
    assert_eq!(status.stream(LogStream::Stdout).end, stdout_bytes, "stdout bytes the hub took for {job_id}");
    took
}

/// `main` of the agent process: `agent::run` as the `hodei-agent` binary runs it (settings from
/// flags and env, a multi-threaded runtime), until stdin closes.
pub fn child_main(args: Vec<String>) -> ExitCode {
    let settings = match Settings::parse(args, |name| std::env::var(name).ok()) {
        Ok(Command::Run(settings)) => settings,
        Ok(Command::Help) => {
            print!("{}", agent::help());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("hodei-agent (bench child): {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hodei-agent (bench child): cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (closed, stdin_closed) = oneshot::channel::<()>();
    // A plain thread: reading stdin to its end is all it does, and tokio's stdin wants a feature.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed.send(());
    });
    match runtime.block_on(agent::run(settings, async move {
        let _ = stdin_closed.await;
    })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hodei-agent (bench child): {e}");
            ExitCode::FAILURE
        }
    }
}
