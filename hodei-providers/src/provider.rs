//! The provider trait: what every kind of worker (local process, container, pod, microVM)
//! offers the control plane's scheduler.
//!
//! A provider only creates, observes, lists and destroys workers. It never talks to the agent:
//! the agent it starts dials the hub by itself (inside-out) with the [`AgentEnv`] it was given,
//! and the scheduler learns that it registered from the hub.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::Resources;

/// The label every worker Hodei manages carries, so that orphans can be found by it.
pub const MANAGED_BY_LABEL: &str = "hodei.dev/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "hodei";
/// The label with the worker's id.
pub const WORKER_ID_LABEL: &str = "hodei.dev/worker-id";
/// The label with the id of the saga the worker was provisioned for, when there is one.
pub const SAGA_ID_LABEL: &str = "hodei.dev/saga-id";

/// What the agent on a new worker needs to reach the hub: the only credential is the one-time
/// registration token. `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentEnv {
    /// The hub's registration listener, `IP:PORT`.
    pub registration_addr: String,
    /// The hub's mutual-TLS session listener, `IP:PORT`.
    pub session_addr: String,
    /// The one-time registration token, bound to the worker id.
    pub token: String,
    /// The hub's CA, PEM: the only CA the agent trusts.
    pub ca_bundle_pem: String,
}

impl AgentEnv {
    /// The agent's settings for these values.
    pub fn new(
        registration_addr: impl Into<String>,
        session_addr: impl Into<String>,
        token: impl Into<String>,
        ca_bundle_pem: impl Into<String>,
    ) -> Self {
        Self {
            registration_addr: registration_addr.into(),
            session_addr: session_addr.into(),
            token: token.into(),
            ca_bundle_pem: ca_bundle_pem.into(),
        }
    }

    /// The agent's environment variables for a worker with `worker_id`, except the CA bundle,
    /// which the agent reads from a file (`HODEI_CA_BUNDLE`) the provider places. The token
    /// is among them: providers put these in the worker's environment, never in its command
    /// line, which other users can read in `/proc`.
    pub fn variables(&self, worker_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("HODEI_REGISTRATION_ADDR", self.registration_addr.clone()),
            ("HODEI_SESSION_ADDR", self.session_addr.clone()),
            ("HODEI_WORKER_ID", worker_id.to_owned()),
            ("HODEI_TOKEN", self.token.clone()),
        ]
    }
}

impl fmt::Debug for AgentEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentEnv")
            .field("registration_addr", &self.registration_addr)
            .field("session_addr", &self.session_addr)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A worker to provision.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerSpec {
    /// The worker's id: its certificate, its labels and its registration token carry it.
    pub worker_id: String,
    /// The image (Docker, Kubernetes) or rootfs (Firecracker) to boot; the provider's default
    /// when `None`. The local provider ignores it.
    pub image: Option<String>,
    /// Limits for the worker's machine.
    pub resources: Resources,
    /// Labels to put on the worker, beside the managed-by and worker-id ones.
    pub labels: BTreeMap<String, String>,
    /// The saga the worker is for, when there is one (labelled, for reaping).
    pub saga_id: Option<String>,
    /// How the agent reaches the hub.
    pub agent: AgentEnv,
    /// Settings only one kind of provider understands (e.g. `network_mode` for Docker,
    /// `service_account` for Kubernetes); others ignore them.
    pub provider_config: BTreeMap<String, String>,
}

impl WorkerSpec {
    /// A spec for `worker_id` with the provider's defaults.
    pub fn new(worker_id: impl Into<String>, agent: AgentEnv) -> Self {
        Self {
            worker_id: worker_id.into(),
            image: None,
            resources: Resources::default(),
            labels: BTreeMap::new(),
            saga_id: None,
            agent,
            provider_config: BTreeMap::new(),
        }
    }

    /// Every label the worker carries: the spec's, then Hodei's own, which win.
    pub fn all_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
        labels.insert(WORKER_ID_LABEL.to_owned(), self.worker_id.clone());
        if let Some(saga) = &self.saga_id {
            labels.insert(SAGA_ID_LABEL.to_owned(), saga.clone());
        }
        labels
    }
}

/// Where a worker stands, as its provider sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Created, not running yet (pulling, scheduling, booting).
    Pending,
    /// Running.
    Running,
    /// Ended by itself or was killed.
    Exited {
        /// Its exit code, when the provider knows it.
        code: Option<i32>,
        /// What the provider says about the end (e.g. `OOMKilled`).
        reason: Option<String>,
    },
    /// The provider has no such worker (never made, or already removed).
    Gone,
}

/// One worker a provider manages, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker's id.
    pub worker_id: String,
    /// The provider's own handle for it (container id, pod name, pid, VM id).
    pub handle: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its state when listed.
    pub state: WorkerState,
}

impl WorkerInfo {
    /// A worker listing.
    pub fn new(
        worker_id: impl Into<String>,
        handle: impl Into<String>,
        labels: BTreeMap<String, String>,
        state: WorkerState,
    ) -> Self {
        Self { worker_id: worker_id.into(), handle: handle.into(), labels, state }
    }
}

/// What a provider can fail at. [`ProviderError::is_retryable`] tells an infrastructure
/// failure (worth another attempt) from a spec that can never work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The provider's API (Docker daemon, API server, Firecracker socket) cannot be reached.
    #[error("{provider}: cannot reach {endpoint}: {reason}")]
    Unreachable {
        /// The provider's name.
        provider: String,
        /// What was dialled.
        endpoint: String,
        /// Why it failed.
        reason: String,
    },
    /// The image or rootfs does not exist where the provider looks.
    #[error("{provider}: image `{image}` is missing; {hint}")]
    ImageMissing {
        /// The provider's name.
        provider: String,
        /// The image.
        image: String,
        /// How to get it (e.g. the command that builds it).
        hint: String,
    },
    /// The spec can never be provisioned (bad limits, unknown setting, rejected by the API).
    #[error("{provider}: invalid worker spec: {reason}")]
    InvalidSpec {
        /// The provider's name.
        provider: String,
        /// What is wrong.
        reason: String,
    },
    /// The worker stopped before its agent registered. Carries the worker's own output.
    #[error("{provider}: worker `{worker_id}` exited before registering ({status}); its output:\n{output}")]
    ExitedBeforeRegistering {
        /// The provider's name.
        provider: String,
        /// The worker.
        worker_id: String,
        /// How it ended, as the provider reports it.
        status: String,
        /// The last of its output.
        output: String,
    },
    /// The worker did not register within the deadline. Carries its own output.
    #[error("{provider}: worker `{worker_id}` did not register within {deadline:?}; its output:\n{output}")]
    RegistrationTimeout {
        /// The provider's name.
        provider: String,
        /// The worker.
        worker_id: String,
        /// The deadline it missed.
        deadline: Duration,
        /// The last of its output.
        output: String,
    },
    /// The provider has no worker with this id.
    #[error("{provider}: no worker `{worker_id}`")]
    NotFound {
        /// The provider's name.
        provider: String,
        /// The worker asked for.
        worker_id: String,
    },
    /// Any other failure of the infrastructure: worth another attempt.
    #[error("{provider}: {reason}")]
    Infrastructure {
        /// The provider's name.
        provider: String,
        /// What failed.
        reason: String,
    },
}

impl ProviderError {
    /// Whether provisioning again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. }
            | Self::ExitedBeforeRegistering { .. }
            | Self::RegistrationTimeout { .. }
            | Self::Infrastructure { .. } => true,
            Self::ImageMissing { .. } | Self::InvalidSpec { .. } | Self::NotFound { .. } => false,
        }
    }
}

/// How often [`Provider::exited`]'s default asks a provider without an exit event for a
/// worker's state.
pub const EXIT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Waits for a worker's end by asking `provider` for its state every [`EXIT_CHECK_INTERVAL`]:
/// [`Provider::exited`] for a provider without an exit event.
pub async fn poll_until_exited<P: Provider + ?Sized>(
    provider: &P,
    worker_id: &str,
) -> Result<WorkerState, ProviderError> {
    loop {
        match provider.state(worker_id).await? {
            state @ (WorkerState::Exited { .. } | WorkerState::Gone) => return Ok(state),
            _ => tokio::time::sleep(EXIT_CHECK_INTERVAL).await,
        }
    }
}

/// A kind of worker: local processes, containers, pods, microVMs.
///
/// Implementations must be idempotent where the scheduler relies on it: destroying a worker
/// that is already gone succeeds, and listing returns only workers labelled
/// [`MANAGED_BY_LABEL`] = [`MANAGED_BY_VALUE`].
#[async_trait::async_trait]
pub trait Provider: Send + Sync + fmt::Debug {
    /// The provider's name, which jobs use as a hint (`docker`, `local`, ...).
    fn name(&self) -> &str;

    /// Labels every worker of this provider offers to jobs (e.g. `os=linux`); a job's labels
    /// must all be among these for the scheduler to pick this provider.
    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// Creates and starts a worker whose agent will dial the hub with `spec.agent`. Returns once
    /// the worker is started, not once it has registered.
    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError>;

    /// The worker's current state.
    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError>;

    /// Resolves once the worker has ended, with its state then ([`WorkerState::Exited`] or
    /// [`WorkerState::Gone`]). The scheduler waits on it while a worker registers, to fail at
    /// once on a worker that died. Providers with an exit event (a child process's exit,
    /// Docker's wait API) override it; this default asks [`state`](Self::state) every
    /// [`EXIT_CHECK_INTERVAL`].
    async fn exited(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        poll_until_exited(self, worker_id).await
    }

    /// The last of the worker's own output (the agent's stderr), for error messages.
    async fn output(&self, worker_id: &str) -> Result<String, ProviderError>;

    /// Stops and removes the worker. A worker that is already gone is not an error.
    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError>;

    /// Every worker this provider manages (labelled as Hodei's), so that orphans can be reaped.
    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError>;

    /// Why a job on the worker ended, when the worker knows better than the job's result (a
    /// SIGKILL that was the OOM killer's, say). `None` when the result says all there is, which
    /// is what providers that know nothing more return.
    async fn job_end_reason(
        &self,
        worker_id: &str,
        result: &hodei_agent::protocol::v1::JobResult,
    ) -> Result<Option<String>, ProviderError> {
        let _ = (worker_id, result);
        Ok(None)
    }
}
