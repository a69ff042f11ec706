//! A control plane killed with SIGKILL in the middle of a job, and started again on the same
//! data directory, while the agent (the real binary, its own process) and the job go on.
//!
//! The test binary runs itself again as the control plane (filtered to
//! `control_plane_process`, which does nothing in a normal run), so the kill is a real one:
//! no destructor, no flush, no goodbye on the session. The job prints 100,000 numbered lines,
//! half before the kill and half while the control plane is down, then ends before it is back.
//! The restarted control plane's step re-attaches to the job instead of running it again, and
//! the stored log holds every line exactly once, in order. The job also receives a secret,
//! which must not appear in the log, the journal's files, or the job's environment or
//! command line.

#[path = "support/agent_binary.rs"]
mod agent_binary;
use agent_binary::agent_binary;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hodei_core::{Engine, Outcome, RetryPolicy, SagaContext, SagaDefinition, SagaRun, SledStore};
use hodei_server::hub::{Hub, HubConfig};
use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, MemorySecrets, RemoteJobs};
use hodei_server::logstore::{LogStore, LogStream};
use hodei_server::pki::{HubPki, PkiConfig};
use tokio::net::TcpListener;

const CHILD_DIR: &str = "HODEI_TEST_CONTROL_PLANE_DIR";
const READY: &str = "hodei-test: control plane ready";
const OUTCOME: &str = "hodei-test: outcome";
const WORKER: &str = "w-restart";
const SAGA: &str = "restart-saga";
const LINES: u32 = 100_000;
const SECRET: &str = "correct-horse-battery-staple";

/// The job: half the lines, a rendezvous with the test (which kills the control plane), the
/// other half, and a last rendezvous once it is done. The FIFOs block each side until the
/// other is there, so nothing here waits on time.
const SCRIPT: &str = r#"
echo run >> "$RUNS"
echo "secret: $DEPLOY_TOKEN"
seq 1 50000 | sed 's/^/line /'
echo "half $$" > "$TO_TEST"
read go < "$FROM_TEST"
seq 50001 100000 | sed 's/^/line /'
echo end > "$TO_TEST"
"#;

/// The control plane, when run as the child: hub, log store and a sled-journaled engine in
/// the data directory, on the ports of the first run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else { return };
    let dir = PathBuf::from(dir);
    let pki = Arc::new(HubPki::open(&dir.join("hub"), PkiConfig::default()).unwrap());
    let logs = Arc::new(LogStore::open(dir.join("store")).await.unwrap());
    let config = HubConfig::default()
        .heartbeat(Duration::from_millis(500), Duration::from_secs(5))
        .worker_wait(Duration::from_secs(30))
        .log_batches(16 * 1024, Duration::from_millis(20));
    let hub = Hub::new(pki.clone(), config).with_logs(logs);
    let identity = pki.issue_server_identity(&["127.0.0.1"]).unwrap();
    let ports = dir.join("ports");
    let (registration, sessions) = match std::fs::read_to_string(&ports) {
        Ok(text) => {
            let (r, s) = text.trim().split_once(' ').unwrap();
            (TcpListener::bind(r).await.unwrap(), TcpListener::bind(s).await.unwrap())
        }
        Err(_) => {
            let r = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let s = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let text = format!("{} {}", r.local_addr().unwrap(), s.local_addr().unwrap());
            std::fs::write(&ports, text).unwrap();
            std::fs::write(dir.join("ca.pem"), pki.ca_bundle_pem()).unwrap();
            std::fs::write(dir.join("token"), pki.issue_token(WORKER).unwrap().as_str()).unwrap();
            (r, s)
        }
    };
    let _registration = hub.serve_registration(registration, &identity).unwrap();
    let _sessions = hub.serve_sessions(sessions, &identity).unwrap();

    let secrets = MemorySecrets::new().insert("deploy", SECRET);
    let retry = RetryPolicy::attempts(20)
        .initial_backoff(Duration::from_millis(100))
        .max_backoff(Duration::from_secs(1));
    let jobs = JobDispatcher::new(hub.clone(), Arc::new(secrets)).retry(retry);
    let env = |name: &str| std::env::var(name).unwrap();
    let job = Job::script(WORKER, ["/bin/sh"], SCRIPT)
        .env("PATH", "/usr/bin:/bin")
        .env("RUNS", env("HODEI_TEST_RUNS"))
        .env("TO_TEST", env("HODEI_TEST_TO_TEST"))
        .env("FROM_TEST", env("HODEI_TEST_FROM_TEST"))
        .secret("DEPLOY_TOKEN", "deploy");
    let definition = SagaDefinition::new("pipeline", 1, move |ctx: SagaContext, (): ()| {
        let (jobs, job) = (jobs.clone(), job.clone());
        async move { ctx.run_job_on(&jobs, "lines", job).await }
    });
    let engine = Engine::builder()
        .store(SledStore::open(dir.join("journal")).unwrap())
        .register(definition)
        .start()
        .await
        .unwrap();
    // On the second run the saga is already there, recovered by `start()`: starting it again
    // with the same input returns that run.
    let handle = engine.start(SagaRun::new("pipeline", SAGA, &()).unwrap()).await.unwrap();
    println!("{READY}");
    let outcome = handle.outcome::<JobOutcome>().await.unwrap();
    match outcome {
        Outcome::Completed(job) => println!("{OUTCOME} completed {}", job.job_id),
        other => println!("{OUTCOME} {other:?}"),
    }
}

/// A guard against a hang, never a means of synchronisation.
const LIMIT: Duration = Duration::from_secs(60);

struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_control_plane(dir: &Path, env: &[(&str, String)]) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "control_plane_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let line = read_line_containing(&mut stdout, READY);
    assert!(line.is_some(), "the control plane never got ready");
    (child, stdout)
}

/// The first line containing `needle` (libtest may print its own text before it on the line).
fn read_line_containing(stdout: &mut impl BufRead, needle: &str) -> Option<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            return None;
        }
        if let Some(at) = line.find(needle) {
            return Some(line[at..].trim_end().to_owned());
        }
    }
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Runs `f` on a thread and fails the test if it does not finish within [`LIMIT`].
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    result.recv_timeout(LIMIT).unwrap_or_else(|_| panic!("{what} did not happen within {LIMIT:?}"))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files_under(&path, out) } else { out.push(path) }
    }
}

#[test]
fn a_job_survives_a_killed_control_plane_and_its_log_has_every_line_once() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    kill_and_restart(None);
}

/// The kill leaves a torn tail: the log file ends in zeros that were never acknowledged, as a
/// file system that grew the file but never wrote its blocks leaves it. The restarted hub must
/// not announce those zeros as stored, or the agent, which holds the real bytes, would drop
/// them: it resumes the agent from its own acknowledgement, and the resend replaces the zeros.
#[test]
fn a_torn_tail_left_by_the_kill_is_replaced_by_the_agents_resend() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    kill_and_restart(Some(4096));
}

fn kill_and_restart(torn_tail: Option<usize>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("control-plane");
    std::fs::create_dir(&dir).unwrap();
    let (to_test, from_test) = (tmp.path().join("to-test"), tmp.path().join("from-test"));
    mkfifo(&to_test);
    mkfifo(&from_test);
    let runs = tmp.path().join("runs");
    let env = [
        ("HODEI_TEST_RUNS", runs.display().to_string()),
        ("HODEI_TEST_TO_TEST", to_test.display().to_string()),
        ("HODEI_TEST_FROM_TEST", from_test.display().to_string()),
    ];
    let mut reaper = Reaper(Vec::new());

    let (first, _first_stdout) = spawn_control_plane(&dir, &env);
    reaper.0.push(first);
    let ports = std::fs::read_to_string(dir.join("ports")).unwrap();
    let (registration, session) = ports.trim().split_once(' ').unwrap();
    let agent = Command::new(agent_binary())
        .env_clear()
        .env("HODEI_REGISTRATION_ADDR", registration)
        .env("HODEI_SESSION_ADDR", session)
        .env("HODEI_WORKER_ID", WORKER)
        .env("HODEI_CA_BUNDLE", dir.join("ca.pem"))
        .env("HODEI_WORK_DIR", tmp.path().join("agent"))
        .env("HODEI_TOKEN_FILE", dir.join("token"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    reaper.0.push(agent);

    // Half the lines are out and the job waits for us: kill the control plane now.
    let to = to_test.clone();
    let half = within("the job's first half", move || {
        let mut text = String::new();
        std::fs::File::open(&to).unwrap().read_to_string(&mut text).unwrap();
        text
    });
    let pid: u32 = half.trim().strip_prefix("half ").unwrap().parse().unwrap();
    // The secret reached the job on stdin only.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!contains(&environ, SECRET) && !contains(&cmdline, SECRET), "the secret is in the job's /proc");
    assert!(contains(&environ, "PATH=/usr/bin:/bin"), "the environment was read");
    let mut first = reaper.0.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    if let Some(zeros) = torn_tail {
        let mut files = Vec::new();
        files_under(&dir.join("store"), &mut files);
        let stdout = files.iter().find(|f| f.ends_with("stdout.log")).expect("the job's stdout file");
        let mut file = std::fs::OpenOptions::new().append(true).open(stdout).unwrap();
        file.write_all(&vec![0; zeros]).unwrap();
    }

    // The job finishes its second half while no control plane is up.
    let (from, to) = (from_test.clone(), to_test.clone());
    let end = within("the job's second half", move || {
        std::fs::OpenOptions::new().write(true).open(&from).unwrap().write_all(b"go\n").unwrap();
        let mut text = String::new();
        std::fs::File::open(&to).unwrap().read_to_string(&mut text).unwrap();
        text
    });
    assert_eq!(end.trim(), "end");

    let (second, mut second_stdout) = spawn_control_plane(&dir, &env);
    reaper.0.insert(0, second);
    let outcome = within("the saga's outcome", move || read_line_containing(&mut second_stdout, OUTCOME));
    // Re-attached: the result is the first attempt's job, not a rerun.
    assert_eq!(outcome.as_deref(), Some(format!("{OUTCOME} completed {SAGA}/0#1").as_str()));
    drop(reaper);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "the job ran once");

    let log = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = LogStore::open(dir.join("store")).await.unwrap();
        let mut out = Vec::new();
        loop {
            let chunk = store
                .read(&format!("{SAGA}/0#1"), LogStream::Stdout, out.len() as u64, 1 << 20)
                .await
                .unwrap();
            if chunk.bytes.is_empty() {
                break out;
            }
            out.extend_from_slice(&chunk.bytes);
        }
    });
    let text = String::from_utf8(log).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("secret: ***"), "the secret is masked in the log");
    let numbers: Vec<u32> = lines.map(|l| l.strip_prefix("line ").unwrap().parse().unwrap()).collect();
    assert_eq!(numbers.len(), LINES as usize, "no line lost or duplicated");
    assert!(numbers.iter().copied().eq(1..=LINES), "every line once, in order");

    let mut files = Vec::new();
    files_under(&dir, &mut files);
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!contains(&bytes, SECRET), "the secret is in {}", file.display());
    }
}
