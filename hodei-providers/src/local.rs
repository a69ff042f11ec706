//! The local provider: workers on this machine, the embedded default.
//!
//! Each worker is a real `hodei-agent` that registers and holds its session over gRPC and mutual
//! TLS on loopback, exactly as a remote one would; nothing is short-circuited. Two launch modes:
//!
//! - [`Launch::InProcess`] runs the agent's loop ([`hodei_agent::agent::run`]) as a task of this
//!   process. It needs nothing but cargo, so examples use it; the worker dies with the process.
//! - [`Launch::ChildProcess`] spawns a `hodei-agent` binary. Its settings go in environment
//!   variables (the token never in argv, which other users can read in `/proc`), its stdout and
//!   stderr go to a file in the worker's directory (what [`Provider::output`] returns), and
//!   destroying it sends SIGTERM, then SIGKILL after a grace period. The worker outlives the
//!   control plane unless [`LocalProvider::kill_on_drop`] says otherwise: its record lets a
//!   restarted control plane list it and reap or adopt it. Before signalling a process it did
//!   not start, the provider checks `/proc/<pid>/cmdline` for the agent binary and the worker's
//!   own `--work-dir=` argument, so that a pid the system reused is never killed. Its jobs die
//!   with it (`HODEI_JOBS_DIE_WITH_AGENT=1`: a watcher outside it SIGKILLs each job's process
//!   group when it dies, however it dies), so that the step of a job whose agent was killed runs
//!   it again on a new worker, never beside the copy that went on without an agent.
//!
//! Every worker has a directory `<root>/<worker id>/` holding the CA bundle, the agent's key and
//! certificate (`agent/`), its output (`agent.log`) and its record (`worker`: program, the
//! agent's `--work-dir=` argument, labels and pid, written whole then renamed into place). A
//! child-process agent runs in that directory, so its jobs do too unless they set one.
//!
//! The record is written before the agent starts, then again with its pid, so that a control
//! plane killed at any point leaves nothing a later one cannot find: a record without a pid
//! belongs to an agent that may or may not have started, which is looked for by its command
//! line among the system's processes; a directory without a record holds nothing but what
//! provisioning wrote before it, and no process (its agent would be found the same way if it
//! had one).
//!
//! Local workers cannot enforce cpu or memory limits: [`WorkerSpec::resources`] is ignored.
//! The agent puts each job in a cgroup of its own when it may, but only to measure it; a job
//! can use the whole machine. Use a container or VM provider where limits matter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hodei_agent::agent::{self, BackoffPolicy, Command, Settings};
use hodei_agent::pki::validate_worker_id;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::provider::{Provider, ProviderError, WorkerInfo, WorkerSpec, WorkerState};

/// How much of a worker's output [`Provider::output`] returns: its end, where the reason it
/// failed is.
const OUTPUT_TAIL_BYTES: u64 = 16 * 1024;
/// The file describing a worker in its directory.
const WORKER_FILE: &str = "worker";
/// The record being written, renamed to [`WORKER_FILE`] once whole.
const WORKER_FILE_PARTIAL: &str = "worker.partial";
/// The agent's own output.
const OUTPUT_FILE: &str = "agent.log";
const CA_FILE: &str = "ca.pem";
const AGENT_DIR: &str = "agent";
/// Everything provisioning may leave in a worker's directory: one holding nothing else and no
/// record is a worker whose provisioning was cut short.
const PROVISIONING_FILES: [&str; 4] = [WORKER_FILE_PARTIAL, OUTPUT_FILE, CA_FILE, AGENT_DIR];

/// How the local provider starts agents.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Launch {
    /// The agent's loop as a task of this process.
    InProcess,
    /// The `hodei-agent` binary at `program`, as a child process.
    ChildProcess {
        /// The binary.
        program: PathBuf,
    },
}

/// Workers on this machine. See the [module documentation](self).
pub struct LocalProvider {
    name: String,
    root: PathBuf,
    launch: Launch,
    labels: BTreeMap<String, String>,
    backoff: BackoffPolicy,
    stop_grace: Duration,
    kill_on_drop: bool,
    workers: Mutex<HashMap<String, Arc<LocalWorker>>>,
    /// Workers being provisioned, not yet in `workers`: their directories are not orphans.
    provisioning: Mutex<HashSet<String>>,
}

impl fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalProvider")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("launch", &self.launch)
            .field("labels", &self.labels)
            .field("workers", &self.lock().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One worker this provider started, with what it needs to observe and stop it.
#[derive(Debug)]
struct LocalWorker {
    dir: PathBuf,
    labels: BTreeMap<String, String>,
    running: tokio::sync::Mutex<Running>,
    /// How it ended, once it has; `None` while it runs.
    ended: watch::Receiver<Option<WorkerState>>,
}

#[derive(Debug)]
enum Running {
    Task {
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    },
    /// A child process, owned by its waiter task ([`wait_child`]); dropping `commands` drops
    /// the process handle there.
    Child {
        pid: u32,
        commands: mpsc::Sender<ChildCommand>,
    },
}

/// What the waiter of a child-process worker is asked to do. The waiter owns the process handle
/// and is the only one to reap it, so while it runs a command the child is not reaped and its
/// pid cannot have been reused.
#[derive(Debug)]
enum ChildCommand {
    /// SIGTERM, unless it has exited.
    Terminate(oneshot::Sender<()>),
    /// SIGKILL.
    Kill(oneshot::Sender<io::Result<()>>),
}

/// Waits for a child-process worker to exit and reports how (the provider's exit event), and
/// signals it when asked. Ends when the child exits, or when the provider is dropped: dropping
/// the handle then kills the child if `kill_on_drop` says so, and leaves it running otherwise.
async fn wait_child(
    mut child: tokio::process::Child,
    pid: u32,
    mut commands: mpsc::Receiver<ChildCommand>,
    report: watch::Sender<Option<WorkerState>>,
) {
    loop {
        tokio::select! {
            status = child.wait() => {
                let state = match status {
                    Ok(status) => exit_state(status),
                    Err(e) => WorkerState::Exited { code: None, reason: Some(format!("waiting for it failed: {e}")) },
                };
                report.send_replace(Some(state));
                return;
            }
            command = commands.recv() => match command {
                Some(ChildCommand::Terminate(done)) => {
                    if matches!(child.try_wait(), Ok(None)) {
                        signal(pid, "TERM").await;
                    }
                    let _ = done.send(());
                }
                Some(ChildCommand::Kill(done)) => {
                    let _ = done.send(child.start_kill());
                }
                None => return,
            }
        }
    }
}

impl LocalProvider {
    /// Workers started with `launch`, each in a directory under `root` (created if needed).
    /// They offer the labels `os` and `arch` of this machine.
    pub fn new(root: impl Into<PathBuf>, launch: Launch) -> Self {
        let labels = [
            ("os".to_owned(), std::env::consts::OS.to_owned()),
            ("arch".to_owned(), std::env::consts::ARCH.to_owned()),
        ]
        .into();
        Self {
            name: "local".to_owned(),
            root: root.into(),
            launch,
            labels,
            backoff: BackoffPolicy::default(),
            stop_grace: Duration::from_secs(5),
            kill_on_drop: false,
            workers: Mutex::new(HashMap::new()),
            provisioning: Mutex::new(HashSet::new()),
        }
    }

    /// In-process workers under `root`.
    pub fn in_process(root: impl Into<PathBuf>) -> Self {
        Self::new(root, Launch::InProcess)
    }

    /// Child-process workers running `program` (a `hodei-agent` binary) under `root`.
    pub fn child_process(root: impl Into<PathBuf>, program: impl Into<PathBuf>) -> Self {
        Self::new(root, Launch::ChildProcess { program: program.into() })
    }

    /// Renames the provider (default `local`), e.g. to run two local pools with different labels
    /// side by side under one scheduler, which tells providers apart by name. Give each its own
    /// root: each lists and reaps every worker under its root.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a label its workers offer to jobs.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }

    /// Sets the reconnection backoff of in-process agents (child processes use the binary's).
    pub fn backoff(mut self, policy: BackoffPolicy) -> Self {
        self.backoff = policy;
        self
    }

    /// How long a destroyed worker gets between SIGTERM (or the stop signal, in-process) and
    /// SIGKILL (or abort). Default 5 s.
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Whether dropping the provider kills its child-process workers. Off by default, so that
    /// agents keep running their jobs while the control plane restarts; a process killed
    /// outright never runs the drop anyway. Tests turn it on so that no agent outlives them.
    pub fn kill_on_drop(mut self, kill: bool) -> Self {
        self.kill_on_drop = kill;
        self
    }

    /// The directory workers live in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The operating system's process id of a child-process worker this provider started.
    pub async fn pid(&self, worker_id: &str) -> Option<u32> {
        let worker = self.lock().get(worker_id).cloned()?;
        match &*worker.running.lock().await {
            Running::Child { pid, .. } => Some(*pid),
            Running::Task { .. } => None,
        }
    }

    /// The map is only held for an insert, a remove or a clone, so a poisoned lock is consistent.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LocalWorker>>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, reason: impl fmt::Display) -> ProviderError {
        ProviderError::Infrastructure { provider: self.name().to_owned(), reason: reason.to_string() }
    }

    fn io_error(&self, action: &str, path: &Path) -> impl FnOnce(io::Error) -> ProviderError + '_ {
        let action = format!("{action} {}", path.display());
        move |e| self.error(format!("{action}: {e}"))
    }

    /// The worker's directory, after checking that the id cannot escape the root.
    fn worker_dir(&self, worker_id: &str) -> Result<PathBuf, ProviderError> {
        let invalid =
            |reason: String| ProviderError::InvalidSpec { provider: self.name().to_owned(), reason };
        validate_worker_id(worker_id).map_err(|e| invalid(e.to_string()))?;
        if worker_id.bytes().all(|b| b == b'.') {
            return Err(invalid(format!("worker id `{worker_id}` cannot name a directory")));
        }
        Ok(self.root.join(worker_id))
    }

    /// Starts the agent; also how it ended, once it has.
    async fn start(
        &self,
        spec: &WorkerSpec,
        dir: &Path,
    ) -> Result<(Running, watch::Receiver<Option<WorkerState>>), ProviderError> {
        let ca = dir.join(CA_FILE);
        tokio::fs::write(&ca, &spec.agent.ca_bundle_pem).await.map_err(self.io_error("writing", &ca))?;
        let mut env = spec.agent.variables(&spec.worker_id);
        env.push(("HODEI_CA_BUNDLE", ca.display().to_string()));
        env.push(("HODEI_WORK_DIR", dir.join(AGENT_DIR).display().to_string()));
        let (report, ended) = watch::channel(None);
        let running = match &self.launch {
            Launch::InProcess => {
                let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
                let mut settings = match Settings::parse([], lookup) {
                    Ok(Command::Run(settings)) => settings,
                    Ok(Command::Help) => return Err(self.error("the agent's settings asked for help")),
                    Err(e) => {
                        return Err(ProviderError::InvalidSpec {
                            provider: self.name().to_owned(),
                            reason: format!("agent settings: {e}"),
                        });
                    }
                };
                settings.backoff = self.backoff;
                // An in-process agent dies with this process; its jobs must not outlive it, or a
                // retry after the restart would run beside them.
                settings.jobs_die_with_process = true;
                // Its status lines are this program's tracing events, not lines on its stderr.
                settings.status_to_stderr = false;
                let (stop, stopped) = oneshot::channel::<()>();
                let task = tokio::spawn(async move {
                    let result = agent::run(settings, async move {
                        let _ = stopped.await;
                    })
                    .await;
                    let state = match result {
                        Ok(()) => WorkerState::Exited { code: Some(0), reason: None },
                        Err(e) => WorkerState::Exited { code: Some(1), reason: Some(e.to_string()) },
                    };
                    report.send_replace(Some(state));
                });
                Running::Task { stop: Some(stop), task }
            }
            Launch::ChildProcess { program } => {
                // A killed agent's jobs die with it, as an in-process agent's do: its step, whose
                // worker is lost, runs the job again on a new worker, never beside the old copy.
                env.push((agent::JOBS_DIE_WITH_AGENT_ENV, "1".to_owned()));
                let output = dir.join(OUTPUT_FILE);
                let log = std::fs::File::create(&output).map_err(self.io_error("creating", &output))?;
                let log_too = log.try_clone().map_err(self.io_error("opening", &output))?;
                let mut command = tokio::process::Command::new(program);
                command
                    // Not a setting the agent needs from argv (the variable says the same): it marks
                    // the process as this worker's in /proc/<pid>/cmdline, so that a reused pid is
                    // never signalled.
                    .arg(work_dir_flag(dir))
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                    .current_dir(dir)
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log_too)
                    .kill_on_drop(self.kill_on_drop);
                tracing::debug!(worker = %spec.worker_id, "starting the agent process");
                let child = command.spawn().map_err(|e| {
                    let reason = format!("cannot start {}: {e}", program.display());
                    if e.kind() == io::ErrorKind::NotFound {
                        ProviderError::ImageMissing {
                            provider: self.name().to_owned(),
                            image: program.display().to_string(),
                            hint: "build it with `cargo build -p hodei-agent --bin hodei-agent`".to_owned(),
                        }
                    } else {
                        self.error(reason)
                    }
                })?;
                let pid = child.id().ok_or_else(|| self.error("the agent exited at once"))?;
                tracing::debug!(worker = %spec.worker_id, pid, "agent process started");
                let (commands, received) = mpsc::channel(4);
                tokio::spawn(wait_child(child, pid, received, report));
                Running::Child { pid, commands }
            }
        };
        Ok((running, ended))
    }
}

fn work_dir_flag(dir: &Path) -> String {
    format!("--work-dir={}", dir.join(AGENT_DIR).display())
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.labels.clone()
    }

    /// The worker is recorded before its agent starts (without a pid) and again after (with
    /// it): whenever this control plane dies, the agent, if it started, can be found and
    /// reaped by the next one (see the [module documentation](self)).
    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        let dir = self.worker_dir(&spec.worker_id)?;
        let exists = || ProviderError::InvalidSpec {
            provider: self.name().to_owned(),
            reason: format!("worker `{}` already exists", spec.worker_id),
        };
        let Some(_provisioning) = Provisioning::start(self, &spec.worker_id) else { return Err(exists()) };
        tokio::fs::create_dir_all(&self.root).await.map_err(self.io_error("creating", &self.root))?;
        match tokio::fs::create_dir(&dir).await {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists()),
            Err(e) => return Err(self.io_error("creating", &dir)(e)),
            Ok(()) => {}
        }
        let labels = spec.all_labels();
        let mut record = WorkerRecord {
            pid: None,
            program: match &self.launch {
                Launch::ChildProcess { program } => Some(program.display().to_string()),
                Launch::InProcess => None,
            },
            work_dir: match &self.launch {
                Launch::ChildProcess { .. } => Some(work_dir_flag(&dir)),
                Launch::InProcess => None,
            },
            labels: labels.clone(),
        };
        if let Err(e) = write_record(&dir, &record).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(self.error(format!("writing the record of `{}`: {e}", spec.worker_id)));
        }
        let started = self.start(spec, &dir).await;
        let (running, ended) = match started {
            Ok(started) => started,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        record.pid = match &running {
            Running::Child { pid, .. } => Some(*pid),
            Running::Task { .. } => None,
        };
        let worker = Arc::new(LocalWorker { dir, labels: labels.clone(), running: running.into(), ended });
        self.lock().insert(spec.worker_id.clone(), worker.clone());
        // Again with the pid, which lets a later control plane signal the agent without looking
        // for it. Written whole then renamed, so a crash never leaves half a record.
        if record.pid.is_some()
            && let Err(e) = write_record(&worker.dir, &record).await
        {
            let _ = self.destroy(&spec.worker_id).await;
            return Err(self.error(format!("writing the record of `{}`: {e}", spec.worker_id)));
        }
        let handle = record.pid.map_or_else(|| worker.dir.display().to_string(), |pid| pid.to_string());
        Ok(WorkerInfo::new(spec.worker_id.clone(), handle, labels, WorkerState::Running))
    }

    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        let Some(worker) = self.lock().get(worker_id).cloned() else {
            let dir = self.worker_dir(worker_id)?;
            return Ok(match self.orphan_record(worker_id, &dir).await {
                Some(record) => record.state(),
                None => WorkerState::Gone,
            });
        };
        if let Some(state) = worker.ended.borrow().clone() {
            return Ok(state);
        }
        let mut running = worker.running.lock().await;
        Ok(match &mut *running {
            Running::Task { task, .. } if task.is_finished() => {
                WorkerState::Exited { code: None, reason: Some("the agent's task ended".to_owned()) }
            }
            Running::Task { .. } | Running::Child { .. } => WorkerState::Running,
        })
    }

    /// On the worker's own end: the child's exit, or the in-process agent's task ending.
    async fn exited(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        let Some(worker) = self.lock().get(worker_id).cloned() else {
            // Not started by this provider (an orphan of an earlier control plane): not our
            // child, so there is no exit event to wait on.
            return crate::provider::poll_until_exited(self, worker_id).await;
        };
        Ok(ended(&worker.ended).await)
    }

    async fn output(&self, worker_id: &str) -> Result<String, ProviderError> {
        let dir = self.worker_dir(worker_id)?;
        if self.launch == Launch::InProcess {
            let ended = self.lock().get(worker_id).and_then(|w| w.ended.borrow().clone());
            // An in-process agent's status lines go to this process's stderr with everyone
            // else's; what is its own is how it ended.
            return Ok(match ended {
                Some(WorkerState::Exited { reason: Some(reason), .. }) => format!("hodei-agent: {reason}"),
                Some(_) => "the in-process agent stopped".to_owned(),
                None => "the in-process agent is running; its status lines are on this process's stderr"
                    .to_owned(),
            });
        }
        let path = dir.join(OUTPUT_FILE);
        let tail = tokio::task::spawn_blocking(move || tail(&path, OUTPUT_TAIL_BYTES))
            .await
            .map_err(|e| self.error(e))?;
        match tail {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ProviderError::NotFound {
                provider: self.name().to_owned(),
                worker_id: worker_id.to_owned(),
            }),
            Err(e) => Err(self.error(format!("reading the output of `{worker_id}`: {e}"))),
        }
    }

    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        let dir = self.worker_dir(worker_id)?;
        let worker = self.lock().remove(worker_id);
        match worker {
            Some(worker) => self.stop(worker_id, &worker).await?,
            None => {
                // Not started by this provider, or started but not recorded in memory (its
                // provisioning was cut short): a worker found by its record.
                if let Some(record) = self.orphan_record(worker_id, &dir).await {
                    self.stop_orphan(&dir, &record).await?;
                }
            }
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(self.io_error("removing", &dir)(e)),
            _ => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        let known: Vec<(String, Arc<LocalWorker>)> =
            self.lock().iter().map(|(id, w)| (id.clone(), w.clone())).collect();
        let mut workers = Vec::with_capacity(known.len());
        for (id, worker) in &known {
            let state = self.state(id).await?;
            workers.push(WorkerInfo::new(id, worker.dir.display().to_string(), worker.labels.clone(), state));
        }
        let mut entries = match tokio::fs::read_dir(&self.root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(workers),
            Err(e) => return Err(self.io_error("listing", &self.root)(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(self.io_error("listing", &self.root))? {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else { continue };
            // Workers this provider holds, or is provisioning, are not orphans. Looked up now, not
            // in `known`: one may have been provisioned since. In this order, since provisioning
            // ends after the worker is held.
            if known.iter().any(|(known, _)| *known == id) || self.worker_dir(&id).is_err() {
                continue;
            }
            let held = self.lock().contains_key(&id);
            if held || self.provisioning.lock().unwrap_or_else(PoisonError::into_inner).contains(&id) {
                continue;
            }
            if let Some(record) = self.orphan_record(&id, &entry.path()).await {
                let pid = record.agent_pid();
                let handle = pid.map_or_else(|| entry.path().display().to_string(), |p| p.to_string());
                workers.push(WorkerInfo::new(id, handle, record.labels.clone(), WorkerRecord::state_of(pid)));
            }
        }
        Ok(workers)
    }
}

impl LocalProvider {
    async fn stop(&self, worker_id: &str, worker: &LocalWorker) -> Result<(), ProviderError> {
        let mut running = worker.running.lock().await;
        match &mut *running {
            Running::Task { stop, task } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if tokio::time::timeout(self.stop_grace, &mut *task).await.is_err() {
                    task.abort();
                    let _ = (&mut *task).await;
                }
                Ok(())
            }
            Running::Child { commands, .. } => {
                if worker.ended.borrow().is_some() {
                    return Ok(());
                }
                let (done, sent) = oneshot::channel();
                if commands.send(ChildCommand::Terminate(done)).await.is_ok() {
                    let _ = sent.await;
                }
                if tokio::time::timeout(self.stop_grace, ended(&worker.ended)).await.is_ok() {
                    return Ok(());
                }
                // It ignored SIGTERM.
                let (done, killed) = oneshot::channel();
                if commands.send(ChildCommand::Kill(done)).await.is_ok()
                    && let Ok(Err(e)) = killed.await
                {
                    return Err(self.error(format!("killing `{worker_id}`: {e}")));
                }
                ended(&worker.ended).await;
                Ok(())
            }
        }
    }

    /// Stops a process this provider did not start (or lost track of), if it is still the
    /// worker's agent.
    async fn stop_orphan(&self, dir: &Path, record: &WorkerRecord) -> Result<(), ProviderError> {
        let Some(pid) = record.agent_pid() else { return Ok(()) };
        signal(pid, "TERM").await;
        if !wait_for_exit(pid, self.stop_grace).await && record.is_alive_agent(pid) {
            signal(pid, "KILL").await;
            if !wait_for_exit(pid, self.stop_grace).await {
                return Err(
                    self.error(format!("the agent of {} (pid {pid}) survived SIGKILL", dir.display()))
                );
            }
        }
        Ok(())
    }

    /// The record of a worker this provider does not hold in memory, from its directory: the
    /// `worker` file, or for a directory holding nothing but what provisioning writes before it
    /// (provisioning was cut short before the record was whole), what the record would have
    /// said. `None`: not a worker (no such directory, an unreadable record, other files).
    async fn orphan_record(&self, worker_id: &str, dir: &Path) -> Option<WorkerRecord> {
        match tokio::fs::read_to_string(dir.join(WORKER_FILE)).await {
            Ok(text) => {
                let record = WorkerRecord::decode(&text);
                if record.is_none() {
                    tracing::warn!(dir = %dir.display(), "a worker record this version cannot read: left alone");
                }
                return record;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
        let mut entries = tokio::fs::read_dir(dir).await.ok()?;
        while let Some(entry) = entries.next_entry().await.ok()? {
            if !PROVISIONING_FILES.iter().any(|name| entry.file_name() == *name) {
                return None;
            }
        }
        let (program, work_dir) = match &self.launch {
            Launch::ChildProcess { program } => {
                (Some(program.display().to_string()), Some(work_dir_flag(dir)))
            }
            Launch::InProcess => (None, None),
        };
        let labels = [(crate::provider::WORKER_ID_LABEL.to_owned(), worker_id.to_owned())].into();
        Some(WorkerRecord { pid: None, program, work_dir, labels })
    }
}

/// Marks a worker as being provisioned for as long as it lives.
struct Provisioning<'a> {
    provider: &'a LocalProvider,
    worker_id: String,
}

impl<'a> Provisioning<'a> {
    /// `None` if the worker exists or is being provisioned already. (Its directory, created
    /// next, is what keeps two provisions of one id apart for good.)
    fn start(provider: &'a LocalProvider, worker_id: &str) -> Option<Self> {
        let held = provider.lock().contains_key(worker_id);
        let mut provisioning = provider.provisioning.lock().unwrap_or_else(PoisonError::into_inner);
        if held || !provisioning.insert(worker_id.to_owned()) {
            return None;
        }
        Some(Self { provider, worker_id: worker_id.to_owned() })
    }
}

impl Drop for Provisioning<'_> {
    fn drop(&mut self) {
        self.provider.provisioning.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.worker_id);
    }
}

/// Writes `record` as `dir`'s record: whole, then renamed into place.
async fn write_record(dir: &Path, record: &WorkerRecord) -> io::Result<()> {
    let partial = dir.join(WORKER_FILE_PARTIAL);
    tokio::fs::write(&partial, record.encode()).await?;
    tokio::fs::rename(&partial, dir.join(WORKER_FILE)).await
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        let workers = std::mem::take(&mut *self.lock());
        for worker in workers.values() {
            // In-process agents would outlive the provider as tasks; stop them. Children are
            // killed by tokio when `kill_on_drop` is set, else left running on purpose.
            if let Ok(mut running) = worker.running.try_lock()
                && let Running::Task { stop, .. } = &mut *running
                && let Some(stop) = stop.take()
            {
                let _ = stop.send(());
            }
        }
    }
}

/// Resolves with how a worker this provider started ended; [`WorkerState::Gone`] if whatever
/// watched it is gone without saying (an aborted task).
async fn ended(ended: &watch::Receiver<Option<WorkerState>>) -> WorkerState {
    let mut ended = ended.clone();
    let state = ended.wait_for(Option::is_some).await.ok().and_then(|state| state.clone());
    state.unwrap_or(WorkerState::Gone)
}

fn exit_state(status: std::process::ExitStatus) -> WorkerState {
    use std::os::unix::process::ExitStatusExt;
    let reason = status.signal().map(|signal| format!("killed by signal {signal}"));
    WorkerState::Exited { code: status.code(), reason }
}

/// Sends `SIG<name>` to `pid`. Through the shell's `kill` builtin: the crate has no binding to
/// `kill(2)` and forbids unsafe code, and `/bin/sh` is on every machine this runs jobs on. A
/// process already gone is not an error.
async fn signal(pid: u32, name: &str) {
    let sent = tokio::process::Command::new("/bin/sh")
        .args(["-c", r#"kill -s "$0" "$1" 2>/dev/null"#, name, &pid.to_string()])
        .stdin(Stdio::null())
        .status()
        .await;
    if let Err(e) = sent {
        tracing::warn!(pid, signal = name, error = %e, "cannot run the shell to signal a worker");
    }
}

/// Waits up to `limit` for `pid` to be gone or a zombie. A process this provider did not start
/// cannot be waited for (it is not our child, and without a pidfd binding there is no exit
/// event), so this looks at `/proc` every few milliseconds; it runs only when reaping orphans.
async fn wait_for_exit(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !process_running(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `pid` exists and is not a zombie.
fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) != Some('Z'),
        Err(_) => false,
    }
}

/// The end of the file at `path`, at most `max` bytes, as text (lossily: it is for people).
fn tail(path: &Path, max: u64) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// What the `worker` file records, so that a later control plane finds the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WorkerRecord {
    /// The agent's process, once started (child processes only).
    pid: Option<u32>,
    /// The agent binary (child processes only).
    program: Option<String>,
    /// The `--work-dir=` argument the agent is started with, exactly: it tells the worker's
    /// agent apart from every other process, with or without a pid. Records of earlier
    /// versions have none.
    work_dir: Option<String>,
    labels: BTreeMap<String, String>,
}

impl WorkerRecord {
    /// One `key value` line each, with tabs, newlines and `%` percent-encoded so that any
    /// label value fits on its line.
    fn encode(&self) -> String {
        let mut text = String::new();
        if let Some(pid) = self.pid {
            text.push_str(&format!("pid\t{pid}\n"));
        }
        if let Some(program) = &self.program {
            text.push_str(&format!("program\t{}\n", escape(program)));
        }
        if let Some(work_dir) = &self.work_dir {
            text.push_str(&format!("work-dir\t{}\n", escape(work_dir)));
        }
        for (name, value) in &self.labels {
            text.push_str(&format!("label\t{}\t{}\n", escape(name), escape(value)));
        }
        text
    }

    fn decode(text: &str) -> Option<Self> {
        let mut record = Self { pid: None, program: None, work_dir: None, labels: BTreeMap::new() };
        for line in text.lines() {
            let mut fields = line.split('\t');
            match (fields.next()?, fields.next(), fields.next()) {
                ("pid", Some(pid), None) => record.pid = Some(pid.parse().ok()?),
                ("program", Some(program), None) => record.program = Some(unescape(program)?),
                ("work-dir", Some(work_dir), None) => record.work_dir = Some(unescape(work_dir)?),
                ("label", Some(name), Some(value)) => {
                    record.labels.insert(unescape(name)?, unescape(value)?);
                }
                _ => return None,
            }
        }
        Some(record)
    }

    /// Whether `pid` runs this worker's agent: the program must be its command line's first
    /// word and the worker's `--work-dir=` argument one of the others (for records without it,
    /// one ending in this worker's directory), so a pid reused by another process is never
    /// signalled.
    fn is_alive_agent(&self, pid: u32) -> bool {
        let Some(program) = &self.program else { return false };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
        let mut args = cmdline.split(|b| *b == 0);
        if args.next() != Some(program.as_bytes()) {
            return false;
        }
        let marked = match &self.work_dir {
            Some(work_dir) => args.any(|arg| arg == work_dir.as_bytes()),
            None => {
                let Some(worker_id) = self.labels.get(crate::provider::WORKER_ID_LABEL) else { return false };
                let suffix = format!("/{worker_id}/{AGENT_DIR}");
                args.any(|arg| arg.starts_with(b"--work-dir=") && arg.ends_with(suffix.as_bytes()))
            }
        };
        marked && process_running(pid)
    }

    /// The process running this worker's agent, if one does: the recorded pid, if it still is
    /// the agent; without one (provisioning was cut short around the agent's start, which may
    /// or may not have happened), the process whose command line is the agent's with this
    /// worker's exact `--work-dir=` argument.
    fn agent_pid(&self) -> Option<u32> {
        if let Some(pid) = self.pid {
            return self.is_alive_agent(pid).then_some(pid);
        }
        self.work_dir.as_ref()?;
        let processes = std::fs::read_dir("/proc").ok()?;
        processes
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| self.is_alive_agent(*pid))
    }

    fn state(&self) -> WorkerState {
        Self::state_of(self.agent_pid())
    }

    /// The state of a worker whose agent runs as `pid`, or runs nowhere.
    fn state_of(pid: Option<u32>) -> WorkerState {
        match pid {
            Some(_) => WorkerState::Running,
            None => WorkerState::Exited {
                code: None,
                reason: Some("not running: left by an earlier control plane".to_owned()),
            },
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '%' => out.push_str("%25"),
            '\t' => out.push_str("%09"),
            '\n' => out.push_str("%0A"),
            '\r' => out.push_str("%0D"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_with_awkward_label_values() {
        let record = WorkerRecord {
            pid: Some(42),
            program: Some("/opt/hodei agent/bin".to_owned()),
            work_dir: Some("--work-dir=/var/lib/hodei\tworkers/w-1/agent".to_owned()),
            labels: [
                ("hodei.dev/saga-id".to_owned(), "release\tv1\n100%".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
            .into(),
        };
        assert_eq!(WorkerRecord::decode(&record.encode()), Some(record.clone()));
        // Written before the agent starts: no pid yet.
        let before_start = WorkerRecord { pid: None, ..record };
        assert_eq!(WorkerRecord::decode(&before_start.encode()), Some(before_start));
        // A record of an earlier version, without the work-dir argument.
        let earlier = WorkerRecord::decode("pid\t7\nprogram\t/bin/agent\n").unwrap();
        assert_eq!((earlier.pid, earlier.work_dir), (Some(7), None));
        assert_eq!(WorkerRecord::decode("pid\tnot-a-number\n"), None);
        assert_eq!(WorkerRecord::decode("what\tever\n"), None);
    }

    #[test]
    fn worker_ids_that_would_escape_the_root_are_refused() {
        let provider = LocalProvider::in_process("/tmp/hodei-local-test-root");
        for id in ["..", ".", "a/b", ""] {
            assert!(
                matches!(provider.worker_dir(id), Err(ProviderError::InvalidSpec { .. })),
                "{id:?} was accepted"
            );
        }
        assert_eq!(provider.worker_dir("w-1").unwrap(), Path::new("/tmp/hodei-local-test-root/w-1"));
    }

    #[test]
    fn a_pid_whose_command_line_is_not_the_agent_is_not_taken_for_it() {
        let record = WorkerRecord {
            pid: Some(std::process::id()),
            program: Some("/nonexistent/hodei-agent".to_owned()),
            work_dir: Some("--work-dir=/nonexistent/w-1/agent".to_owned()),
            labels: [(crate::provider::WORKER_ID_LABEL.to_owned(), "w-1".to_owned())].into(),
        };
        // This test process is alive, but it is not that worker's agent.
        assert!(!record.is_alive_agent(std::process::id()));
        assert!(matches!(record.state(), WorkerState::Exited { .. }));
        // Nor is any process found by its command line.
        let unstarted = WorkerRecord { pid: None, ..record };
        assert_eq!(unstarted.agent_pid(), None);
        assert!(matches!(unstarted.state(), WorkerState::Exited { .. }));
    }
}
