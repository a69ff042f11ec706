//! Workers as Docker containers, through the engine's API (bollard).
//!
//! Each worker is one container named `hodei-<worker id>`, created from the configured image
//! (`docker/Dockerfile`: a static `hodei-agent` on an empty image) with the agent's settings in
//! its environment. The CA bundle is uploaded into the created container as a tar archive before
//! it starts, so no host file is shared with it and nothing is left on the host to clean up. The
//! container carries Hodei's labels, so that [`Provider::list`] finds orphans by label after a
//! restart, and every lookup goes by its name, so no state is kept in this process.
//!
//! The agent is the container's main process: when it ends the container ends, and a job killed
//! by the kernel for exceeding the worker's memory limit shows as Docker's `OOMKilled`
//! ([`Provider::job_end_reason`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerState, ContainerStateStatusEnum, ContainerSummaryStateEnum, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, InspectContainerOptions,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::{StreamExt, TryStreamExt};
use hodei_agent::protocol::v1::{self, job_result::Outcome};
use tokio::sync::OnceCell;

/// bollard, whose client [`DockerProvider::client`] hands out, for the rest of the API.
pub use bollard;

use crate::provider::{
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, Provider, ProviderError, WORKER_ID_LABEL, WorkerInfo, WorkerSpec,
    WorkerState,
};

/// The provider's name, which jobs use as a hint.
pub const NAME: &str = "docker";
/// The image used when neither the spec nor the configuration names one.
pub const DEFAULT_IMAGE: &str = "hodei-agent:latest";
/// Where the Docker daemon listens when `DOCKER_HOST` names no Unix socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// The `provider_config` key that overrides the network mode for one worker.
pub const NETWORK_MODE_KEY: &str = "network_mode";
/// The directory the provider uploads into each container: the CA bundle, and the agent's work
/// directory below it.
pub const AGENT_DIR: &str = "/hodei";
/// The CA bundle's path inside the container.
pub const CA_BUNDLE_PATH: &str = "/hodei/ca.pem";
/// The agent's work directory (key and certificate) inside the container.
pub const WORK_DIR_PATH: &str = "/hodei/work";
/// The label that ties a container to one [`DockerConfig::instance`].
pub const INSTANCE_LABEL: &str = "hodei.dev/instance";
/// The prefix of every worker container's name.
pub const CONTAINER_PREFIX: &str = "hodei-";

/// The exit status the kernel's OOM killer leaves: SIGKILL.
const SIGKILL: i32 = 9;

/// How the provider reaches Docker and what it starts. `DockerConfig::default()` dials
/// `DOCKER_HOST` when it names a Unix socket, else [`DEFAULT_SOCKET`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DockerConfig {
    /// The daemon's Unix socket.
    pub socket: PathBuf,
    /// The image for specs that name none.
    pub image: String,
    /// The network mode for specs whose `provider_config` has no `network_mode`. Docker's own
    /// default is `bridge`, where `127.0.0.1` is the container itself: the hub must then listen
    /// on an address the container reaches. `host` lets the agent dial a hub on the host's
    /// loopback.
    pub network_mode: String,
    /// Labels every worker offers to jobs ([`Provider::labels`]).
    pub labels: BTreeMap<String, String>,
    /// When set, containers carry [`INSTANCE_LABEL`] with this value and [`Provider::list`]
    /// returns only those: control planes sharing one daemon then never reap each other's
    /// workers. When unset, every container labelled as Hodei's is listed.
    pub instance: Option<String>,
    /// How long one API call may take.
    pub api_timeout: Duration,
    /// How many lines of a container's output [`Provider::output`] returns.
    pub log_tail_lines: usize,
    /// How long [`Provider::job_end_reason`] waits for the engine to report an OOM kill
    /// of a job that died of SIGKILL.
    pub oom_event_wait: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|host| host.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        Self {
            socket,
            image: DEFAULT_IMAGE.to_owned(),
            network_mode: "bridge".to_owned(),
            labels: [("os".to_owned(), "linux".to_owned())].into(),
            instance: None,
            api_timeout: Duration::from_secs(60),
            log_tail_lines: 100,
            oom_event_wait: Duration::from_secs(2),
        }
    }
}

impl DockerConfig {
    /// Dials this Unix socket.
    pub fn socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.socket = socket.into();
        self
    }

    /// Starts this image for specs that name none.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = image.into();
        self
    }

    /// Uses this network mode for specs that name none (`bridge`, `host`, a network's name).
    pub fn network_mode(mut self, mode: impl Into<String>) -> Self {
        self.network_mode = mode.into();
        self
    }

    /// Offers this label to jobs.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }

    /// Tags this provider's containers, and lists only those ([`DockerConfig::instance`]).
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// Gives each API call this long.
    pub fn api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = timeout;
        self
    }
}

/// The command that builds `image` from a Hodei checkout, for [`ProviderError::ImageMissing`].
pub fn build_command(image: &str) -> String {
    format!("docker/build-agent-image.sh {image}")
}

/// The name of the container of `worker_id`.
pub fn container_name(worker_id: &str) -> String {
    format!("{CONTAINER_PREFIX}{worker_id}")
}

/// Workers as Docker containers. See the [module docs](self).
pub struct DockerProvider {
    config: DockerConfig,
    /// Connected, and the API version agreed, on first use: a daemon that starts after the
    /// provider is built is still found.
    client: OnceCell<Docker>,
}

impl fmt::Debug for DockerProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerProvider")
            .field("config", &self.config)
            .field("connected", &self.client.initialized())
            .finish()
    }
}

impl DockerProvider {
    /// A provider that connects on first use.
    pub fn new(config: DockerConfig) -> Self {
        Self { config, client: OnceCell::new() }
    }

    /// A provider connected now: fails with [`ProviderError::Unreachable`] if the daemon does
    /// not answer.
    pub async fn connect(config: DockerConfig) -> Result<Self, ProviderError> {
        let provider = Self::new(config);
        provider.client().await?;
        Ok(provider)
    }

    /// Its configuration.
    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    /// The bollard client, for callers that need more of the API than the provider offers.
    pub async fn client(&self) -> Result<&Docker, ProviderError> {
        self.client
            .get_or_try_init(|| async {
                let socket = self.config.socket.to_string_lossy();
                let timeout = self.config.api_timeout.as_secs().max(1);
                let docker = Docker::connect_with_unix(&socket, timeout, bollard::API_DEFAULT_VERSION)
                    .map_err(|e| self.unreachable(e))?;
                // The daemon may speak an older API than bollard's default (20.10 speaks 1.41).
                docker.negotiate_version().await.map_err(|e| self.classify("asking the daemon's version", e))
            })
            .await
    }

    /// Whether the kernel's OOM killer killed a process of the worker since it was created. The
    /// job, by far the largest process, is the one it picks, and the agent lives on.
    ///
    /// Docker's `OOMKilled` flag is only set once the container has exited on older engines
    /// (20.10 does so), so the engine's `oom` events for the container are read as well.
    pub async fn out_of_memory(&self, worker_id: &str) -> Result<bool, ProviderError> {
        let Some(container) = self.inspect(worker_id).await? else { return Ok(false) };
        self.oom_seen(&container, Duration::ZERO).await
    }

    /// Why a job on the worker ended, when the worker knows better than the job's result: a job
    /// killed by SIGKILL in a worker whose OOM killer fired ran out of memory. `None` when the
    /// result says all there is.
    ///
    /// The engine hears of the OOM kill on its own path, which may be slower than the agent's
    /// report of the job's end: for a SIGKILL, its `oom` event is awaited for up to
    /// [`DockerConfig::oom_event_wait`].
    async fn oom_end_reason(
        &self,
        worker_id: &str,
        result: &v1::JobResult,
    ) -> Result<Option<String>, ProviderError> {
        if result.outcome != Some(Outcome::Signal(SIGKILL)) {
            return Ok(None);
        }
        let Some(container) = self.inspect(worker_id).await? else { return Ok(None) };
        if !self.oom_seen(&container, self.config.oom_event_wait).await? {
            return Ok(None);
        }
        let limit = container.host_config.and_then(|h| h.memory).filter(|bytes| *bytes > 0).map_or_else(
            || "its memory limit".to_owned(),
            |bytes| format!("its memory limit of {bytes} bytes"),
        );
        Ok(Some(format!(
            "out of memory: job `{}` was killed by the kernel's OOM killer for exceeding worker \
             `{worker_id}`'s {limit}",
            result.job_id
        )))
    }

    /// Whether the container's `OOMKilled` is set or the engine logged an `oom` event for it:
    /// past events only when `follow_for` is zero, else new ones too for that long.
    async fn oom_seen(
        &self,
        container: &bollard::models::ContainerInspectResponse,
        follow_for: Duration,
    ) -> Result<bool, ProviderError> {
        if container.state.as_ref().and_then(|state| state.oom_killed) == Some(true) {
            return Ok(true);
        }
        let Some(id) = container.id.as_deref() else { return Ok(false) };
        let docker = self.client().await?;
        let filters: HashMap<&str, Vec<String>> = [
            ("type", vec!["container".to_owned()]),
            ("container", vec![id.to_owned()]),
            ("event", vec!["oom".to_owned()]),
        ]
        .into();
        // The engine keeps its recent events in memory; since 0 replays those of this container.
        let mut options = EventsOptionsBuilder::new().since("0").filters(&filters);
        let until;
        if follow_for.is_zero() {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            until = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
            options = options.until(&until);
        }
        let mut events = docker.events(Some(options.build()));
        let first = if follow_for.is_zero() {
            events.next().await
        } else {
            match tokio::time::timeout(follow_for, events.next()).await {
                Ok(first) => first,
                Err(_) => return Ok(false),
            }
        };
        match first {
            Some(Ok(_)) => Ok(true),
            None => Ok(false),
            Some(Err(e)) => Err(self.classify("reading the engine's events", e)),
        }
    }

    /// Waits until the worker's container has stopped, on the engine's own wait (no polling), and
    /// returns its state then: [`WorkerState::Gone`] if there is no such container.
    pub async fn wait_exit(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        let docker = self.client().await?;
        let name = container_name(worker_id);
        loop {
            // `not-running` answers at once for a container that never started or already ended.
            let options = WaitContainerOptionsBuilder::new().condition("not-running").build();
            match docker.wait_container(&name, Some(options)).next().await {
                // bollard reports a non-zero exit as an error; the state says which.
                None | Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) => break,
                // The wait is one request, bounded by the API timeout: a long job outlasts it.
                Some(Err(DockerError::RequestTimeoutError)) => continue,
                Some(Err(e)) if status_of(&e) == Some(404) => return Ok(WorkerState::Gone),
                Some(Err(e)) => return Err(self.classify("waiting for the container", e)),
            }
        }
        self.state(worker_id).await
    }

    /// The error for a worker that stopped before its agent registered, with its state and the
    /// last of its output. Never fails: what could not be read is said in the error instead.
    pub async fn exited_before_registering(&self, worker_id: &str) -> ProviderError {
        let status = match self.state(worker_id).await {
            Ok(state) => describe(&state),
            Err(e) => format!("state unknown: {e}"),
        };
        let output = self.output(worker_id).await.unwrap_or_else(|e| format!("<output unavailable: {e}>"));
        ProviderError::ExitedBeforeRegistering {
            provider: NAME.to_owned(),
            worker_id: worker_id.to_owned(),
            status,
            output,
        }
    }

    async fn inspect(
        &self,
        worker_id: &str,
    ) -> Result<Option<bollard::models::ContainerInspectResponse>, ProviderError> {
        let docker = self.client().await?;
        match docker.inspect_container(&container_name(worker_id), None::<InspectContainerOptions>).await {
            Ok(container) => Ok(Some(container)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.classify("inspecting the container", e)),
        }
    }

    async fn inspect_state(&self, worker_id: &str) -> Result<Option<ContainerState>, ProviderError> {
        Ok(self.inspect(worker_id).await?.and_then(|container| container.state))
    }

    /// The container's create body for `spec`, or why the spec cannot be one.
    fn container_body(&self, spec: &WorkerSpec, image: &str) -> Result<ContainerCreateBody, ProviderError> {
        let mut env: Vec<String> = spec
            .agent
            .variables(&spec.worker_id)
            .into_iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        env.push(format!("HODEI_CA_BUNDLE={CA_BUNDLE_PATH}"));
        env.push(format!("HODEI_WORK_DIR={WORK_DIR_PATH}"));
        let nano_cpus = match spec.resources.cpu_millis {
            None => None,
            Some(0) => return Err(self.invalid("a cpu limit of 0 millicores")),
            Some(millis) => Some(
                millis
                    .checked_mul(1_000_000)
                    .and_then(|nanos| i64::try_from(nanos).ok())
                    .ok_or_else(|| self.invalid(format!("a cpu limit of {millis} millicores")))?,
            ),
        };
        let memory = match spec.resources.memory_bytes {
            None => None,
            Some(0) => return Err(self.invalid("a memory limit of 0 bytes")),
            Some(bytes) => Some(
                i64::try_from(bytes).map_err(|_| self.invalid(format!("a memory limit of {bytes} bytes")))?,
            ),
        };
        let network_mode = spec.provider_config.get(NETWORK_MODE_KEY).unwrap_or(&self.config.network_mode);
        let host_config = HostConfig {
            nano_cpus,
            memory,
            // Swap equal to the limit means none: a job over its limit is killed, not slowed to
            // a crawl on swap.
            memory_swap: memory,
            network_mode: Some(network_mode.clone()),
            ..HostConfig::default()
        };
        Ok(ContainerCreateBody {
            image: Some(image.to_owned()),
            env: Some(env),
            labels: Some(self.labels_for(spec).into_iter().collect()),
            host_config: Some(host_config),
            ..ContainerCreateBody::default()
        })
    }

    /// The container's labels: the spec's, Hodei's, and the instance's.
    fn labels_for(&self, spec: &WorkerSpec) -> BTreeMap<String, String> {
        let mut labels = spec.all_labels();
        if let Some(instance) = &self.config.instance {
            labels.insert(INSTANCE_LABEL.to_owned(), instance.clone());
        }
        labels
    }

    /// Removes a container that failed to provision; a failure here is only logged, the
    /// provisioning error being the one to report.
    async fn discard(&self, docker: &Docker, name: &str) {
        let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        if let Err(e) = docker.remove_container(name, Some(options)).await
            && status_of(&e) != Some(404)
        {
            tracing::warn!(container = name, error = %e, "could not remove a container that failed to start");
        }
    }

    fn invalid(&self, what: impl fmt::Display) -> ProviderError {
        ProviderError::InvalidSpec {
            provider: NAME.to_owned(),
            reason: format!("{what} is not a valid limit"),
        }
    }

    fn unreachable(&self, error: DockerError) -> ProviderError {
        let reason = match &error {
            DockerError::SocketNotFoundError(_) => {
                "no such socket (is the Docker daemon running?)".to_owned()
            }
            other => other.to_string(),
        };
        ProviderError::Unreachable {
            provider: NAME.to_owned(),
            endpoint: format!("unix://{}", self.config.socket.display()),
            reason,
        }
    }

    /// A failure of the connection is `Unreachable`; anything the daemon answered is an
    /// infrastructure failure unless the caller matched its status first.
    fn classify(&self, action: &str, error: DockerError) -> ProviderError {
        match error {
            DockerError::DockerResponseServerError { status_code, message } => {
                ProviderError::Infrastructure {
                    provider: NAME.to_owned(),
                    reason: format!("{action}: the daemon answered {status_code}: {message}"),
                }
            }
            DockerError::SocketNotFoundError(_)
            | DockerError::HyperLegacyError { .. }
            | DockerError::IOError { .. }
            | DockerError::RequestTimeoutError => self.unreachable(error),
            other => ProviderError::Infrastructure {
                provider: NAME.to_owned(),
                reason: format!("{action}: {other}"),
            },
        }
    }
}

#[async_trait::async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.config.labels.clone()
    }

    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        let image = spec.image.as_deref().unwrap_or(&self.config.image);
        let body = self.container_body(spec, image)?;
        let labels = self.labels_for(spec);
        let docker = self.client().await?;
        let name = container_name(&spec.worker_id);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = match docker.create_container(Some(options), body).await {
            Ok(created) => created,
            Err(e) => {
                return Err(match (status_of(&e), e) {
                    (Some(404), _) => ProviderError::ImageMissing {
                        provider: NAME.to_owned(),
                        image: image.to_owned(),
                        hint: format!(
                            "no registry is needed: build it from a Hodei checkout with `{}`",
                            build_command(image)
                        ),
                    },
                    (Some(409), _) => ProviderError::InvalidSpec {
                        provider: NAME.to_owned(),
                        reason: format!(
                            "a container named `{name}` already exists: worker id `{}` is in use",
                            spec.worker_id
                        ),
                    },
                    (Some(400), DockerError::DockerResponseServerError { message, .. }) => {
                        ProviderError::InvalidSpec { provider: NAME.to_owned(), reason: message }
                    }
                    (_, e) => self.classify("creating the container", e),
                });
            }
        };
        for warning in &created.warnings {
            tracing::warn!(container = %name, %warning, "the daemon warned about the container");
        }

        let archive = agent_files(&spec.agent.ca_bundle_pem);
        let upload = UploadToContainerOptionsBuilder::new().path("/").build();
        if let Err(e) =
            docker.upload_to_container(&created.id, Some(upload), bollard::body_full(archive.into())).await
        {
            self.discard(docker, &created.id).await;
            return Err(self.classify("uploading the CA bundle into the container", e));
        }

        if let Err(e) = docker.start_container(&created.id, None).await {
            // The runtime's own message (e.g. no such executable) is the cause; whatever the
            // container printed before it failed comes with it.
            let output = self.output(&spec.worker_id).await.unwrap_or_default();
            self.discard(docker, &created.id).await;
            let error = match (status_of(&e), e) {
                (Some(400), DockerError::DockerResponseServerError { message, .. }) => {
                    ProviderError::InvalidSpec { provider: NAME.to_owned(), reason: message }
                }
                (_, e) => self.classify("starting the container", e),
            };
            return Err(with_output(error, &output));
        }
        Ok(WorkerInfo::new(&spec.worker_id, created.id, labels, WorkerState::Running))
    }

    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        Ok(match self.inspect_state(worker_id).await? {
            None => WorkerState::Gone,
            Some(state) => worker_state(&state),
        })
    }

    /// On the engine's own wait API: no polling.
    async fn exited(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        self.wait_exit(worker_id).await
    }

    async fn output(&self, worker_id: &str) -> Result<String, ProviderError> {
        let docker = self.client().await?;
        let tail = self.config.log_tail_lines.to_string();
        let options = LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&tail).build();
        let chunks: Vec<_> = match docker.logs(&container_name(worker_id), Some(options)).try_collect().await
        {
            Ok(chunks) => chunks,
            Err(e) if status_of(&e) == Some(404) => {
                return Err(ProviderError::NotFound {
                    provider: NAME.to_owned(),
                    worker_id: worker_id.to_owned(),
                });
            }
            Err(e) => return Err(self.classify("reading the container's output", e)),
        };
        let bytes: Vec<u8> = chunks.into_iter().flat_map(|chunk| chunk.into_bytes()).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        let docker = self.client().await?;
        let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match docker.remove_container(&container_name(worker_id), Some(options)).await {
            Ok(()) => Ok(()),
            // Gone already, or being removed by an earlier call: either way it will be gone.
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) if status_of(&e) == Some(409) && e.to_string().contains("already in progress") => Ok(()),
            Err(e) => Err(self.classify("removing the container", e)),
        }
    }

    async fn job_end_reason(
        &self,
        worker_id: &str,
        result: &v1::JobResult,
    ) -> Result<Option<String>, ProviderError> {
        self.oom_end_reason(worker_id, result).await
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        let docker = self.client().await?;
        let mut wanted = vec![format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")];
        if let Some(instance) = &self.config.instance {
            wanted.push(format!("{INSTANCE_LABEL}={instance}"));
        }
        // Several label filters must all match.
        let filters: HashMap<&str, Vec<String>> = [("label", wanted)].into();
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers = docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.classify("listing containers", e))?;
        Ok(containers
            .into_iter()
            .filter_map(|container| {
                let labels: BTreeMap<String, String> =
                    container.labels.unwrap_or_default().into_iter().collect();
                let worker_id = labels.get(WORKER_ID_LABEL)?.clone();
                let state = match container.state {
                    Some(ContainerSummaryStateEnum::CREATED) => WorkerState::Pending,
                    Some(
                        ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING,
                    ) => WorkerState::Running,
                    Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD) => {
                        WorkerState::Exited {
                            code: container.status.as_deref().and_then(listed_exit_code),
                            reason: None,
                        }
                    }
                    _ => WorkerState::Gone,
                };
                Some(WorkerInfo::new(worker_id, container.id.unwrap_or_default(), labels, state))
            })
            .collect())
    }
}

fn status_of(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The worker state for what `docker inspect` says.
fn worker_state(state: &ContainerState) -> WorkerState {
    match state.status {
        Some(ContainerStateStatusEnum::CREATED) | None => WorkerState::Pending,
        Some(
            ContainerStateStatusEnum::RUNNING
            | ContainerStateStatusEnum::PAUSED
            | ContainerStateStatusEnum::RESTARTING
            | ContainerStateStatusEnum::STOPPING,
        ) => WorkerState::Running,
        Some(
            ContainerStateStatusEnum::EXITED
            | ContainerStateStatusEnum::DEAD
            | ContainerStateStatusEnum::REMOVING
            | ContainerStateStatusEnum::EMPTY,
        ) => {
            let reason = if state.oom_killed == Some(true) {
                Some("out of memory (OOMKilled)".to_owned())
            } else {
                state.error.clone().filter(|error| !error.is_empty())
            };
            WorkerState::Exited { code: state.exit_code.and_then(|code| i32::try_from(code).ok()), reason }
        }
    }
}

/// "exited with code 2 (reason)", for error messages.
fn describe(state: &WorkerState) -> String {
    match state {
        WorkerState::Exited { code, reason } => {
            let code = code.map_or_else(|| "exited".to_owned(), |code| format!("exited with code {code}"));
            match reason {
                Some(reason) => format!("{code}: {reason}"),
                None => code,
            }
        }
        WorkerState::Pending => "not started".to_owned(),
        WorkerState::Running => "still running".to_owned(),
        WorkerState::Gone => "removed".to_owned(),
    }
}

/// The exit code in a listing's status, `Exited (137) 5 seconds ago`.
fn listed_exit_code(status: &str) -> Option<i32> {
    status.strip_prefix("Exited (")?.split_once(')')?.0.parse().ok()
}

fn with_output(error: ProviderError, output: &str) -> ProviderError {
    if output.trim().is_empty() {
        return error;
    }
    let output = output.trim_end();
    match error {
        ProviderError::InvalidSpec { provider, reason } => {
            ProviderError::InvalidSpec { provider, reason: format!("{reason}; its output:\n{output}") }
        }
        ProviderError::Infrastructure { provider, reason } => {
            ProviderError::Infrastructure { provider, reason: format!("{reason}; its output:\n{output}") }
        }
        other => other,
    }
}

/// A tar archive, to extract at `/`, of [`AGENT_DIR`] with the CA bundle in it.
///
/// The directory is world-writable with the sticky bit, like `/tmp`, so that the agent can make
/// its work directory there whatever user the image runs it as; the agent makes that one 0700.
/// The CA bundle is public, so 0444.
fn agent_files(ca_bundle_pem: &str) -> Vec<u8> {
    let mtime = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let directory = AGENT_DIR.trim_start_matches('/');
    let mut archive = Vec::with_capacity(4 * 512 + ca_bundle_pem.len());
    archive.extend_from_slice(&ustar_header(&format!("{directory}/"), 0o1777, 0, b'5', mtime));
    let file = CA_BUNDLE_PATH.trim_start_matches('/');
    archive.extend_from_slice(&ustar_header(file, 0o444, ca_bundle_pem.len() as u64, b'0', mtime));
    archive.extend_from_slice(ca_bundle_pem.as_bytes());
    archive.resize(archive.len().next_multiple_of(512), 0);
    // Two zero blocks end the archive.
    archive.resize(archive.len() + 1024, 0);
    archive
}

/// One POSIX ustar header for a root-owned entry. Our names are short constants, well within
/// the 100-byte name field; a tar crate would bring nothing these two entries need.
fn ustar_header(name: &str, mode: u32, size: u64, kind: u8, mtime: u64) -> [u8; 512] {
    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{value:0width$o}", width = field.len() - 1);
        field[..text.len()].copy_from_slice(text.as_bytes());
    }
    debug_assert!(name.len() < 100, "tar entry name `{name}` too long for ustar");
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut header[100..108], u64::from(mode));
    octal(&mut header[108..116], 0);
    octal(&mut header[116..124], 0);
    octal(&mut header[124..136], size);
    octal(&mut header[136..148], mtime);
    header[156] = kind;
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces, and stored as six octal digits, NUL, space.
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    let text = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(text.as_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_is_well_formed_ustar() {
        let pem = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n";
        let archive = agent_files(pem);
        assert_eq!(archive.len() % 512, 0);
        assert_eq!(archive.len(), 512 + 512 + 512 + 1024, "dir header, file header, one data block, end");
        let (dir, file) = (&archive[..512], &archive[512..1024]);
        assert!(dir.starts_with(b"hodei/\0"));
        assert_eq!(&dir[100..107], b"0001777");
        assert_eq!(dir[156], b'5');
        assert!(file.starts_with(b"hodei/ca.pem\0"));
        assert_eq!(&file[124..135], format!("{:011o}", pem.len()).as_bytes());
        assert_eq!(&archive[1024..1024 + pem.len()], pem.as_bytes());
        for header in [dir, file] {
            let stored = std::str::from_utf8(&header[148..154]).unwrap();
            let mut blank = header.to_vec();
            blank[148..156].copy_from_slice(b"        ");
            let sum: u32 = blank.iter().map(|b| u32::from(*b)).sum();
            assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        }
        assert!(archive[archive.len() - 1024..].iter().all(|b| *b == 0));
    }

    #[test]
    fn states_from_inspect() {
        let exited = |code, oom, error: &str| ContainerState {
            status: Some(ContainerStateStatusEnum::EXITED),
            exit_code: Some(code),
            oom_killed: Some(oom),
            error: Some(error.to_owned()),
            ..ContainerState::default()
        };
        assert_eq!(
            worker_state(&exited(137, true, "")),
            WorkerState::Exited { code: Some(137), reason: Some("out of memory (OOMKilled)".to_owned()) }
        );
        assert_eq!(worker_state(&exited(2, false, "")), WorkerState::Exited { code: Some(2), reason: None });
        let running =
            ContainerState { status: Some(ContainerStateStatusEnum::RUNNING), ..ContainerState::default() };
        assert_eq!(worker_state(&running), WorkerState::Running);
        assert_eq!(describe(&worker_state(&exited(2, false, ""))), "exited with code 2");
        assert_eq!(listed_exit_code("Exited (137) 5 seconds ago"), Some(137));
        assert_eq!(listed_exit_code("Up 3 seconds"), None);
    }

    #[test]
    fn limits_reach_the_host_config_and_bad_ones_are_refused() {
        let provider = DockerProvider::new(DockerConfig::default().socket("/nonexistent"));
        let agent = crate::AgentEnv::new("127.0.0.1:1", "127.0.0.1:2", "token", "pem");
        let mut spec = WorkerSpec::new("w-1", agent);
        spec.resources = crate::Resources::new(Some(500), Some(64 << 20));
        spec.provider_config.insert(NETWORK_MODE_KEY.to_owned(), "host".to_owned());
        let body = provider.container_body(&spec, "img").unwrap();
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!((host.memory, host.memory_swap), (Some(64 << 20), Some(64 << 20)));
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        let env = body.env.unwrap();
        assert!(env.contains(&"HODEI_CA_BUNDLE=/hodei/ca.pem".to_owned()));
        assert!(env.contains(&"HODEI_WORKER_ID=w-1".to_owned()));
        assert_eq!(body.labels.unwrap().get(WORKER_ID_LABEL).map(String::as_str), Some("w-1"));
        assert!(!provider.labels_for(&spec).contains_key(INSTANCE_LABEL), "no instance, no label");
        let scoped = DockerProvider::new(DockerConfig::default().instance("ci-7"));
        let labels = scoped.container_body(&spec, "img").unwrap().labels.unwrap();
        assert_eq!(labels.get(INSTANCE_LABEL).map(String::as_str), Some("ci-7"));

        spec.resources = crate::Resources::new(Some(0), None);
        assert!(matches!(provider.container_body(&spec, "img"), Err(ProviderError::InvalidSpec { .. })));
        spec.resources = crate::Resources::new(None, Some(u64::MAX));
        assert!(matches!(provider.container_body(&spec, "img"), Err(ProviderError::InvalidSpec { .. })));
    }
}
