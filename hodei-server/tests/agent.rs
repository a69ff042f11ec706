//! The `hodei-agent` program: its settings errors through the built binary, and its run loop
//! against a real hub on loopback, in-process and as a child process.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command as Process, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hodei_agent::agent::{self, BackoffPolicy, Command, Settings};
use hodei_server::hub::{Hub, HubConfig, Listening, WorkersWatch};
use hodei_server::pki::{HubPki, PkiConfig, TlsIdentity};
use rustix::process::{Pid, Signal};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A guard against a hang, never a means of synchronisation.
const LIMIT: Duration = Duration::from_secs(60);

#[path = "support/agent_binary.rs"]
mod agent_binary;
use agent_binary::agent_binary;

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .unwrap_or_else(|_| panic!("hung: did not finish within {LIMIT:?}"))
}

struct Setup {
    dir: TempDir,
    hub: Hub,
    identity: TlsIdentity,
    _registration: Listening,
    registration_addr: SocketAddr,
    sessions: Listening,
}

impl Setup {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(HubPki::open(&dir.path().join("hub"), PkiConfig::default()).unwrap());
        let config = HubConfig::default().heartbeat(Duration::from_secs(5), Duration::from_secs(15));
        let hub = Hub::new(pki.clone(), config);
        let identity = pki.issue_server_identity(&["127.0.0.1"]).unwrap();
        let registration = hub.serve_registration(bind("127.0.0.1:0").await, &identity).unwrap();
        let sessions = hub.serve_sessions(bind("127.0.0.1:0").await, &identity).unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.ca_bundle_pem()).unwrap();
        let registration_addr = registration.local_addr();
        Self { dir, hub, identity, _registration: registration, registration_addr, sessions }
    }

    fn token(&self, worker_id: &str) -> String {
        self.hub.pki().issue_token(worker_id).unwrap().as_str().to_owned()
    }

    fn work_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("work")
    }

    /// The agent's settings as environment variables.
    fn env(&self, worker_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("HODEI_REGISTRATION_ADDR", self.registration_addr.to_string()),
            ("HODEI_SESSION_ADDR", self.sessions.local_addr().to_string()),
            ("HODEI_WORKER_ID", worker_id.to_owned()),
            ("HODEI_CA_BUNDLE", self.dir.path().join("ca.pem").display().to_string()),
            ("HODEI_WORK_DIR", self.work_dir().display().to_string()),
        ]
    }
}

/// Binds `addr`. A listener just shut down may still hold the port for a moment (its accept task
/// ends on its own), so `AddrInUse` is retried, yielding, within the limit.
async fn bind(addr: &str) -> TcpListener {
    within(async {
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => tokio::task::yield_now().await,
                Err(e) => panic!("bind {addr}: {e}"),
            }
        }
    })
    .await
}

async fn listed(workers: &mut WorkersWatch, worker_id: &str, yes: bool) {
    within(workers.wait_for(|workers| workers.contains_key(worker_id) == yes)).await.unwrap();
}

/// Runs the binary with `args` and `env` only, to completion.
fn run_binary(args: &[&str], env: &[(&str, String)]) -> Output {
    Process::new(agent_binary())
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

/// Exit code 2 and one line on stderr that names every one of `named`.
fn assert_usage_error(output: &Output, named: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(named.iter().all(|name| stderr.contains(name)), "{stderr}");
}

fn valid_env(dir: &Path) -> Vec<(&'static str, String)> {
    let ca = dir.join("ca.pem");
    let pki = HubPki::open(&dir.join("hub"), PkiConfig::default()).unwrap();
    std::fs::write(&ca, pki.ca_bundle_pem()).unwrap();
    vec![
        ("HODEI_REGISTRATION_ADDR", "127.0.0.1:1".to_owned()),
        ("HODEI_SESSION_ADDR", "127.0.0.1:2".to_owned()),
        ("HODEI_WORKER_ID", "w-1".to_owned()),
        ("HODEI_CA_BUNDLE", ca.display().to_string()),
        ("HODEI_WORK_DIR", dir.join("work").display().to_string()),
    ]
}

#[test]
fn bad_settings_are_one_line_errors_naming_the_setting_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let env = valid_env(dir.path());
    let without = |name: &str| env.iter().filter(|(k, _)| *k != name).cloned().collect::<Vec<_>>();

    assert_usage_error(
        &run_binary(&[], &without("HODEI_WORKER_ID")),
        &["--worker-id", "HODEI_WORKER_ID", "missing"],
    );
    assert_usage_error(
        &run_binary(&["--ca-bundle", "/nonexistent/ca.pem"], &env),
        &["--ca-bundle", "HODEI_CA_BUNDLE", "/nonexistent/ca.pem"],
    );
    assert_usage_error(
        &run_binary(&["--session-addr=localhost"], &env),
        &["--session-addr", "HODEI_SESSION_ADDR", "localhost"],
    );
    assert_usage_error(&run_binary(&["--frobnicate", "1"], &env), &["--frobnicate"]);
    assert_usage_error(&run_binary(&["--worker-id"], &env), &["--worker-id", "needs a value"]);
}

#[test]
fn help_exits_0_and_documents_every_variable() {
    let output = run_binary(&["--help"], &[]);
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8(output.stdout).unwrap();
    for name in [
        "HODEI_REGISTRATION_ADDR",
        "HODEI_SESSION_ADDR",
        "HODEI_WORKER_ID",
        "HODEI_TOKEN",
        "HODEI_TOKEN_FILE",
        "HODEI_CA_BUNDLE",
        "HODEI_WORK_DIR",
        "/proc",
    ] {
        assert!(help.contains(name), "{name} in {help}");
    }
}

#[test]
fn flags_win_over_variables_and_the_token_is_not_in_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let env = valid_env(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "from-file\n").unwrap();
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| (name == "HODEI_TOKEN").then(|| "from-env".to_owned()))
    };
    let args = ["--worker-id", "w-9", "--token-file", token_file.to_str().unwrap()].map(String::from);
    let Command::Run(settings) = Settings::parse(args, lookup).unwrap() else { panic!("not run") };
    assert_eq!(settings.worker_id, "w-9");
    assert_eq!(settings.token.as_deref(), Some("from-file"), "a flag beats the variable");
    assert!(!format!("{settings:?}").contains("from-file"));

    let Command::Run(settings) = Settings::parse([], lookup).unwrap() else { panic!("not run") };
    assert_eq!((settings.worker_id.as_str(), settings.token.as_deref()), ("w-1", Some("from-env")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_registers_and_reconnects_to_a_restarted_session_listener() {
    let mut setup = Setup::new().await;
    let mut workers = setup.hub.watch_workers();
    let env = setup.env("w-1");
    let token = setup.token("w-1");
    let lookup = move |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .or((name == "HODEI_TOKEN").then(|| token.clone()))
    };
    let Command::Run(mut settings) = Settings::parse([], lookup).unwrap() else { panic!("not run") };
    settings.backoff = BackoffPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(200) };
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(settings, async move {
        let _ = stopped.await;
    }));

    listed(&mut workers, "w-1", true).await;
    let key = setup.work_dir().join("agent.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(setup.work_dir().join("agent.crt").exists());

    // The hub's session listener goes away and comes back on the same address.
    let addr = setup.sessions.local_addr();
    within(setup.sessions.shutdown()).await.unwrap();
    listed(&mut workers, "w-1", false).await;
    setup.sessions = setup.hub.serve_sessions(bind(&addr.to_string()).await, &setup.identity).unwrap();
    listed(&mut workers, "w-1", true).await;

    stop.send(()).unwrap();
    within(agent).await.unwrap().unwrap();
    listed(&mut workers, "w-1", false).await;
}

/// Starts the binary with `env`, waits until the hub lists it, stops it with SIGTERM, and
/// returns its stderr after checking it exited 0.
async fn run_until_listed_then_terminate(setup: &Setup, env: &[(&str, String)]) -> String {
    let mut workers = setup.hub.watch_workers();
    let child = Process::new(agent_binary())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    listed(&mut workers, "w-2", true).await;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let output =
        within(tokio::task::spawn_blocking(move || child.wait_with_output())).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    listed(&mut workers, "w-2", false).await;
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_stops_on_sigterm_and_a_restart_reuses_its_certificate() {
    let setup = Setup::new().await;
    let mut env = setup.env("w-2");
    env.push(("HODEI_TOKEN", setup.token("w-2")));
    let first = run_until_listed_then_terminate(&setup, &env).await;
    assert!(first.contains(&setup.registration_addr.to_string()), "{first}");
    assert!(first.contains("registered"), "{first}");

    // No token this time: the stored key and certificate are enough.
    env.pop();
    let second = run_until_listed_then_terminate(&setup, &env).await;
    assert!(second.contains("reusing the stored certificate"), "{second}");
    assert!(second.contains(&setup.sessions.local_addr().to_string()), "{second}");
}
