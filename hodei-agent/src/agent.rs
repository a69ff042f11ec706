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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::connect::{self, ConnectError, Session};
use crate::pki::{
    AgentKey, PkiError, TlsIdentity, WorkerCertificate, agent_client_config, validate_worker_id,
};
use crate::protocol::now_unix_ms;
use crate::protocol::v1::{self, AgentMessage, Heartbeat, OutputStream, agent_message, hub_message};
use crate::runner::{
    self, BatchLimits, CancelHandle, DEFAULT_GRACE, Exit, JobRunner, MetricsSource, Outcome, RunnerConfig,
    RunnerError, RunningJob, Secrets, Stream,
};

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
/// keeps a session open, sending heartbeats, and reconnects with backoff when it ends.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    tokio::pin!(shutdown);
    let mut backoff = Backoff { policy: settings.backoff, attempt: 0 };
    let identity = tokio::select! {
        () = &mut shutdown => return Ok(()),
        identity = credentials(&settings, &mut backoff) => identity?,
    };
    backoff.reset();
    loop {
        say(format_args!("dialling the control plane's sessions at {}", settings.session_addr));
        let ended = tokio::select! {
            () = &mut shutdown => return Ok(()),
            ended = session(&settings, &identity, &mut backoff) => ended,
        };
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
async fn credentials(settings: &Settings, backoff: &mut Backoff) -> Result<TlsIdentity, AgentError> {
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
                return Ok(key.identity(&certificate)?);
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
fn stored(settings: &Settings) -> Result<Option<TlsIdentity>, String> {
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
    key.identity(&certificate).map(Some).map_err(|e| e.to_string())
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

/// Opens one session and keeps it up with heartbeats, running the jobs the hub assigns. Returns
/// why it ended.
///
/// Jobs live as long as the session: when it ends they are cancelled (their tasks are aborted,
/// which drops their [`RunningJob`]s). Log acknowledgements are only logged for now; keeping
/// unacknowledged output to resend from the last ack after a reconnect, and re-attaching to
/// running jobs through `Hello`, are the next slice.
async fn session(settings: &Settings, identity: &TlsIdentity, backoff: &mut Backoff) -> String {
    let session =
        connect::open_session(settings.session_addr, &settings.ca_bundle_pem, identity, &settings.worker_id)
            .await;
    let Session { welcome, sender, mut receiver, .. } = match session {
        Ok(session) => session,
        Err(e) => return format!("the session could not be opened: {e}"),
    };
    say(format_args!("session open as {} at {}", settings.worker_id, settings.session_addr));
    // A session that opened is a success: the next failure starts the backoff over.
    backoff.reset();
    // A zero interval would spin; the hub never sends one, but it is not ours to trust.
    let period = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
    let mut heartbeats = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The hub sets the batch limits; the runner applies its own floors to nonsense values.
    let batch = BatchLimits {
        max_bytes: usize::try_from(welcome.log_batch_max_bytes).unwrap_or(usize::MAX),
        max_delay: Duration::from_millis(welcome.log_batch_max_delay_ms),
    };
    let runner = JobRunner::new(RunnerConfig::default().batch(batch));
    let mut jobs = Jobs::default();
    loop {
        tokio::select! {
            _ = heartbeats.tick() => {
                let beat = AgentMessage { kind: Some(agent_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: now_unix_ms() })) };
                if sender.send(beat).await.is_err() {
                    return "the session closed".to_owned();
                }
            }
            Some(finished) = jobs.tasks.join_next(), if !jobs.tasks.is_empty() => {
                match finished {
                    Ok(job_id) => { jobs.cancels.remove(&job_id); }
                    Err(e) => tracing::error!(error = %e, "a job task failed"),
                }
            }
            message = receiver.message() => match message {
                Ok(Some(message)) => match message.kind {
                    Some(hub_message::Kind::Heartbeat(_)) => tracing::trace!("heartbeat answered"),
                    Some(hub_message::Kind::Assign(assign)) => match assign.spec {
                        Some(spec) => jobs.start(&runner, spec, &sender),
                        None => tracing::warn!("AssignJob without a spec ignored"),
                    },
                    Some(hub_message::Kind::Cancel(cancel)) => jobs.cancel(cancel),
                    Some(hub_message::Kind::LogAck(ack)) => {
                        tracing::trace!(job = %ack.job_id, stream = ack.stream, stored = ack.stored, "log acknowledged");
                    }
                    Some(hub_message::Kind::ResultAck(ack)) => tracing::debug!(job = %ack.job_id, "result acknowledged"),
                    other => tracing::warn!(message = ?other, "hub message not handled; ignored"),
                },
                Ok(None) => return "the control plane ended the session".to_owned(),
                Err(status) => return format!("the session failed: {}", status.message()),
            },
        }
    }
}

/// The jobs running on one session.
#[derive(Default)]
struct Jobs {
    /// Each job's task, which yields its id when the job is over and its result sent.
    tasks: JoinSet<String>,
    /// By job id, with where the cancellation reason goes.
    cancels: HashMap<String, (CancelHandle, Arc<OnceLock<String>>)>,
}

impl Jobs {
    /// Starts the job, or reports at once that it could not start.
    fn start(&mut self, runner: &JobRunner, spec: v1::JobSpec, sender: &mpsc::Sender<AgentMessage>) {
        let job_id = spec.job_id.clone();
        if self.cancels.contains_key(&job_id) {
            // Re-attaching is for after a reconnect (next slice); on the same session it is a
            // duplicate, and starting the job twice would be worse.
            tracing::warn!(job = %job_id, "job already running on this session; AssignJob ignored");
            return;
        }
        // Sized like the runner's batches, so output waits in the pipe, not here.
        let (logs, batches) = mpsc::channel(16);
        let started = job_spec(spec).and_then(|(spec, secrets)| runner.start(spec, secrets, logs, None));
        let sender = sender.clone();
        match started {
            Ok(job) => {
                let reason = Arc::new(OnceLock::new());
                self.cancels.insert(job_id.clone(), (job.cancel_handle(), reason.clone()));
                self.tasks.spawn(run_job(job_id, job, batches, sender, reason));
            }
            Err(e) => {
                say(format_args!("job {job_id} could not start: {e}"));
                let result = v1::JobResult {
                    job_id: job_id.clone(),
                    outcome: Some(v1::job_result::Outcome::FailedToStart(e.to_string())),
                    ..v1::JobResult::default()
                };
                self.tasks.spawn(async move {
                    let _ = sender.send(message(agent_message::Kind::Result(result))).await;
                    job_id
                });
            }
        }
    }

    fn cancel(&mut self, cancel: v1::CancelJob) {
        match self.cancels.get(&cancel.job_id) {
            Some((handle, reason)) => {
                // The first reason is the one reported.
                let _ = reason.set(cancel.reason);
                handle.cancel();
            }
            None => tracing::debug!(job = %cancel.job_id, "cancel for a job not running here ignored"),
        }
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

/// Announces the job, forwards its output as it comes, and sends its result. Returns its id.
async fn run_job(
    job_id: String,
    job: RunningJob,
    mut batches: mpsc::Receiver<runner::LogBatch>,
    sender: mpsc::Sender<AgentMessage>,
    reason: Arc<OnceLock<String>>,
) -> String {
    let pid = job.pid();
    let source = job.metrics_source().clone();
    let accepted = v1::JobAccepted { job_id: job_id.clone(), pid };
    if sender.send(message(agent_message::Kind::Accepted(accepted))).await.is_err() {
        return job_id;
    }
    let forward = |batch: runner::LogBatch| {
        let stream = match batch.stream {
            Stream::Stdout => OutputStream::Stdout,
            Stream::Stderr => OutputStream::Stderr,
        };
        let batch = v1::LogBatch {
            job_id: job_id.clone(),
            stream: stream.into(),
            offset: batch.offset,
            data: batch.data,
        };
        sender.send(message(agent_message::Kind::Log(batch)))
    };
    let wait = job.wait();
    tokio::pin!(wait);
    // Output is forwarded while waiting: the runner's wait also waits for its sink to drain.
    let finished = loop {
        tokio::select! {
            Some(batch) = batches.recv() => if forward(batch).await.is_err() { return job_id },
            finished = &mut wait => break finished,
        }
    };
    // Batches sent just before the job was over.
    while let Some(batch) = batches.recv().await {
        if forward(batch).await.is_err() {
            return job_id;
        }
    }
    let result = job_result(&job_id, finished, &source, reason.get());
    let _ = sender.send(message(agent_message::Kind::Result(result))).await;
    job_id
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
