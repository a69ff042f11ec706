//! Shared by the Docker tests and the Docker bench: the engine check, the images built from this
//! checkout, a real hub on loopback, and a guard that removes a test's containers.

// Each user of this module uses its own part of it.
#![allow(dead_code, unused_macros)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hodei_agent::protocol::v1;
use hodei_providers::docker::{DockerConfig, DockerProvider, container_name};
use hodei_providers::{AgentEnv, Provider, ProviderError, WorkerSpec};
use hodei_server::hub::{Hub, HubConfig, HubError, Listening};
use hodei_server::jobs::Resources;
use hodei_server::logstore::{LogStore, LogStream};
use hodei_server::pki::{HubPki, PkiConfig};
use tempfile::TempDir;
use tokio::net::TcpListener;

/// A guard against a hang, never a means of synchronisation. Generous: the two cores are shared
/// with other builds, and a container start can take seconds then.
pub const LIMIT: Duration = Duration::from_secs(60);

/// The agent alone, from `docker/Dockerfile`.
pub const AGENT_IMAGE: &str = "hodei-agent:test";
/// The agent image plus the host's `sh`, `sleep` and `cat` with their libraries, so that jobs
/// have something to run.
pub const JOBS_IMAGE: &str = "hodei-agent-jobs:test";

pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future).await.expect("finished in time")
}

/// A provider on the local engine with host networking and the jobs image, or `None` (after
/// saying so) when no engine answers. With `HODEI_REQUIRE_DOCKER=1` (CI) no engine is a failure.
pub async fn engine() -> Option<DockerProvider> {
    let config = DockerConfig::default().network_mode("host").image(JOBS_IMAGE);
    match DockerProvider::connect(config).await {
        Ok(provider) => {
            let images = tokio::task::spawn_blocking(images).await.unwrap();
            if let Err(e) = images {
                panic!("could not build the test images: {e}");
            }
            Some(provider)
        }
        Err(e @ ProviderError::Unreachable { .. }) => {
            if std::env::var("HODEI_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
                panic!("HODEI_REQUIRE_DOCKER=1 but no Docker engine answers: {e}");
            }
            eprintln!("skipped: no Docker engine answers ({e}); HODEI_REQUIRE_DOCKER=1 makes this a failure");
            None
        }
        Err(e) => panic!("the Docker engine answered with an error: {e}"),
    }
}

/// Returns from the test, after saying it was skipped, when no engine answers.
macro_rules! require_engine {
    () => {
        match docker_support::engine().await {
            Some(provider) => provider,
            None => return,
        }
    };
}

/// The checkout's root: the first ancestor of the crate with `docker/Dockerfile` (the tests'
/// crate is one level down, the bench's is the root).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|dir| dir.join("docker").join("Dockerfile").is_file())
        .expect("docker/Dockerfile in an ancestor of the crate")
        .to_owned()
}

/// Builds the static agent and both images, once per test binary. Always run rather than only
/// when an image is missing, so that a changed agent is never tested through a stale image;
/// when nothing changed, cargo and Docker's layer cache make it a second or two.
pub fn images() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(build_images).clone()
}

fn build_images() -> Result<(), String> {
    let root = workspace();
    let target = "x86_64-unknown-linux-gnu";
    // The same build as docker/build-agent-image.sh, so the two share their artifacts.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build
        .current_dir(&root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    // What cargo sets for the package whose test or bench runs this: build scripts (ring's)
    // rerun when it changes, so leaving it would rebuild the agent's TLS stack for every
    // caller (the providers' tests, the facade's bench) instead of sharing one build.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|name| name == "CARGO_MANIFEST_DIR" || name.starts_with("CARGO_PKG_")) {
            build.env_remove(name);
        }
    }
    run(build.args(["build", "-p", "hodei-agent", "--bin", "hodei-agent", "--release", "--target", target]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let binary = target_dir.join(target).join("release").join("hodei-agent");

    let agent_context = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::copy(&binary, agent_context.path().join("hodei-agent"))
        .map_err(|e| format!("{binary:?}: {e}"))?;
    let dockerfile = root.join("docker").join("Dockerfile");
    run(Command::new("docker")
        .arg("build")
        .arg("--quiet")
        .args(["--tag", AGENT_IMAGE])
        .arg("--file")
        .arg(&dockerfile)
        .arg(agent_context.path()))?;

    let jobs_context = tempfile::tempdir().map_err(|e| e.to_string())?;
    let rootfs = jobs_context.path().join("rootfs");
    for tool in ["/bin/sh", "/bin/sleep", "/bin/cat"] {
        copy_with_libraries(Path::new(tool), &rootfs)?;
    }
    std::fs::write(jobs_context.path().join("Dockerfile"), format!("FROM {AGENT_IMAGE}\nCOPY rootfs/ /\n"))
        .map_err(|e| e.to_string())?;
    run(Command::new("docker")
        .arg("build")
        .arg("--quiet")
        .args(["--tag", JOBS_IMAGE])
        .arg(jobs_context.path()))
}

/// Copies `tool` (its target, if a link) and every library `ldd` lists for it into `rootfs`, at
/// the same paths.
fn copy_with_libraries(tool: &Path, rootfs: &Path) -> Result<(), String> {
    let output = Command::new("ldd").arg(tool).output().map_err(|e| format!("ldd {tool:?}: {e}"))?;
    let listing = String::from_utf8_lossy(&output.stdout);
    // Lines are `libc.so.6 => /lib/.../libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
    let libraries = listing.lines().filter_map(|line| {
        let path = line.split("=>").last()?.split_whitespace().next()?;
        path.starts_with('/').then(|| PathBuf::from(path))
    });
    for file in std::iter::once(tool.to_owned()).chain(libraries) {
        let destination = rootfs.join(file.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(destination.parent().expect("a parent")).map_err(|e| e.to_string())?;
        std::fs::copy(&file, &destination).map_err(|e| format!("copying {file:?}: {e}"))?;
    }
    Ok(())
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// A worker id no other test run uses, so that concurrent runs never share a container.
pub fn unique_worker(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!("w-{name}-{}-{nanos}", std::process::id())
}

/// Removes the containers of these workers, and those with these labels, when dropped, a failed
/// test's included. Synchronous (the Docker CLI), because a drop cannot await and may run while
/// a panic unwinds.
#[derive(Debug, Default)]
pub struct Containers {
    workers: Vec<String>,
    labels: Vec<String>,
}

impl Containers {
    /// Guards the container of `worker_id` and returns the id.
    pub fn guard(&mut self, worker_id: String) -> String {
        self.workers.push(worker_id.clone());
        worker_id
    }

    /// Guards every container labelled `name=value`, for workers whose ids a scheduler picks.
    pub fn guard_label(&mut self, name: &str, value: &str) {
        self.labels.push(format!("{name}={value}"));
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let mut names: Vec<String> = self.workers.iter().map(|id| container_name(id)).collect();
        for label in &self.labels {
            let listed = Command::new("docker")
                .args(["ps", "--all", "--quiet", "--filter"])
                .arg(format!("label={label}"))
                .output();
            if let Ok(listed) = listed {
                names.extend(String::from_utf8_lossy(&listed.stdout).split_whitespace().map(str::to_owned));
            }
        }
        if names.is_empty() {
            return;
        }
        // Output is dropped: "No such container" for those the test already removed is expected.
        let _ = Command::new("docker").args(["rm", "--force", "--volumes"]).args(&names).output();
    }
}

/// A hub with a log store, its two listeners on loopback.
pub struct TestHub {
    _dir: TempDir,
    pub hub: Hub,
    pub logs: Arc<LogStore>,
    pub registration: Listening,
    pub sessions: Listening,
}

impl TestHub {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Arc::new(HubPki::open(&dir.path().join("hub"), PkiConfig::default()).unwrap());
        let logs = Arc::new(LogStore::open(dir.path().join("store")).await.unwrap());
        let config = HubConfig::default()
            .heartbeat(Duration::from_secs(5), Duration::from_secs(15))
            .log_batches(64 * 1024, Duration::from_millis(10));
        let hub = Hub::new(pki.clone(), config).with_logs(logs.clone());
        let identity = pki.issue_server_identity(&["127.0.0.1"]).unwrap();
        let registration =
            hub.serve_registration(TcpListener::bind("127.0.0.1:0").await.unwrap(), &identity).unwrap();
        let sessions =
            hub.serve_sessions(TcpListener::bind("127.0.0.1:0").await.unwrap(), &identity).unwrap();
        Self { _dir: dir, hub, logs, registration, sessions }
    }

    /// What the agent of `worker_id` needs to register, with a fresh token.
    pub fn agent_env(&self, worker_id: &str) -> AgentEnv {
        let pki = self.hub.pki();
        AgentEnv::new(
            self.registration.local_addr().to_string(),
            self.sessions.local_addr().to_string(),
            pki.issue_token(worker_id).unwrap().as_str(),
            pki.ca_bundle_pem(),
        )
    }

    /// Provisions a worker named after `name` with `resources`, guarded by `containers`, and
    /// waits until its agent has a session.
    pub async fn registered_worker(
        &self,
        provider: &DockerProvider,
        containers: &mut Containers,
        name: &str,
        resources: Resources,
    ) -> String {
        let worker = containers.guard(unique_worker(name));
        let mut spec = WorkerSpec::new(&worker, self.agent_env(&worker));
        spec.resources = resources;
        within(provider.provision(&spec)).await.unwrap();
        self.wait_registered(&worker).await;
        worker
    }

    /// Waits until `worker_id` has a session.
    pub async fn wait_registered(&self, worker_id: &str) {
        let mut workers = self.hub.watch_workers();
        within(workers.wait_for(|workers| workers.contains_key(worker_id))).await.unwrap();
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

    /// Waits until `job`'s stored stdout contains `needle`, following the store.
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

    /// Runs `job` on `worker_id` in the background.
    pub fn spawn_job(
        &self,
        worker_id: &str,
        job: v1::JobSpec,
    ) -> tokio::task::JoinHandle<Result<v1::JobResult, HubError>> {
        let (hub, worker_id) = (self.hub.clone(), worker_id.to_owned());
        tokio::spawn(async move { hub.run_job(&worker_id, job).await })
    }
}

/// A spec running `sh -c script` (jobs start with an empty environment).
pub fn shell(job_id: &str, script: &str) -> v1::JobSpec {
    v1::JobSpec {
        job_id: job_id.to_owned(),
        command: vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()],
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        cancel_grace_ms: 2_000,
        ..v1::JobSpec::default()
    }
}
