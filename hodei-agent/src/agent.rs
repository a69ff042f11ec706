//! The worker agent program: its settings, its stored credentials, and its run loop.
//!
//! The `hodei-agent` binary is a thin shell over this module, so that the settings parser, the
//! backoff policy and the reconnecting loop are tested in-process as well as through the binary.
//!
//! Status lines go to stderr through `say`: the agent is a process of its own whose operator
//! reads its stderr, and the crate has no tracing subscriber to print events with.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::connect::{self, ConnectError, Session};
mod outbox;
use crate::pki::{
    AgentKey, PkiError, TlsIdentity, WorkerCertificate, agent_client_config, validate_worker_id,
};
use crate::protocol::now_unix_ms;
use crate::protocol::v1::{self, AgentMessage, Heartbeat, agent_message, hub_message};
use crate::runner::{
    self, BatchLimits, CancelHandle, DEFAULT_GRACE, Exit, JobRunner, MetricsSource, Outcome, RunnerConfig,
    RunnerError, RunningJob, Secrets,
};
pub use outbox::MAX_HELD_BYTES;
use outbox::{Cursor, Outbox, Outboxes};

/// What the agent can fail at. [`AgentError::Setting`] and [`AgentError::UnknownFlag`] are the
/// operator's to fix (the binary exits 2 for them); the others are failures at run time.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A setting is missing or invalid.
    #[error("{flag} ({env}): {reason}")]
    Setting {
        /// The command-line flag.
        flag: &'static str,
        /// The environment variable.
        env: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A command-line argument that is no flag of the agent's.
    #[error("unknown argument `{0}` (see --help)")]
    UnknownFlag(String),
    /// The work directory, or a credential in it, could not be read or written.
    #[error("work directory: {action} {path}: {source}")]
    WorkDir {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The key or certificate could not be made, or the TLS identity built from them.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Registration failed for a reason retrying will not fix (e.g. a refused token).
    #[error("registration failed: {0}")]
    Registration(#[source] ConnectError),
}

impl AgentError {
    /// Whether the operator must fix a setting: the binary exits 2 for these.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Setting { .. } | Self::UnknownFlag(_))
    }
}

/// One setting: its flag, its environment variable, and what it is for (for `--help`).
struct Spec {
    flag: &'static str,
    env: &'static str,
    help: &'static str,
}

const REGISTRATION_ADDR: Spec = Spec {
    flag: "--registration-addr",
    env: "HODEI_REGISTRATION_ADDR",
    help: "the control plane's registration listener, IP:PORT (required)",
};
const SESSION_ADDR: Spec = Spec {
    flag: "--session-addr",
    env: "HODEI_SESSION_ADDR",
    help: "the control plane's mutual-TLS session listener, IP:PORT (required)",
};
const WORKER_ID: Spec =
    Spec { flag: "--worker-id", env: "HODEI_WORKER_ID", help: "this worker's id (required)" };
const TOKEN: Spec = Spec {
    flag: "--token",
    env: "HODEI_TOKEN",
    help: "one-time registration token, needed only without a valid stored certificate; prefer \
           the variable or --token-file: command lines are visible to other users in /proc",
};
const TOKEN_FILE: Spec = Spec {
    flag: "--token-file",
    env: "HODEI_TOKEN_FILE",
    help: "a file holding the registration token (surrounding whitespace is ignored)",
};
const CA_BUNDLE: Spec = Spec {
    flag: "--ca-bundle",
    env: "HODEI_CA_BUNDLE",
    help: "PEM file of the control plane's CA, the only one trusted (required)",
};
const WORK_DIR: Spec = Spec {
    flag: "--work-dir",
    env: "HODEI_WORK_DIR",
    help: "where the agent keeps its key and certificate (mode 0600), reused across restarts (required)",
};

const SPECS: [&Spec; 7] =
    [&REGISTRATION_ADDR, &SESSION_ADDR, &WORKER_ID, &TOKEN, &TOKEN_FILE, &CA_BUNDLE, &WORK_DIR];

impl Spec {
    fn error(&self, reason: impl Into<String>) -> AgentError {
        AgentError::Setting { flag: self.flag, env: self.env, reason: reason.into() }
    }
}

/// The text of `--help`: every setting with its flag and environment variable.
pub fn help() -> String {
    let mut text = String::from(
        "hodei-agent: the Hodei worker agent. It registers with the control plane once, stores its \
         key and certificate, then keeps a session open, reconnecting with backoff.\n\n\
         Usage: hodei-agent [FLAG VALUE | FLAG=VALUE]...\n\n\
         Every setting is a flag or an environment variable; the flag wins.\n\n",
    );
    for spec in SPECS {
        text.push_str(&format!("  {} <VALUE>  (env {})\n      {}\n", spec.flag, spec.env, spec.help));
    }
    text.push_str("  --help\n      prints this and exits\n\nSIGTERM or SIGINT stops the agent (exit 0).\n");
    text
}

/// The reconnection delays: exponential from `initial`, capped at `max`, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The delay before the first retry.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self { initial: Duration::from_millis(500), max: Duration::from_secs(30) }
    }
}

impl BackoffPolicy {
    /// The delay before retry number `attempt` (from 0), given `jitter` in `[0, 1]`: between half
    /// and all of `min(max, initial × 2^attempt)`. Half is kept so that the delay still grows;
    /// the other half is random so that workers cut off together do not reconnect together.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self.initial.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(self.max);
        base / 2 + base.div_f64(2.0).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// A backoff in progress: the policy and the number of failures since the last success.
#[derive(Debug)]
struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = self.policy.delay(self.attempt, jitter());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A number in `[0, 1]`, random enough to spread reconnects: std's hasher keys are random per
/// process, and the clock differs per call. No random-number crate is needed for this.
fn jitter() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The agent's settings, once parsed and checked. `Debug` leaves the token out.
#[derive(Clone)]
#[non_exhaustive]
pub struct Settings {
    /// The hub's registration listener.
    pub registration_addr: SocketAddr,
    /// The hub's session listener.
    pub session_addr: SocketAddr,
    /// This worker's id.
    pub worker_id: String,
    /// The registration token, if one was given.
    pub token: Option<String>,
    /// The CA bundle, PEM.
    pub ca_bundle_pem: String,
    /// Where the key and certificate are kept.
    pub work_dir: PathBuf,
    /// Reconnection delays; not a flag, but tests shorten them.
    pub backoff: BackoffPolicy,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("registration_addr", &self.registration_addr)
            .field("session_addr", &self.session_addr)
            .field("worker_id", &self.worker_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("work_dir", &self.work_dir)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// What the command line asks for. Exhaustive, so that the binary handles every case.
#[derive(Debug)]
pub enum Command {
    /// Print [`help`] and exit 0.
    Help,
    /// Run the agent.
    Run(Settings),
}

impl Settings {
    /// Parses `args` (without the program name), falling back to `env` for settings not given as
    /// flags.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Command, AgentError> {
        let mut flags: Vec<(&'static Spec, String)> = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(Command::Help);
            }
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                None => (arg.clone(), None),
            };
            let spec =
                SPECS.into_iter().find(|spec| spec.flag == name).ok_or(AgentError::UnknownFlag(arg))?;
            let value = match inline {
                Some(value) => value,
                None => args.next().ok_or_else(|| spec.error("the flag needs a value"))?,
            };
            flags.push((spec, value));
        }
        // The last occurrence of a flag wins, as with most tools; then the environment.
        let get = |spec: &Spec| {
            flags
                .iter()
                .rev()
                .find(|(s, _)| s.flag == spec.flag)
                .map(|(_, v)| v.clone())
                .or_else(|| env(spec.env))
        };
        let required = |spec: &Spec| get(spec).filter(|v| !v.is_empty()).ok_or_else(|| spec.error("missing"));
        let address = |spec: &Spec| {
            let value = required(spec)?;
            value
                .parse::<SocketAddr>()
                .map_err(|e| spec.error(format!("`{value}` is not an IP:PORT address: {e}")))
        };

        let registration_addr = address(&REGISTRATION_ADDR)?;
        let session_addr = address(&SESSION_ADDR)?;
        let worker_id = required(&WORKER_ID)?;
        validate_worker_id(&worker_id).map_err(|e| WORKER_ID.error(e.to_string()))?;
        let ca_path = required(&CA_BUNDLE)?;
        let ca_bundle_pem = fs::read_to_string(&ca_path)
            .map_err(|e| CA_BUNDLE.error(format!("cannot read {ca_path}: {e}")))?;
        // Checked now so that a wrong file is a setting error, not a failure at every dial.
        agent_client_config(&ca_bundle_pem, None).map_err(|e| CA_BUNDLE.error(format!("{ca_path}: {e}")))?;
        let work_dir = PathBuf::from(required(&WORK_DIR)?);
        // A flag beats a variable, whichever of the two token settings each is.
        let token_flag =
            |spec: &Spec| flags.iter().rev().find(|(s, _)| s.flag == spec.flag).map(|(_, v)| v.clone());
        let token = match (token_flag(&TOKEN), token_flag(&TOKEN_FILE)) {
            (Some(token), _) => Some(token),
            (None, Some(path)) => Some(read_token(&path)?),
            (None, None) => match (env(TOKEN.env), env(TOKEN_FILE.env)) {
                (Some(token), _) => Some(token),
                (None, Some(path)) => Some(read_token(&path)?),
                (None, None) => None,
            },
        }
        .filter(|token| !token.is_empty());
        Ok(Command::Run(Settings {
            registration_addr,
            session_addr,
            worker_id,
            token,
            ca_bundle_pem,
            work_dir,
            backoff: BackoffPolicy::default(),
        }))
    }

    fn key_path(&self) -> PathBuf {
        self.work_dir.join("agent.key")
    }

    fn cert_path(&self) -> PathBuf {
        self.work_dir.join("agent.crt")
    }
}

fn read_token(path: &str) -> Result<String, AgentError> {
    fs::read_to_string(path)
        .map(|token| token.trim().to_owned())
        .map_err(|e| TOKEN_FILE.error(format!("cannot read {path}: {e}")))
}

/// Writes a status line to stderr, and to tracing for embedders that have a subscriber.
fn say(line: std::fmt::Arguments<'_>) {
    tracing::info!("{line}");
    eprintln!("hodei-agent: {line}");
}

/// Runs the agent until `shutdown` completes: registers if no valid certificate is stored, then
/// keeps a session open, sending heartbeats, and reconnects with backoff when it ends. Jobs
/// keep running while the control plane is unreachable; their output waits (bounded) and is
/// resent on the next session. When `shutdown` completes, running jobs are cancelled.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    let mut backoff = Backoff { policy: settings.backoff, attempt: 0 };
    let (identity, certificate) = tokio::select! {
        () = &mut shutdown => return Ok(()),
        identity = credentials(&settings, &mut backoff) => identity?,
    };
    backoff.reset();
    let mut worker = Worker {
        identity,
        certificate,
        outboxes: Arc::new(Outboxes::default()),
        cancels: Arc::default(),
        tasks: JoinSet::new(),
        rotating: None,
        rotation_asked: false,
    };
    loop {
        say(format_args!("dialling the control plane's sessions at {}", settings.session_addr));
        let ended = tokio::select! {
            () = &mut shutdown => return Ok(()),
            ended = session(&settings, &mut worker, &mut backoff) => ended,
        };
        // Reap the tasks of jobs that are over, so the set does not grow with every job.
        while worker.tasks.try_join_next().is_some() {}
        let delay = backoff.next();
        say(format_args!("{ended}; reconnecting in {delay:?}"));
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The stored identity if it is valid for this worker, else a new one from registration, which
/// is retried with backoff while the hub cannot be reached.
async fn credentials(
    settings: &Settings,
    backoff: &mut Backoff,
) -> Result<(TlsIdentity, WorkerCertificate), AgentError> {
    match stored(settings) {
        Ok(Some(identity)) => {
            say(format_args!("reusing the stored certificate in {}", settings.work_dir.display()));
            return Ok(identity);
        }
        Ok(None) => {}
        Err(reason) => say(format_args!("not reusing the stored certificate: {reason}")),
    }
    let token = settings.token.as_deref().ok_or_else(|| {
        TOKEN.error(format!(
            "no valid certificate is stored in {}, so a registration token is needed (or {})",
            settings.work_dir.display(),
            TOKEN_FILE.env
        ))
    })?;
    loop {
        say(format_args!(
            "registering as {} with the control plane at {}",
            settings.worker_id, settings.registration_addr
        ));
        match connect::register(
            settings.registration_addr,
            &settings.ca_bundle_pem,
            &settings.worker_id,
            token,
        )
        .await
        {
            Ok((key, certificate)) => {
                store(settings, &key, &certificate)?;
                say(format_args!("registered; certificate stored in {}", settings.work_dir.display()));
                return Ok((key.identity(&certificate)?, certificate));
            }
            // The hub is not reachable (yet): worth another try. Anything it answered is final.
            Err(e @ ConnectError::Transport { .. }) => {
                let delay = backoff.next();
                say(format_args!("registration failed: {e}; retrying in {delay:?}"));
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(AgentError::Registration(e)),
        }
    }
}

/// The stored key and certificate, if both exist, are for this worker and are still valid.
fn stored(settings: &Settings) -> Result<Option<(TlsIdentity, WorkerCertificate)>, String> {
    let read = |path: &Path| match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    };
    let (Some(key_pem), Some(cert_pem)) = (read(&settings.key_path())?, read(&settings.cert_path())?) else {
        return Ok(None);
    };
    let certificate = WorkerCertificate::from_pem(&cert_pem).map_err(|e| e.to_string())?;
    if certificate.worker_id != settings.worker_id {
        return Err(format!("it is for worker `{}`", certificate.worker_id));
    }
    if certificate.not_after <= SystemTime::now() {
        return Err("it has expired".to_owned());
    }
    let key = AgentKey::from_pem(&key_pem).map_err(|e| e.to_string())?;
    let identity = key.identity(&certificate).map_err(|e| e.to_string())?;
    Ok(Some((identity, certificate)))
}

/// Stores the key and certificate, each 0600, each written whole and then renamed into place so
/// that a crash never leaves half a file.
fn store(settings: &Settings, key: &AgentKey, certificate: &WorkerCertificate) -> Result<(), AgentError> {
    let dir = &settings.work_dir;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| AgentError::WorkDir {
        action: "creating",
        path: dir.clone(),
        source,
    })?;
    write_private(&settings.key_path(), &key.private_key_pem())?;
    write_private(&settings.cert_path(), &certificate.cert_pem)
}

fn write_private(path: &Path, contents: &str) -> Result<(), AgentError> {
    let partial = path.with_extension("partial");
    let error = |action| move |source| AgentError::WorkDir { action, path: path.to_owned(), source };
    // A leftover from a crash may have other permissions; start afresh.
    match fs::remove_file(&partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(error("removing a leftover of")(e)),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(error("creating"))?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(error("writing"))?;
    fs::rename(&partial, path).map_err(error("renaming into place"))
}

/// The running jobs' cancel handles by job id, each with where its cancellation reason goes.
type Cancels = Arc<Mutex<CancelMap>>;
type CancelMap = HashMap<String, (CancelHandle, Arc<OnceLock<String>>)>;

/// What the agent keeps across sessions: its identity and its jobs.
struct Worker {
    identity: TlsIdentity,
    /// The certificate `identity` holds, for its rotation time.
    certificate: WorkerCertificate,
    outboxes: Arc<Outboxes>,
    /// The running jobs' cancel handles, with where the cancellation reason goes; each job's
    /// task removes its own entry when the job is over.
    cancels: Cancels,
    /// Aborted when the agent stops, which cancels the jobs (their `RunningJob`s are dropped).
    tasks: JoinSet<()>,
    /// The key of a rotation asked for on the current session, until the hub answers.
    rotating: Option<AgentKey>,
    /// Whether this session asked for a rotation: once per session, so a hub that refuses
    /// (and says why in its log) is not asked again in a loop.
    rotation_asked: bool,
}

impl Worker {
    fn cancels(&self) -> std::sync::MutexGuard<'_, CancelMap> {
        // Inserts and removes only: a poisoned lock still holds a consistent map.
        self.cancels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the job, or records at once that it could not start. A job the agent already
    /// holds (a re-assignment after a reconnect) goes on as it is: its output and result are
    /// resent by every new session anyway.
    fn start(&mut self, runner: &JobRunner, spec: v1::JobSpec) {
        let job_id = spec.job_id.clone();
        if self.outboxes.contains(&job_id) {
            tracing::info!(job = %job_id, "job re-attached");
            return;
        }
        // Sized like the runner's batches, so output waits in the pipe, not here.
        let (logs, batches) = mpsc::channel(16);
        let (samples, metrics) = mpsc::channel(4);
        let started =
            job_spec(spec).and_then(|(spec, secrets)| runner.start(spec, secrets, logs, Some(samples)));
        match started {
            Ok(job) => {
                let Some(outbox) = self.outboxes.open(&job_id, job.pid()) else { return };
                let reason = Arc::new(OnceLock::new());
                self.cancels().insert(job_id.clone(), (job.cancel_handle(), reason.clone()));
                let task = JobTask {
                    outboxes: self.outboxes.clone(),
                    outbox,
                    cancels: self.cancels.clone(),
                    reason,
                };
                self.tasks.spawn(task.run(job, batches, metrics));
            }
            Err(e) => {
                say(format_args!("job {job_id} could not start: {e}"));
                let result = v1::JobResult {
                    job_id: job_id.clone(),
                    outcome: Some(v1::job_result::Outcome::FailedToStart(e.to_string())),
                    ..v1::JobResult::default()
                };
                if let Some(outbox) = self.outboxes.open(&job_id, 0) {
                    outbox.finish(result);
                    self.outboxes.notify();
                }
            }
        }
    }

    fn cancel(&self, cancel: v1::CancelJob) {
        match self.cancels().get(&cancel.job_id) {
            Some((handle, reason)) => {
                // The first reason is the one reported.
                let _ = reason.set(cancel.reason);
                handle.cancel();
            }
            None => tracing::debug!(job = %cancel.job_id, "cancel for a job not running here ignored"),
        }
    }

    /// Takes the hub's new certificate, if it is for the key this session asked with, stores
    /// it, and uses it from the next session on (this one stays up with the old one).
    fn rotated(&mut self, settings: &Settings, response: v1::RotateResponse) -> Result<(), String> {
        let key = self.rotating.take().ok_or("a certificate nobody asked for")?;
        let certificate =
            WorkerCertificate::from_pem(&response.certificate_pem).map_err(|e| e.to_string())?;
        if certificate.worker_id != settings.worker_id {
            return Err(format!("the certificate is for worker `{}`", certificate.worker_id));
        }
        let identity = key.identity(&certificate).map_err(|e| e.to_string())?;
        store(settings, &key, &certificate).map_err(|e| e.to_string())?;
        self.identity = identity;
        self.certificate = certificate;
        Ok(())
    }
}

/// Opens one session and serves it: heartbeats, the jobs the hub assigns, and resending what
/// the hub has not acknowledged. Returns why it ended. Jobs outlive it.
async fn session(settings: &Settings, worker: &mut Worker, backoff: &mut Backoff) -> String {
    let hello = v1::Hello {
        jobs: worker.outboxes.all().iter().map(|outbox| outbox.announce()).collect(),
        ..connect::hello(&settings.worker_id)
    };
    let opened = async {
        let tls = agent_client_config(&settings.ca_bundle_pem, Some(&worker.identity))?;
        connect::start_session(connect::channel(settings.session_addr, tls).await?, hello).await
    };
    let Session { welcome, sender, mut receiver, .. } = match opened.await {
        Ok(session) => session,
        Err(e) => return format!("the session could not be opened: {e}"),
    };
    say(format_args!("session open as {} at {}", settings.worker_id, settings.session_addr));
    // A session that opened is a success: the next failure starts the backoff over.
    backoff.reset();
    for stored in &welcome.resume {
        worker.outboxes.ack(stored);
    }
    // A zero interval would spin; the hub never sends one, but it is not ours to trust.
    let period = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
    // The hub sets the batch limits; the runner applies its own floors to nonsense values.
    let batch = BatchLimits {
        max_bytes: usize::try_from(welcome.log_batch_max_bytes).unwrap_or(usize::MAX),
        max_delay: Duration::from_millis(welcome.log_batch_max_delay_ms),
    };
    let runner = JobRunner::new(RunnerConfig::default().batch(batch));
    let (control, control_rx) = mpsc::unbounded_channel();
    // Sending runs in its own task, so that this loop always reads the hub's messages: if both
    // sides could block on sending at once, a full stream each way would deadlock them.
    let mut pump = AbortOnDrop(tokio::spawn(pump(
        worker.outboxes.clone(),
        sender,
        control_rx,
        period,
        batch.max_bytes.max(1),
    )));
    worker.rotating = None;
    worker.rotation_asked = false;
    loop {
        let renew_in = worker.certificate.renew_at().duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = &mut pump.0 => return "the session closed".to_owned(),
            () = tokio::time::sleep(renew_in), if !worker.rotation_asked => {
                worker.rotation_asked = true;
                match AgentKey::generate().and_then(|key| Ok((key.csr_pem(&settings.worker_id)?, key))) {
                    Ok((csr_pem, key)) => {
                        say(format_args!("rotating the certificate (valid until {:?})", worker.certificate.not_after));
                        worker.rotating = Some(key);
                        let _ = control.send(message(agent_message::Kind::Rotate(v1::RotateRequest { csr_pem })));
                    }
                    Err(e) => return format!("could not make a key to rotate the certificate: {e}"),
                }
            }
            message = receiver.message() => match message {
                Ok(Some(message)) => match message.kind {
                    Some(hub_message::Kind::Heartbeat(_)) => tracing::trace!("heartbeat answered"),
                    Some(hub_message::Kind::Assign(assign)) => match assign.spec {
                        Some(spec) => worker.start(&runner, spec),
                        None => tracing::warn!("AssignJob without a spec ignored"),
                    },
                    Some(hub_message::Kind::Cancel(cancel)) => worker.cancel(cancel),
                    Some(hub_message::Kind::LogAck(ack)) => worker.outboxes.ack(&ack),
                    Some(hub_message::Kind::ResultAck(ack)) => {
                        if worker.outboxes.result_acked(&ack.job_id) {
                            tracing::debug!(job = %ack.job_id, "job delivered");
                        }
                    }
                    Some(hub_message::Kind::Rotate(response)) => match worker.rotated(settings, response) {
                        Ok(()) => say(format_args!(
                            "certificate rotated; valid until {:?}",
                            worker.certificate.not_after
                        )),
                        Err(e) => say(format_args!("certificate rotation refused: {e}")),
                    },
                    other => tracing::warn!(message = ?other, "hub message not handled; ignored"),
                },
                Ok(None) => return "the control plane ended the session".to_owned(),
                Err(status) => return format!("the session failed: {}", status.message()),
            },
        }
    }
}

/// Aborts its task when dropped, so that a session's sender never outlives the session.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends everything the hub is owed, as it comes, and the heartbeats; returns when the
/// session's stream is closed.
async fn pump(
    outboxes: Arc<Outboxes>,
    sender: mpsc::Sender<AgentMessage>,
    mut control: mpsc::UnboundedReceiver<AgentMessage>,
    period: Duration,
    max_bytes: usize,
) {
    let mut changed = outboxes.subscribe();
    let mut heartbeats = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    loop {
        changed.borrow_and_update();
        let outboxes_now = outboxes.all();
        for outbox in &outboxes_now {
            let cursor = cursors.entry(outbox.job_id().to_owned()).or_insert_with(|| outbox.cursor());
            let unsent = outbox.take_unsent(cursor, max_bytes);
            let messages = unsent
                .accepted
                .map(agent_message::Kind::Accepted)
                .into_iter()
                .chain(unsent.logs.into_iter().map(agent_message::Kind::Log))
                .chain(unsent.metrics.map(agent_message::Kind::Metrics))
                .chain(unsent.result.map(agent_message::Kind::Result));
            for kind in messages {
                if sender.send(message(kind)).await.is_err() {
                    return;
                }
            }
        }
        cursors.retain(|job_id, _| outboxes_now.iter().any(|outbox| outbox.job_id() == job_id));
        let next = tokio::select! {
            changed = changed.changed() => match changed {
                Ok(()) => None,
                Err(_) => return,
            },
            _ = heartbeats.tick() => Some(agent_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: now_unix_ms() })),
            Some(control) = control.recv() => control.kind,
        };
        if let Some(kind) = next
            && sender.send(message(kind)).await.is_err()
        {
            return;
        }
    }
}

/// One job's task: moves its output and samples into its outbox, then its result.
struct JobTask {
    outboxes: Arc<Outboxes>,
    outbox: Arc<Outbox>,
    cancels: Cancels,
    reason: Arc<OnceLock<String>>,
}

impl JobTask {
    async fn run(
        self,
        job: RunningJob,
        mut batches: mpsc::Receiver<runner::LogBatch>,
        mut samples: mpsc::Receiver<runner::MetricsSample>,
    ) {
        let job_id = self.outbox.job_id().to_owned();
        let source = job.metrics_source().clone();
        let wait = job.wait();
        tokio::pin!(wait);
        // Output is taken while waiting: the runner's wait also waits for its sink to drain.
        let finished = loop {
            tokio::select! {
                Some(batch) = batches.recv() => self.keep(batch).await,
                Some(sample) = samples.recv() => {
                    self.outbox.sample(v1::MetricsSample {
                        job_id: job_id.clone(),
                        at_unix_ms: now_unix_ms(),
                        cpu_usage_usec: u64::try_from(sample.cpu.as_micros()).unwrap_or(u64::MAX),
                        memory_current_bytes: sample.memory_bytes,
                        memory_peak_bytes: sample.peak_memory_bytes,
                    });
                    self.outboxes.notify();
                }
                finished = &mut wait => break finished,
            }
        };
        // Batches sent just before the job was over.
        while let Some(batch) = batches.recv().await {
            self.keep(batch).await;
        }
        self.outbox.finish(job_result(&job_id, finished, &source, self.reason.get()));
        self.outboxes.notify();
        self.cancels.lock().unwrap_or_else(PoisonError::into_inner).remove(&job_id);
    }

    /// Keeps a batch, then waits while the job holds too much unacknowledged output: not
    /// taking more makes the runner stop reading the job's pipes.
    async fn keep(&self, batch: runner::LogBatch) {
        self.outbox.push(batch.stream, batch.offset, batch.data);
        self.outboxes.notify();
        self.outbox.wait_for_room().await;
    }
}

fn message(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

/// The runner's spec and secrets for a wire spec. A `script` without an interpreter runs with
/// `/bin/sh -s`, the interpreter the runner's stdin header is designed for.
fn job_spec(spec: v1::JobSpec) -> Result<(runner::JobSpec, Secrets), RunnerError> {
    let v1::JobSpec {
        command,
        script,
        interpreter,
        env,
        working_dir,
        secrets,
        timeout_ms,
        cancel_grace_ms,
        ..
    } = spec;
    let mut job = match (command.split_first(), interpreter.split_first()) {
        (Some((program, args)), _) => runner::JobSpec::command(program, args),
        (None, Some((program, args))) => runner::JobSpec::script(program, args, script),
        (None, None) if !script.is_empty() => runner::JobSpec::script("/bin/sh", ["-s"], script),
        (None, None) => {
            return Err(RunnerError::InvalidSpec { reason: "neither a command nor a script".to_owned() });
        }
    };
    // Sorted, so that the job sees the same environment order every time.
    let env: BTreeMap<String, String> = env.into_iter().collect();
    for (name, value) in env {
        job = job.env(name, value);
    }
    if !working_dir.is_empty() {
        job = job.working_dir(working_dir);
    }
    if timeout_ms > 0 {
        job = job.timeout(Duration::from_millis(timeout_ms));
    }
    job = job.grace(if cancel_grace_ms > 0 { Duration::from_millis(cancel_grace_ms) } else { DEFAULT_GRACE });
    let mut values = Secrets::new();
    for (name, value) in secrets {
        values.insert(name, value.into_bytes())?;
    }
    Ok((job, values))
}

/// The wire result for what the runner reported.
fn job_result(
    job_id: &str,
    finished: Result<runner::JobResult, RunnerError>,
    source: &MetricsSource,
    reason: Option<&String>,
) -> v1::JobResult {
    use v1::job_result::Outcome as Wire;
    let metrics_source = match source {
        MetricsSource::Cgroup { .. } => "cgroup",
        MetricsSource::Proc { .. } => "proc",
    };
    let result = match finished {
        Ok(result) => result,
        // The proto has no outcome for the runner's own failure; the job's end is unknown, and
        // "did not run properly" is what the hub must hear.
        Err(e) => {
            return v1::JobResult {
                job_id: job_id.to_owned(),
                outcome: Some(Wire::FailedToStart(format!("the runner failed: {e}"))),
                metrics_source: metrics_source.to_owned(),
                ..v1::JobResult::default()
            };
        }
    };
    let outcome = match (result.outcome, result.exit) {
        (Outcome::Completed, Exit::Code(code)) => Wire::ExitCode(code),
        (Outcome::Completed, Exit::Signal(signal)) => Wire::Signal(signal),
        (Outcome::Cancelled, _) => Wire::Cancelled(reason.cloned().unwrap_or_else(|| "cancelled".to_owned())),
        (Outcome::TimedOut, _) => Wire::TimedOut(true),
        // Only when this session's sender is gone, so the result is unlikely to arrive at all.
        (Outcome::SinkClosed, _) => Wire::Cancelled("the session closed".to_owned()),
    };
    let metrics = &result.metrics;
    v1::JobResult {
        job_id: job_id.to_owned(),
        outcome: Some(outcome),
        stdout_bytes: result.stdout_bytes,
        stderr_bytes: result.stderr_bytes,
        cpu_usage_usec: u64::try_from(metrics.cpu.as_micros()).unwrap_or(u64::MAX),
        memory_peak_bytes: metrics.peak_memory_bytes.unwrap_or(0),
        wall_time_ms: u64::try_from(metrics.wall.as_millis()).unwrap_or(u64::MAX),
        metrics_source: metrics_source.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jitters_in_its_upper_half() {
        let policy = BackoffPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1) };
        assert_eq!(policy.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(policy.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(policy.delay(1, 1.0), Duration::from_millis(200));
        assert_eq!(policy.delay(3, 0.5), Duration::from_millis(600));
        assert_eq!(policy.delay(4, 1.0), Duration::from_secs(1), "capped");
        assert_eq!(policy.delay(u32::MAX, 1.0), Duration::from_secs(1), "no overflow");
        assert_eq!(policy.delay(2, 7.0), policy.delay(2, 1.0), "jitter is clamped");

        let mut backoff = Backoff { policy, attempt: 0 };
        let delays: Vec<_> = (0..6).map(|_| backoff.next()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(50) && *d <= Duration::from_secs(1)));
        assert!(delays[5] >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100), "reset starts over");
    }

    #[test]
    fn jitter_is_in_range() {
        assert!((0..100).map(|_| jitter()).all(|j| (0.0..=1.0).contains(&j)));
    }
}
