//! The control plane's side of the agent protocol: the registration and session listeners.
//!
//! Two listeners, because they authenticate differently: `Register` runs over TLS that
//! authenticates the hub only (the agent has no certificate yet), `Session` over mutual TLS
//! whose client certificate is checked by the PKI's revocation-checking verifier. Each listener
//! accepts TCP and does the TLS handshake itself with the PKI's rustls configuration, so that no
//! other verifier can be configured by mistake.
//!
//! Sessions serve the handshake, heartbeats and jobs: [`Hub::run_job`] assigns a job on a
//! worker's session, stores its output in the hub's [`LogStore`] (acknowledging batches with
//! the offsets a sync made durable; one sync covers every batch that arrived while the previous
//! one ran) and resolves with the worker's result. Each session
//! task owns its jobs' state; callers reach it through a command channel, so nothing is shared
//! between sessions but the registry. There is no resume yet: a session that ends fails its
//! jobs with [`HubError::WorkerLost`], and the caller decides whether to run them again.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use crate::logstore::{LogStatus, LogStore, LogStoreError, LogStream};
use crate::pki::{HubPki, PkiError, TlsIdentity, check_peer_worker_id};
use crate::protocol::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use crate::protocol::v1::{
    self, AgentMessage, AssignJob, CancelJob, Heartbeat, HubMessage, LogAck, OutputStream, RegisterRequest,
    RegisterResponse, ResultAck, Welcome, agent_message, hub_message,
};
use crate::protocol::{PROTOCOL, negotiate, now_unix_ms};

/// What the hub can fail at while starting or running a listener.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The TLS configuration could not be built from the PKI.
    #[error("TLS configuration of the {listener} listener: {source}")]
    Tls {
        /// Which listener.
        listener: &'static str,
        /// What the PKI refused.
        #[source]
        source: PkiError,
    },
    /// The listening socket failed.
    #[error("the {listener} listener: {source}")]
    Io {
        /// Which listener.
        listener: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("the {listener} server: {source}")]
    Transport {
        /// Which listener.
        listener: &'static str,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server task panicked or was cancelled.
    #[error("the {listener} server task ended abnormally: {source}")]
    Task {
        /// Which listener.
        listener: &'static str,
        /// The task's failure.
        #[source]
        source: tokio::task::JoinError,
    },
    /// No worker with this id has an open session.
    #[error("worker `{worker_id}` is not connected")]
    UnknownWorker {
        /// The worker asked for.
        worker_id: String,
    },
    /// The worker's session ended before the job's result arrived. The job may or may not have
    /// run: running it again (same id) is the caller's call.
    #[error("worker `{worker_id}` was lost before job `{job_id}` finished")]
    WorkerLost {
        /// The worker.
        worker_id: String,
        /// The job.
        job_id: String,
    },
    /// The hub was built without a [`LogStore`], so it has nowhere to keep a job's output.
    #[error("the hub has no log store, so it cannot run jobs")]
    NoLogStore,
    /// A job with this id is already running on that worker's session.
    #[error("job `{job_id}` is already running on worker `{worker_id}`")]
    DuplicateJob {
        /// The worker.
        worker_id: String,
        /// The job.
        job_id: String,
    },
    /// The job's output could not be stored; the result arrived, but the log is incomplete.
    #[error("storing the log of job `{job_id}`: {source}")]
    Logs {
        /// The job.
        job_id: String,
        /// What the store refused or failed at.
        #[source]
        source: LogStoreError,
    },
}

impl HubError {
    /// Whether running the job again may succeed: the worker went away, not the job.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::WorkerLost { .. } | Self::UnknownWorker { .. })
    }
}

/// The session parameters the hub sets and announces in `Welcome`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubConfig {
    /// How often the agent sends a heartbeat. Default 10 s.
    pub heartbeat_interval: Duration,
    /// How long the hub waits for any message before it closes the session. Default 30 s: three
    /// intervals, so that one late heartbeat does not cut a worker off.
    pub heartbeat_timeout: Duration,
    /// Largest log batch the agent sends. Default 1 MiB (Woodpecker's size): a flood of output
    /// then costs the hub one message, one write and one decode per MiB, not per line or per
    /// pipe read, and a batch stays well under gRPC's 4 MiB message limit; the fsyncs are
    /// grouped across batches anyway (see [`LogStore::sync`]), and larger batches measured no
    /// faster. Quiet jobs are bounded by the delay instead.
    pub log_batch_max_bytes: u64,
    /// Longest the agent holds output before sending it. Default 200 ms, so logs read as live.
    pub log_batch_max_delay: Duration,
    /// How long [`Hub::run_job`] waits for a worker that is not connected (yet, or again after
    /// a restart of either side) before failing with [`HubError::UnknownWorker`]. Default: the
    /// heartbeat timeout.
    pub worker_wait: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            log_batch_max_bytes: 1024 * 1024,
            log_batch_max_delay: Duration::from_millis(200),
            worker_wait: Duration::from_secs(30),
        }
    }
}

impl HubConfig {
    /// Sets the heartbeat interval and timeout (and the wait for a worker, to the timeout).
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.heartbeat_interval = interval;
        self.heartbeat_timeout = timeout;
        self.worker_wait = timeout;
        self
    }

    /// Sets how long a job waits for its worker to connect.
    pub fn worker_wait(mut self, wait: Duration) -> Self {
        self.worker_wait = wait;
        self
    }

    /// Sets the log batch limits.
    pub fn log_batches(mut self, max_bytes: u64, max_delay: Duration) -> Self {
        self.log_batch_max_bytes = max_bytes;
        self.log_batch_max_delay = max_delay;
        self
    }
}

/// The HTTP/2 flow-control windows of the hub's connections, per stream and per connection
/// (see [`serve`]).
const H2_WINDOW: u32 = 2 * crate::agent::MAX_HELD_BYTES as u32;
/// The largest HTTP/2 frame the hub accepts.
const H2_MAX_FRAME: u32 = 256 * 1024;

/// One connected worker in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Connection {
    since: SystemTime,
    /// Tells a worker's sessions apart: a reconnect may be accepted before the old session's
    /// end is noticed, and that end must not remove the new one.
    id: u64,
}

/// The workers with an open session, observable so that callers wait on changes, not on time.
#[derive(Debug)]
struct Registry {
    workers: watch::Sender<BTreeMap<String, Connection>>,
    /// Each open session's command channel, by worker, with the session's connection id.
    sessions: Mutex<HashMap<String, (u64, mpsc::Sender<SessionCommand>)>>,
    next_id: AtomicU64,
}

impl Registry {
    fn connect(self: &Arc<Self>, worker_id: &str, commands: mpsc::Sender<SessionCommand>) -> ConnectionGuard {
        let connection =
            Connection { since: SystemTime::now(), id: self.next_id.fetch_add(1, Ordering::Relaxed) };
        // Before the watch announces the worker, so that whoever sees it listed can reach it.
        self.sessions().insert(worker_id.to_owned(), (connection.id, commands));
        self.workers.send_modify(|workers| {
            workers.insert(worker_id.to_owned(), connection);
        });
        tracing::info!(worker = worker_id, "worker connected");
        ConnectionGuard { registry: self.clone(), worker_id: worker_id.to_owned(), id: connection.id }
    }

    /// The map is only ever held for an insert, a remove or a clone, which cannot panic midway,
    /// so a poisoned lock still holds a consistent map.
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<SessionCommand>)>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn commands(&self, worker_id: &str) -> Option<mpsc::Sender<SessionCommand>> {
        self.sessions().get(worker_id).map(|(_, commands)| commands.clone())
    }
}

/// What callers ask of a session task.
enum SessionCommand {
    /// Run `spec`, or re-attach to one of the `previous` attempts if the agent still holds it.
    Run {
        // Boxed: a spec is large and commands are few.
        spec: Box<v1::JobSpec>,
        previous: Vec<String>,
        reply: oneshot::Sender<Result<v1::JobResult, HubError>>,
    },
    Cancel {
        job_id: String,
        reason: String,
    },
    /// The caller of `run_job` for `job_id` stopped waiting; cancel the job if `cancel` says so.
    Abandon {
        job_id: String,
        cancel: Option<String>,
    },
}

impl std::fmt::Debug for SessionCommand {
    // By hand: the spec carries secret values, which must not reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Run { spec, previous, .. } => f
                .debug_struct("Run")
                .field("job_id", &spec.job_id)
                .field("previous", previous)
                .finish_non_exhaustive(),
            Self::Cancel { job_id, reason } => {
                f.debug_struct("Cancel").field("job_id", job_id).field("reason", reason).finish()
            }
            Self::Abandon { job_id, cancel } => {
                f.debug_struct("Abandon").field("job_id", job_id).field("cancel", cancel).finish()
            }
        }
    }
}

/// Removes its worker from the registry when the session ends, however it ends.
#[derive(Debug)]
struct ConnectionGuard {
    registry: Arc<Registry>,
    worker_id: String,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut sessions = self.registry.sessions();
        if sessions.get(&self.worker_id).is_some_and(|(id, _)| *id == self.id) {
            sessions.remove(&self.worker_id);
        }
        drop(sessions);
        self.registry.workers.send_if_modified(|workers| {
            if workers.get(&self.worker_id).is_some_and(|c| c.id == self.id) {
                workers.remove(&self.worker_id);
                true
            } else {
                false
            }
        });
        tracing::info!(worker = %self.worker_id, "worker disconnected");
    }
}

/// The control plane's gRPC side: its PKI, session parameters and connected workers.
#[derive(Debug, Clone)]
pub struct Hub {
    pki: Arc<HubPki>,
    config: HubConfig,
    registry: Arc<Registry>,
    logs: Option<Arc<LogStore>>,
    metrics: Arc<Metrics>,
}

/// The newest metrics sample of each running job, and every sample as it arrives.
#[derive(Debug)]
struct Metrics {
    latest: Mutex<HashMap<String, v1::MetricsSample>>,
    samples: tokio::sync::broadcast::Sender<v1::MetricsSample>,
}

impl Default for Metrics {
    fn default() -> Self {
        // A subscriber that lags this far behind misses samples (and is told so): metrics are
        // a live view, never a reason to hold up a session.
        Self { latest: Mutex::default(), samples: tokio::sync::broadcast::Sender::new(256) }
    }
}

impl Metrics {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, v1::MetricsSample>> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, sample: v1::MetricsSample) {
        self.map().insert(sample.job_id.clone(), sample.clone());
        // No subscriber is not an error.
        let _ = self.samples.send(sample);
    }
}

impl Hub {
    /// A hub issuing and checking certificates with `pki`. It runs no jobs until it is given a
    /// log store ([`Hub::with_logs`]).
    pub fn new(pki: Arc<HubPki>, config: HubConfig) -> Self {
        let registry = Arc::new(Registry {
            workers: watch::Sender::new(BTreeMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        Self { pki, config, registry, logs: None, metrics: Arc::default() }
    }

    /// Keeps jobs' output in `logs`. Set it before [`Hub::serve_sessions`]: sessions take the
    /// store they are served with.
    #[must_use]
    pub fn with_logs(mut self, logs: Arc<LogStore>) -> Self {
        self.logs = Some(logs);
        self
    }

    /// The log store, if the hub has one.
    pub fn logs(&self) -> Option<&Arc<LogStore>> {
        self.logs.as_ref()
    }

    /// Runs `spec` on `worker_id` and waits for its result. Its output is stored under the job
    /// id in the hub's log store, whose log for the job is closed, and the result stored, before
    /// this returns `Ok`.
    ///
    /// A job whose result is already stored is not run again: that result is returned. If the
    /// worker is not connected, this waits for it up to [`HubConfig::worker_wait`]. Fails with
    /// [`HubError::WorkerLost`] if its session ends first.
    pub async fn run_job(&self, worker_id: &str, spec: v1::JobSpec) -> Result<v1::JobResult, HubError> {
        self.resume_job(worker_id, spec, &[]).await
    }

    /// [`Hub::run_job`], re-attaching instead to one of `previous` (earlier attempts of the
    /// same step, newest first) if its result is stored or the worker still runs it: after a
    /// restart of the control plane, the step picks up the job that went on without it rather
    /// than starting a duplicate. A stored result that says the job was cancelled is not taken
    /// (the hub cancels only jobs whose caller gave up on them).
    pub async fn resume_job(
        &self,
        worker_id: &str,
        spec: v1::JobSpec,
        previous: &[String],
    ) -> Result<v1::JobResult, HubError> {
        let Some(logs) = &self.logs else { return Err(HubError::NoLogStore) };
        if let Some(result) = stored_result(logs, &spec.job_id, previous).await? {
            return Ok(result);
        }
        let job_id = spec.job_id.clone();
        let lost = || HubError::WorkerLost { worker_id: worker_id.to_owned(), job_id: job_id.clone() };
        let commands = self.session_within(worker_id, self.config.worker_wait).await?;
        let (reply, result) = oneshot::channel();
        let run = SessionCommand::Run { spec: Box::new(spec), previous: previous.to_vec(), reply };
        commands.send(run).await.map_err(|_| lost())?;
        // The session task drops the reply when the session ends: that is the loss.
        result.await.map_err(|_| lost())?
    }

    /// The result stored for `job_id`, if the job has finished.
    pub async fn stored_result(&self, job_id: &str) -> Result<Option<v1::JobResult>, HubError> {
        let Some(logs) = &self.logs else { return Err(HubError::NoLogStore) };
        read_result(logs, job_id).await
    }

    /// Asks `worker_id` to cancel `job_id`; its [`Hub::run_job`] then resolves with a cancelled
    /// result. A job the worker does not know is ignored by the worker.
    pub async fn cancel_job(&self, worker_id: &str, job_id: &str, reason: &str) -> Result<(), HubError> {
        let commands = self.session(worker_id)?;
        let cancel = SessionCommand::Cancel { job_id: job_id.to_owned(), reason: reason.to_owned() };
        commands
            .send(cancel)
            .await
            .map_err(|_| HubError::WorkerLost { worker_id: worker_id.to_owned(), job_id: job_id.to_owned() })
    }

    /// Tells `worker_id`'s session that the caller of [`Hub::run_job`] for `job_id` stopped
    /// waiting, and cancels the job on the worker when `cancel` gives a reason. Without one the
    /// job goes on, and a later `resume_job` can pick it up. Does not wait (for drop guards);
    /// a worker that is gone has nothing to cancel.
    pub fn abandon_job(&self, worker_id: &str, job_id: &str, cancel: Option<String>) {
        if let Some(commands) = self.registry.commands(worker_id) {
            let abandon = SessionCommand::Abandon { job_id: job_id.to_owned(), cancel };
            if commands.try_send(abandon).is_err() {
                tracing::warn!(worker = worker_id, job = job_id, "session busy or gone; abandon dropped");
            }
        }
    }

    /// The newest metrics sample of a running job.
    pub fn job_metrics(&self, job_id: &str) -> Option<v1::MetricsSample> {
        self.metrics.map().get(job_id).cloned()
    }

    /// Every metrics sample from now on, of every job, as the agents send them (about one per
    /// job per sampling interval).
    pub fn subscribe_metrics(&self) -> tokio::sync::broadcast::Receiver<v1::MetricsSample> {
        self.metrics.samples.subscribe()
    }

    /// The worker's session, waiting up to `wait` for it to connect.
    async fn session_within(
        &self,
        worker_id: &str,
        wait: Duration,
    ) -> Result<mpsc::Sender<SessionCommand>, HubError> {
        let mut workers = self.registry.workers.subscribe();
        let connected = tokio::time::timeout(wait, workers.wait_for(|w| w.contains_key(worker_id))).await;
        drop(connected);
        self.session(worker_id)
    }

    fn session(&self, worker_id: &str) -> Result<mpsc::Sender<SessionCommand>, HubError> {
        self.registry
            .commands(worker_id)
            .ok_or_else(|| HubError::UnknownWorker { worker_id: worker_id.to_owned() })
    }

    /// The PKI, e.g. to issue registration tokens.
    pub fn pki(&self) -> &Arc<HubPki> {
        &self.pki
    }

    /// The workers with an open session, and since when.
    pub fn connected_workers(&self) -> BTreeMap<String, SystemTime> {
        snapshot(&self.registry.workers.borrow())
    }

    /// Notified on every connect and disconnect.
    pub fn watch_workers(&self) -> WorkersWatch {
        WorkersWatch(self.registry.workers.subscribe())
    }

    /// Serves `Register` on `listener`, over TLS with `identity` and no client certificate.
    pub fn serve_registration(
        &self,
        listener: TcpListener,
        identity: &TlsIdentity,
    ) -> Result<Listening, HubError> {
        let service = RegistrationService { pki: self.pki.clone() };
        let tls = self.pki.registration_server_config(identity);
        serve("registration", listener, tls, ControlPlaneServer::new(service), watch::channel(false))
    }

    /// Serves `Session` on `listener`, over mutual TLS with `identity`: a client certificate
    /// from the PKI's CA, valid and not revoked, is required.
    pub fn serve_sessions(
        &self,
        listener: TcpListener,
        identity: &TlsIdentity,
    ) -> Result<Listening, HubError> {
        let (shutdown, stopped) = watch::channel(false);
        // Sessions see the shutdown too: a graceful stop waits for open streams, and these only
        // end when the agent goes.
        let service = SessionService {
            config: self.config.clone(),
            registry: self.registry.clone(),
            logs: self.logs.clone(),
            pki: self.pki.clone(),
            metrics: self.metrics.clone(),
            stopped: stopped.clone(),
        };
        let tls = self.pki.mtls_server_config(identity);
        // A batch is at most what Welcome announces, plus its framing; gRPC's 4 MiB default
        // stays the floor so that other messages keep their room.
        let max_message = usize::try_from(self.config.log_batch_max_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(64 * 1024)
            .max(4 * 1024 * 1024);
        let server = ControlPlaneServer::new(service).max_decoding_message_size(max_message);
        serve("session", listener, tls, server, (shutdown, stopped))
    }
}

fn snapshot(workers: &BTreeMap<String, Connection>) -> BTreeMap<String, SystemTime> {
    workers.iter().map(|(id, c)| (id.clone(), c.since)).collect()
}

/// A subscription to the registry of connected workers.
#[derive(Debug)]
pub struct WorkersWatch(watch::Receiver<BTreeMap<String, Connection>>);

impl WorkersWatch {
    /// The connected workers now.
    pub fn current(&self) -> BTreeMap<String, SystemTime> {
        snapshot(&self.0.borrow())
    }

    /// Waits until the connected workers satisfy `condition`, and returns them. `None` if the
    /// hub is gone.
    pub async fn wait_for(
        &mut self,
        mut condition: impl FnMut(&BTreeMap<String, SystemTime>) -> bool,
    ) -> Option<BTreeMap<String, SystemTime>> {
        self.0.wait_for(|workers| condition(&snapshot(workers))).await.ok().map(|workers| snapshot(&workers))
    }
}

/// A running listener. Dropping it stops the server too, without waiting.
#[derive(Debug)]
pub struct Listening {
    listener: &'static str,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Listening {
    /// The address it listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends open sessions, and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), HubError> {
        let listener = self.listener;
        self.shutdown.send_replace(true);
        let Some(task) = self.task.take() else { return Ok(()) };
        task.await
            .map_err(|source| HubError::Task { listener, source })?
            .map_err(|source| HubError::Transport { listener, source })
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// Runs `service` on connections accepted from `listener` and TLS-terminated with `tls`, until
/// `shutdown` says so.
fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Result<Arc<ServerConfig>, PkiError>,
    service: ControlPlaneServer<impl ControlPlane>,
    (shutdown, stopped): (watch::Sender<bool>, watch::Receiver<bool>),
) -> Result<Listening, HubError> {
    let acceptor = TlsAcceptor::from(tls.map_err(|source| HubError::Tls { listener: name, source })?);
    let local_addr = listener.local_addr().map_err(|source| HubError::Io { listener: name, source })?;
    let (connections, incoming) = mpsc::channel::<io::Result<TlsStream<TcpStream>>>(16);
    tokio::spawn(accept(listener, acceptor, connections, stopped.clone()));
    let mut stop = stopped;
    // The agent streams logs to the hub: hyper's 1 MiB windows would let it send one batch and
    // then wait for the hub to read it. With windows above the agent's own limit of
    // unacknowledged output, flow control never holds it back before that limit does, and the
    // hub's memory per session stays bounded by them. Frames larger than HTTP/2's 16 KiB
    // default cut the per-frame work of a batch sixteenfold.
    let mut server = Server::builder()
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .max_frame_size(H2_MAX_FRAME);
    let task = tokio::spawn(server.add_service(service).serve_with_incoming_shutdown(
        ReceiverStream::new(incoming),
        async move {
            // An error means the sender is gone, which is a shutdown too.
            let _ = stop.wait_for(|stopped| *stopped).await;
        },
    ));
    Ok(Listening { listener: name, local_addr, shutdown, task: Some(task) })
}

/// Accepts TCP connections and hands over those whose TLS handshake succeeds.
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    connections: mpsc::Sender<io::Result<TlsStream<TcpStream>>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            _ = stopped.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Per-connection errors (e.g. the peer reset before accept); the listener lives on.
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        // One handshake per task, so that a slow or silent client does not hold up the others.
        // As on the agent's side: small latency-bound messages must not wait for Nagle.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        tokio::spawn(async move {
            let peer = tcp.peer_addr().ok();
            match acceptor.accept(tcp).await {
                Ok(tls) => {
                    // A closed channel means the server stopped; the connection is dropped.
                    let _ = connections.send(Ok(tls)).await;
                }
                // A refused client certificate ends here, never reaching the service.
                Err(e) => tracing::info!(?peer, error = %e, "TLS handshake refused"),
            }
        });
    }
}

/// `Register`, on the listener that asks for no client certificate.
#[derive(Debug)]
struct RegistrationService {
    pki: Arc<HubPki>,
}

#[tonic::async_trait]
impl ControlPlane for RegistrationService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.into_inner();
        let protocol = negotiate(PROTOCOL, request.protocol)?;
        let pki = self.pki.clone();
        let worker_id = request.worker_id.clone();
        // Parsing the CSR and signing are CPU work; keep them off the reactor threads.
        let certificate = tokio::task::spawn_blocking(move || {
            pki.register(&request.token, &request.worker_id, &request.csr_pem)
        })
        .await
        .map_err(|e| {
            tracing::error!(worker = %worker_id, error = %e, "registration task failed");
            Status::internal("registration failed")
        })?
        .map_err(|e| registration_status(&worker_id, e))?;
        let not_after_unix_ms = unix_ms(certificate.not_after);
        Ok(Response::new(RegisterResponse {
            protocol: Some(protocol),
            certificate_pem: certificate.cert_pem,
            not_after_unix_ms,
        }))
    }

    type SessionStream = ReceiverStream<Result<HubMessage, Status>>;

    async fn session(
        &self,
        _: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unauthenticated("sessions need a client certificate: use the session listener"))
    }
}

/// The status for a refused registration. PkiError messages never contain the token.
fn registration_status(worker_id: &str, error: PkiError) -> Status {
    match error {
        PkiError::UnknownToken
        | PkiError::TokenReplayed
        | PkiError::TokenExpired
        | PkiError::TokenWrongWorker { .. } => {
            tracing::warn!(worker = worker_id, error = %error, "registration refused");
            Status::unauthenticated(error.to_string())
        }
        PkiError::WorkerRevoked(_) => {
            tracing::warn!(worker = worker_id, error = %error, "registration refused");
            Status::permission_denied(error.to_string())
        }
        PkiError::InvalidCsr { .. } | PkiError::InvalidWorkerId { .. } => {
            Status::invalid_argument(error.to_string())
        }
        other => {
            // The hub's own failure: the details are for its log, not for the agent.
            tracing::error!(worker = worker_id, error = %other, "registration failed");
            Status::internal("registration failed on the control plane")
        }
    }
}

/// `Session`, on the mutual-TLS listener.
#[derive(Debug)]
struct SessionService {
    config: HubConfig,
    registry: Arc<Registry>,
    logs: Option<Arc<LogStore>>,
    pki: Arc<HubPki>,
    metrics: Arc<Metrics>,
    stopped: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl ControlPlane for SessionService {
    async fn register(&self, _: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("registration is served on the registration listener"))
    }

    type SessionStream = ReceiverStream<Result<HubMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // The handshake verified the chain and revocation; what is left is who it is.
        let peer = request
            .peer_certs()
            .and_then(|chain| chain.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(self.config.heartbeat_timeout, inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no Hello within the heartbeat timeout")),
            Ok(message) => match message?.and_then(|m| m.kind) {
                Some(agent_message::Kind::Hello(hello)) => hello,
                _ => return Err(Status::invalid_argument("the first message of a session must be Hello")),
            },
        };
        let protocol = negotiate(PROTOCOL, hello.protocol)?;
        check_peer_worker_id(&peer, &hello.worker_id)
            .map_err(|e| Status::permission_denied(e.to_string()))?;

        // Where each job the agent still holds must resume: what the store already has.
        let mut resume = Vec::new();
        if let Some(logs) = &self.logs {
            for job in &hello.jobs {
                let status = logs.status(&job.job_id).await.map_err(|e| {
                    tracing::warn!(worker = %hello.worker_id, job = %job.job_id, error = %e, "log status unreadable");
                    Status::internal("the control plane cannot read its log store")
                })?;
                resume.extend(LogStream::ALL.map(|stream| log_ack(&job.job_id, stream, &status)));
            }
        }
        let agent_jobs = hello.jobs.iter().map(|job| job.job_id.clone()).collect();
        let (commands, command_rx) = mpsc::channel(16);
        let guard = self.registry.connect(&hello.worker_id, commands);
        let (outbound, stream) = mpsc::channel(16);
        let welcome = Welcome {
            protocol: Some(protocol),
            heartbeat_interval_ms: millis(self.config.heartbeat_interval),
            heartbeat_timeout_ms: millis(self.config.heartbeat_timeout),
            log_batch_max_bytes: self.config.log_batch_max_bytes,
            log_batch_max_delay_ms: millis(self.config.log_batch_max_delay),
            resume,
        };
        // The channel is new and empty, so this cannot find it full.
        outbound
            .try_send(Ok(HubMessage { kind: Some(hub_message::Kind::Welcome(welcome)) }))
            .map_err(|_| Status::internal("session closed before Welcome"))?;
        let session = SessionTask {
            outbound,
            commands: command_rx,
            logs: self.logs.clone(),
            unsynced: BTreeMap::new(),
            unsynced_bytes: 0,
            syncing: None,
            pki: self.pki.clone(),
            metrics: self.metrics.clone(),
            peer: peer.to_vec(),
            jobs: HashMap::new(),
            aliases: HashMap::new(),
            agent_jobs,
            guard,
        };
        tokio::spawn(session.run(inbound, self.config.heartbeat_timeout, self.stopped.clone()));
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

/// A job waiting for its result on this session.
struct PendingJob {
    reply: oneshot::Sender<Result<v1::JobResult, HubError>>,
    /// The first failure to store its output: the result is then reported as this error.
    log_error: Option<LogStoreError>,
}

/// Log bytes a session may have written and not yet seen synced before it stops reading the
/// agent's stream until the sync in flight returns. Above the agent's own window
/// ([`crate::agent::MAX_HELD_BYTES`]), so an agent that keeps to it is never held up here; it
/// bounds what an agent that does not can make the hub write without syncing.
const MAX_UNSYNCED_BYTES: usize = 2 * crate::agent::MAX_HELD_BYTES;

/// Which streams of a job were written since the last sync started: [stdout, stderr].
type Unsynced = BTreeMap<String, [bool; 2]>;

/// What a sync returns: each job it covered, the streams to acknowledge, the outcome.
type SyncOutcome = Vec<(String, [bool; 2], Result<LogStatus, LogStoreError>)>;

/// A session's sync in flight: a task of its own, so that it runs while the session task
/// writes, and the jobs it covers, to be synced again should the task fail.
struct Syncing {
    task: JoinHandle<SyncOutcome>,
    jobs: Unsynced,
}

/// One session's state, owned by its task.
struct SessionTask {
    outbound: mpsc::Sender<Result<HubMessage, Status>>,
    commands: mpsc::Receiver<SessionCommand>,
    logs: Option<Arc<LogStore>>,
    /// Written, not yet covered by a sync: acknowledged once one covering them returns.
    unsynced: Unsynced,
    unsynced_bytes: usize,
    /// At most one at a time: writes go on while it runs, and the next one covers them all.
    syncing: Option<Syncing>,
    pki: Arc<HubPki>,
    metrics: Arc<Metrics>,
    /// The agent's certificate (DER), which a rotation request must present.
    peer: Vec<u8>,
    /// By job id. Dropped with the task, which tells every waiter its worker was lost.
    jobs: HashMap<String, PendingJob>,
    /// The id a caller asked for, by the id of the earlier attempt it re-attached to.
    aliases: HashMap<String, String>,
    /// The jobs the agent holds: announced in `Hello` or accepted on this session.
    agent_jobs: std::collections::HashSet<String>,
    guard: ConnectionGuard,
}

/// Whether the session goes on after a message.
type Flow = std::ops::ControlFlow<()>;

impl SessionTask {
    /// Serves the session until the agent closes its stream, falls silent, or the connection
    /// dies.
    async fn run(
        mut self,
        mut inbound: Streaming<AgentMessage>,
        timeout: Duration,
        mut stopped: watch::Receiver<bool>,
    ) {
        loop {
            let message = tokio::select! {
                // The guard `wait_for` returns is not `Send`; drop it before awaiting anything else.
                () = async { let _ = stopped.wait_for(|stopped| *stopped).await; } => {
                    let _ = self.outbound.send(Err(Status::unavailable("the control plane is shutting down"))).await;
                    break;
                }
                // The response stream was dropped: the peer is gone.
                () = self.outbound.closed() => break,
                Some(command) = self.commands.recv() => {
                    if self.command(command).await.is_break() {
                        break;
                    }
                    continue;
                }
                synced = in_flight(&mut self.syncing), if self.syncing.is_some() => {
                    let synced = self.sync_ended(synced);
                    if self.synced(synced).await.is_break() {
                        break;
                    }
                    self.start_sync();
                    continue;
                }
                // Not while the sync in flight leaves too much written and unsynced.
                received = tokio::time::timeout(timeout, inbound.message()),
                    if self.syncing.is_none() || self.unsynced_bytes < MAX_UNSYNCED_BYTES => received,
            };
            let worker = self.guard.worker_id.as_str();
            let kind = match message {
                Err(_) => {
                    tracing::warn!(worker, "no message within the heartbeat timeout; closing the session");
                    let _ = self
                        .outbound
                        .send(Err(Status::deadline_exceeded("no heartbeat within the timeout")))
                        .await;
                    break;
                }
                Ok(Ok(Some(message))) => message.kind,
                Ok(Ok(None)) => break,
                Ok(Err(status)) => {
                    tracing::debug!(worker, %status, "session stream failed");
                    break;
                }
            };
            if self.message(kind).await.is_break() {
                break;
            }
            self.start_sync();
        }
        // What was written is made durable and acknowledged as far as the stream still goes,
        // so that the agent's next session resends less.
        // The sync in flight, then one for what it left; no more, so that a store that keeps
        // failing cannot hold the session's end up.
        for _ in 0..2 {
            self.start_sync();
            if self.syncing.is_none() {
                break;
            }
            let ended = in_flight(&mut self.syncing).await;
            let outcome = self.sync_ended(ended);
            let _ = self.synced(outcome).await;
        }
        if !self.jobs.is_empty() {
            tracing::warn!(worker = %self.guard.worker_id, jobs = self.jobs.len(), "session ended with jobs running");
        }
    }

    async fn send(&self, kind: hub_message::Kind) -> Flow {
        match self.outbound.send(Ok(HubMessage { kind: Some(kind) })).await {
            Ok(()) => Flow::Continue(()),
            Err(_) => Flow::Break(()),
        }
    }

    async fn command(&mut self, command: SessionCommand) -> Flow {
        match command {
            SessionCommand::Run { spec, previous, reply } => {
                let job_id = spec.job_id.clone();
                let worker_id = self.guard.worker_id.clone();
                if self.jobs.contains_key(&job_id) {
                    let _ = reply.send(Err(HubError::DuplicateJob { worker_id, job_id }));
                    return Flow::Continue(());
                }
                // Checked again here, in the task that stores results: one may have arrived
                // since the caller looked.
                if let Some(logs) = &self.logs {
                    match stored_result(logs, &job_id, &previous).await {
                        Ok(Some(result)) => {
                            let _ = reply.send(Ok(result));
                            return Flow::Continue(());
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return Flow::Continue(());
                        }
                    }
                }
                let attached = previous.iter().find(|id| self.agent_jobs.contains(*id)).cloned();
                match attached {
                    Some(earlier) => {
                        tracing::info!(worker = %worker_id, job = %earlier, "re-attached to a running job");
                        self.aliases.insert(job_id, earlier.clone());
                        self.jobs.insert(earlier, PendingJob { reply, log_error: None });
                        Flow::Continue(())
                    }
                    None => {
                        self.jobs.insert(job_id, PendingJob { reply, log_error: None });
                        // Sent even for a job the agent holds: it then goes on, and its output and
                        // result come as they would have.
                        self.send(hub_message::Kind::Assign(AssignJob { spec: Some(*spec) })).await
                    }
                }
            }
            SessionCommand::Cancel { job_id, reason } => {
                let job_id = self.aliases.get(&job_id).cloned().unwrap_or(job_id);
                self.agent_jobs.remove(&job_id);
                self.send(hub_message::Kind::Cancel(CancelJob { job_id, reason })).await
            }
            SessionCommand::Abandon { job_id, cancel } => {
                let job_id = self.aliases.remove(&job_id).unwrap_or(job_id);
                self.jobs.remove(&job_id);
                match cancel {
                    Some(reason) => {
                        // Being cancelled, it is no job to re-attach a later attempt to.
                        self.agent_jobs.remove(&job_id);
                        self.send(hub_message::Kind::Cancel(CancelJob { job_id, reason })).await
                    }
                    None => Flow::Continue(()),
                }
            }
        }
    }

    async fn message(&mut self, kind: Option<agent_message::Kind>) -> Flow {
        let worker = self.guard.worker_id.as_str();
        match kind {
            Some(agent_message::Kind::Heartbeat(_)) => {
                self.send(hub_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: now_unix_ms() })).await
            }
            Some(agent_message::Kind::Hello(_)) => {
                tracing::warn!(worker, "second Hello on a session ignored");
                Flow::Continue(())
            }
            Some(agent_message::Kind::Accepted(accepted)) => {
                tracing::info!(worker, job = %accepted.job_id, pid = accepted.pid, "job accepted");
                self.agent_jobs.insert(accepted.job_id);
                Flow::Continue(())
            }
            Some(agent_message::Kind::Log(batch)) => self.log(batch).await,
            Some(agent_message::Kind::Result(result)) => self.result(result).await,
            Some(agent_message::Kind::Metrics(sample)) => {
                self.metrics.record(sample);
                Flow::Continue(())
            }
            Some(agent_message::Kind::Rotate(request)) => self.rotate(request).await,
            None => {
                tracing::warn!(worker, "empty message ignored");
                Flow::Continue(())
            }
        }
    }

    /// Writes a batch; the next sync makes it durable and acknowledges it (group commit: see
    /// [`SessionTask::start_sync`]). A batch that cannot be stored is not acknowledged, so that
    /// the agent keeps it (once it can resend).
    async fn log(&mut self, batch: v1::LogBatch) -> Flow {
        let Some(logs) = &self.logs else { return Flow::Continue(()) };
        let Some(stream) = log_stream(batch.stream()) else {
            tracing::warn!(worker = %self.guard.worker_id, job = %batch.job_id, "log batch without a stream ignored");
            return Flow::Continue(());
        };
        let len = batch.data.len();
        match logs.write(&batch.job_id, stream, batch.offset, batch.data).await {
            Ok(()) => {
                self.unsynced.entry(batch.job_id).or_default()[stream_index(stream)] = true;
                self.unsynced_bytes = self.unsynced_bytes.saturating_add(len);
            }
            Err(error) => self.log_failed(&batch.job_id, error),
        }
        Flow::Continue(())
    }

    fn log_failed(&mut self, job_id: &str, error: LogStoreError) {
        tracing::warn!(worker = %self.guard.worker_id, job = %job_id, %error, "log batch not stored");
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.log_error.get_or_insert(error);
        }
    }

    /// Starts syncing every job written to since the last sync started, unless one is in
    /// flight: that one's end starts the next. So a lone batch is synced at once, and a flood
    /// of batches costs one fsync per whatever arrived during the previous one, while the
    /// agent's stream is read on meanwhile.
    fn start_sync(&mut self) {
        if self.syncing.is_some() || self.unsynced.is_empty() {
            return;
        }
        let Some(logs) = self.logs.clone() else { return };
        let jobs = std::mem::take(&mut self.unsynced);
        self.unsynced_bytes = 0;
        let covered = jobs.clone();
        let task = tokio::spawn(async move {
            let mut outcomes = Vec::with_capacity(covered.len());
            for (job_id, streams) in covered {
                let outcome = logs.sync(&job_id).await;
                outcomes.push((job_id, streams, outcome));
            }
            outcomes
        });
        self.syncing = Some(Syncing { task, jobs });
    }

    /// Takes the ended sync out; if its task failed, what it covered is due again.
    fn sync_ended(&mut self, ended: Result<SyncOutcome, tokio::task::JoinError>) -> SyncOutcome {
        let jobs = self.syncing.take().map(|syncing| syncing.jobs).unwrap_or_default();
        ended.unwrap_or_else(|error| {
            tracing::error!(worker = %self.guard.worker_id, %error, "log sync task failed; syncing again");
            for (job_id, streams) in jobs {
                let due = self.unsynced.entry(job_id).or_default();
                for (due, written) in due.iter_mut().zip(streams) {
                    *due |= written;
                }
            }
            Vec::new()
        })
    }

    /// Acknowledges what a sync made durable.
    async fn synced(&mut self, outcomes: SyncOutcome) -> Flow {
        for (job_id, streams, outcome) in outcomes {
            match outcome {
                Ok(status) => {
                    for (stream, written) in LogStream::ALL.into_iter().zip(streams) {
                        if written && self.acknowledge(&job_id, stream, &status).await.is_break() {
                            return Flow::Break(());
                        }
                    }
                }
                Err(error) => self.log_failed(&job_id, error),
            }
        }
        Flow::Continue(())
    }

    async fn acknowledge(&self, job_id: &str, stream: LogStream, status: &LogStatus) -> Flow {
        self.send(hub_message::Kind::LogAck(log_ack(job_id, stream, status))).await
    }

    /// Stores the result and closes the job's log, acknowledges the result, then hands it to
    /// the waiter: the log is complete and the result durable by the time `run_job` returns,
    /// and a result nobody waits for (the control plane restarted since it assigned the job)
    /// is found by the step when it asks again.
    async fn result(&mut self, result: v1::JobResult) -> Flow {
        use prost::Message as _;
        let job_id = result.job_id.clone();
        self.agent_jobs.remove(&job_id);
        self.metrics.map().remove(&job_id);
        // Closing syncs what was written, so the log is durable before the result is stored,
        // and it is acknowledged before the result, so that the agent can forget the job.
        self.unsynced.remove(&job_id);
        let stored = match &self.logs {
            Some(logs) => match logs.finish(&job_id, &result.encode_to_vec()).await {
                Ok(()) => logs.status(&job_id).await,
                Err(error) => Err(error),
            },
            None => Ok(LogStatus::default()),
        };
        if let Ok(status) = &stored {
            for stream in LogStream::ALL {
                if self.acknowledge(&job_id, stream, status).await.is_break() {
                    return Flow::Break(());
                }
            }
        }
        let stored = stored.map(drop);
        let job = self.jobs.remove(&job_id);
        self.aliases.retain(|_, attached| *attached != job_id);
        if let Err(error) = &stored {
            // Not acknowledged: the agent keeps the result and sends it again on its next
            // session, by when the store may work again.
            tracing::error!(worker = %self.guard.worker_id, job = %job_id, %error, "job result not stored");
        }
        let flow = match stored {
            Ok(()) => self.send(hub_message::Kind::ResultAck(ResultAck { job_id: job_id.clone() })).await,
            Err(_) => Flow::Continue(()),
        };
        let Some(job) = job else {
            tracing::info!(worker = %self.guard.worker_id, job = %job_id, "result stored for a job nobody waits for yet");
            return flow;
        };
        let outcome = match job.log_error.map_or(stored, Err) {
            Ok(()) => Ok(result),
            Err(source) => Err(HubError::Logs { job_id, source }),
        };
        // The caller may have given up waiting; the result is then nobody's.
        let _ = job.reply.send(outcome);
        flow
    }

    /// Issues a new certificate for the key the agent generated, if its current certificate
    /// still passes the handshake's checks. A refusal is logged and not answered: the agent
    /// keeps its certificate and asks again on its next session.
    async fn rotate(&mut self, request: v1::RotateRequest) -> Flow {
        let (pki, peer) = (self.pki.clone(), self.peer.clone());
        let worker = self.guard.worker_id.clone();
        // Parsing the CSR and signing are CPU work; keep them off the reactor threads.
        let issued = tokio::task::spawn_blocking(move || pki.rotate(&peer, &request.csr_pem)).await;
        match issued {
            Ok(Ok(certificate)) if certificate.worker_id == worker => {
                let response = v1::RotateResponse {
                    not_after_unix_ms: unix_ms(certificate.not_after),
                    certificate_pem: certificate.cert_pem,
                };
                self.send(hub_message::Kind::Rotate(response)).await
            }
            Ok(Ok(certificate)) => {
                tracing::warn!(worker, issued_for = %certificate.worker_id, "rotation refused: the CSR's certificate is for another worker");
                Flow::Continue(())
            }
            Ok(Err(error)) => {
                tracing::warn!(worker, %error, "certificate rotation refused");
                Flow::Continue(())
            }
            Err(error) => {
                tracing::error!(worker, %error, "certificate rotation task failed");
                Flow::Continue(())
            }
        }
    }
}

/// The first reusable stored result among `job_ids`: a cancelled job's result is not reused,
/// because the hub cancels only jobs nobody waits for any more.
async fn stored_result(
    logs: &LogStore,
    job_id: &str,
    previous: &[String],
) -> Result<Option<v1::JobResult>, HubError> {
    for job_id in std::iter::once(job_id).chain(previous.iter().map(String::as_str)) {
        if let Some(result) = read_result(logs, job_id).await?
            && !matches!(result.outcome, Some(v1::job_result::Outcome::Cancelled(_)))
        {
            return Ok(Some(result));
        }
    }
    Ok(None)
}

async fn read_result(logs: &LogStore, job_id: &str) -> Result<Option<v1::JobResult>, HubError> {
    use prost::Message as _;
    let logs_error = |source| HubError::Logs { job_id: job_id.to_owned(), source };
    let Some(bytes) = logs.result(job_id).await.map_err(logs_error)? else { return Ok(None) };
    v1::JobResult::decode(bytes.as_slice()).map(Some).map_err(|e| {
        logs_error(LogStoreError::CorruptState {
            path: job_id.into(),
            reason: format!("the stored result does not decode: {e}"),
        })
    })
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).ok().and_then(|d| i64::try_from(d.as_millis()).ok()).unwrap_or(i64::MAX)
}

/// The end of the sync in flight, or never.
async fn in_flight(syncing: &mut Option<Syncing>) -> Result<SyncOutcome, tokio::task::JoinError> {
    match syncing {
        Some(syncing) => (&mut syncing.task).await,
        None => std::future::pending().await,
    }
}

fn stream_index(stream: LogStream) -> usize {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
    }
}

/// The acknowledgement of `stream` up to where `status` (durable, as the store reports it)
/// has it: for a session's acks and for `Welcome`'s resume alike.
fn log_ack(job_id: &str, stream: LogStream, status: &LogStatus) -> LogAck {
    let wire = match stream {
        LogStream::Stdout => OutputStream::Stdout,
        LogStream::Stderr => OutputStream::Stderr,
    };
    LogAck { job_id: job_id.to_owned(), stream: wire.into(), stored: status.stream(stream).end }
}

/// The store's stream for a wire stream; `None` for an unspecified one.
fn log_stream(stream: OutputStream) -> Option<LogStream> {
    match stream {
        OutputStream::Stdout => Some(LogStream::Stdout),
        OutputStream::Stderr => Some(LogStream::Stderr),
        OutputStream::Unspecified => None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
