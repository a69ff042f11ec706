//! Workers as Kubernetes pods, through the API server (kube, k8s-openapi).
//!
//! Each worker is one Pod, `hodei-<worker id>`, with `restartPolicy: Never`, in the configured
//! namespace. A bare Pod rather than a Job with `backoffLimit: 0`: the scheduler already owns
//! retries (it provisions a new worker, with a new token, when one fails), and a Job controller
//! would be a second owner of the same lifecycle, one more object to create, watch and garbage
//! collect, and its own latency between the Job and the Pod it makes. With `Never`, a container
//! that ends is final, which is exactly what a one-time registration token wants.
//!
//! The agent's settings are the container's environment ([`AgentEnv::variables`]): the one-time
//! registration token is the only credential in the pod spec, no Secret is referenced, and the
//! service account token is not mounted unless the configuration asks for it. The hub's CA
//! bundle is public data but the agent reads it from a file (`HODEI_CA_BUNDLE`), and the agent
//! image is `FROM scratch`, so no init step can write it: it goes into a ConfigMap per worker,
//! `hodei-<worker id>-ca`, created just before the Pod, labelled the same, mounted read-only
//! and deleted with the Pod. A ConfigMap rather than a Secret because nothing in it is secret,
//! and granting the control plane `create secrets` would be far broader than it needs.
//!
//! Whoever may read pods in the namespace may read a token before its agent has used it: the
//! token is one-time and bound to its worker id, but a namespace of Hodei's own, where only the
//! control plane reads pods, keeps even that window closed. The control plane's account needs
//! `create`, `get`, `list`, `watch` and `delete` on `pods`, `get` on `pods/log`, and `create`,
//! `list` and `delete` on `configmaps` in that namespace, nothing else.
//!
//! A pod the scheduler finds no node for fails at once ([`ProviderError::Infrastructure`], which
//! is retryable, with the scheduler's message), unless
//! [`KubernetesConfig::wait_while_unschedulable()`] is set for clusters whose autoscaler adds
//! nodes for pending pods.
//!
//! Everything is found again by name (derived from the worker id) or by label
//! ([`MANAGED_BY_LABEL`]), so no state is kept in this process and orphans are found after a
//! restart. Label values must be at most 63 characters of `[A-Za-z0-9._-]`: a value that is not
//! is replaced by a sanitized one with a hash of the original, and the original is kept in an
//! annotation of the same key, which [`Provider::list`] reports.
//!
//! The provider never polls: it follows the pod with a watch from the resource version its own
//! request returned, so no event between the request and the watch is missed, and re-watches
//! from the last version seen when the API server ends the stream.
//!
//! [`AgentEnv::variables`]: crate::AgentEnv::variables

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerState, EmptyDirVolumeSource, EnvVar, KeyToPath,
    Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, PostParams, PropagationPolicy, WatchEvent, WatchParams,
};
use tokio::time::Instant;

/// k8s-openapi, whose types the configuration takes (e.g. [`Toleration`]).
pub use k8s_openapi;
/// kube, whose [`kube::Client`] the provider is built on.
pub use kube;

use crate::provider::{
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, Provider, ProviderError, WORKER_ID_LABEL, WorkerInfo, WorkerSpec,
    WorkerState,
};

/// The provider's name, which jobs use as a hint.
pub const NAME: &str = "kubernetes";
/// The image used when neither the spec nor the configuration names one.
pub const DEFAULT_IMAGE: &str = "hodei-agent:latest";
/// The name of the agent's container in each pod.
pub const AGENT_CONTAINER: &str = "agent";
/// The prefix of every worker pod's name.
pub const POD_PREFIX: &str = "hodei-";
/// The suffix of every worker's CA ConfigMap name, after its pod's name.
pub const CONFIG_MAP_SUFFIX: &str = "-ca";
/// The key of the CA bundle in the ConfigMap.
pub const CA_BUNDLE_KEY: &str = "ca.pem";
/// Where the ConfigMap is mounted.
pub const CA_DIR: &str = "/hodei/ca";
/// The CA bundle's path inside the container.
pub const CA_BUNDLE_PATH: &str = "/hodei/ca/ca.pem";
/// The agent's directory, an `emptyDir`; its work directory (key and certificate) is below.
pub const AGENT_DIR: &str = "/hodei/agent";
/// The agent's work directory inside the container, which the agent creates 0700.
pub const WORK_DIR_PATH: &str = "/hodei/agent/work";

/// `provider_config` key: the service account of one worker's pod.
pub const SERVICE_ACCOUNT_KEY: &str = "service_account";
/// `provider_config` key: node selector entries added for one worker, `key=value,key=value`.
pub const NODE_SELECTOR_KEY: &str = "node_selector";
/// `provider_config` key: tolerations added for one worker, a JSON array of Kubernetes
/// `Toleration` objects.
pub const TOLERATIONS_KEY: &str = "tolerations";
/// `provider_config` key: the pod's active deadline for one worker, in seconds.
pub const ACTIVE_DEADLINE_KEY: &str = "active_deadline_seconds";

/// The longest watch the API server is asked for; it ends streams on its own after a while
/// anyway, and the provider re-watches from the last version seen.
const MAX_WATCH_SECONDS: u32 = 290;
/// The longest label value, and the longest DNS-1123 label (our object names).
const MAX_LABEL: usize = 63;
/// A sanitized name or value ends with `-` and eight hex digits of the original's hash.
const HASH_SUFFIX_LEN: usize = 9;

/// How the provider places workers. `KubernetesConfig::default()` uses the client's default
/// namespace and starts [`DEFAULT_IMAGE`] with no node selector, toleration or service account.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KubernetesConfig {
    /// The namespace of every worker; the client's default namespace when `None`.
    pub namespace: Option<String>,
    /// The image for specs that name none.
    pub image: String,
    /// The image pull policy (`Always`, `IfNotPresent`, `Never`); Kubernetes' default when
    /// `None` (`Always` for `:latest`, else `IfNotPresent`).
    pub image_pull_policy: Option<String>,
    /// Labels every worker offers to jobs ([`Provider::labels`]).
    pub labels: BTreeMap<String, String>,
    /// The node selector of every pod; a spec's [`NODE_SELECTOR_KEY`] adds to it.
    pub node_selector: BTreeMap<String, String>,
    /// The tolerations of every pod; a spec's [`TOLERATIONS_KEY`] adds to them.
    pub tolerations: Vec<Toleration>,
    /// The service account of every pod, unless a spec's [`SERVICE_ACCOUNT_KEY`] names one.
    pub service_account: Option<String>,
    /// Whether the service account's API token is mounted into the pod. Off by default, so
    /// the registration token stays the only credential a worker holds; turn it on only for
    /// jobs that must talk to the cluster.
    pub automount_service_account_token: bool,
    /// The pod's `activeDeadlineSeconds`: the kubelet kills a worker that outlives it, even if
    /// the control plane is gone. A spec's [`ACTIVE_DEADLINE_KEY`] overrides it.
    pub active_deadline: Option<Duration>,
    /// How long a pod may take to be scheduled, pull its image and start its container.
    pub start_timeout: Duration,
    /// Whether a pod the scheduler finds no node for is waited on (until
    /// [`KubernetesConfig::start_timeout()`]) rather than failed at once: for clusters whose
    /// autoscaler adds nodes for pending pods.
    pub wait_while_unschedulable: bool,
    /// The grace period a destroyed pod's agent gets between SIGTERM and SIGKILL.
    pub grace_period: Duration,
    /// How long [`Provider::destroy`] waits for the pod to be gone, beyond the grace period.
    pub destroy_timeout: Duration,
    /// How many lines of a pod's output [`Provider::output`] returns.
    pub log_tail_lines: i64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: None,
            labels: [("os".to_owned(), "linux".to_owned())].into(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            service_account: None,
            automount_service_account_token: false,
            active_deadline: Some(Duration::from_secs(24 * 60 * 60)),
            start_timeout: Duration::from_secs(300),
            wait_while_unschedulable: false,
            grace_period: Duration::from_secs(10),
            destroy_timeout: Duration::from_secs(60),
            log_tail_lines: 100,
        }
    }
}

impl KubernetesConfig {
    /// Places workers in this namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Starts this image for specs that name none.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = image.into();
        self
    }

    /// Pulls images with this policy (`Always`, `IfNotPresent`, `Never`).
    pub fn image_pull_policy(mut self, policy: impl Into<String>) -> Self {
        self.image_pull_policy = Some(policy.into());
        self
    }

    /// Offers this label to jobs.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }

    /// Schedules every pod only on nodes with this label.
    pub fn node_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node_selector.insert(key.into(), value.into());
        self
    }

    /// Lets every pod run on nodes with a matching taint.
    pub fn toleration(mut self, toleration: Toleration) -> Self {
        self.tolerations.push(toleration);
        self
    }

    /// Runs every pod as this service account.
    pub fn service_account(mut self, name: impl Into<String>) -> Self {
        self.service_account = Some(name.into());
        self
    }

    /// Mounts the service account's API token into the pods.
    pub fn automount_service_account_token(mut self, mount: bool) -> Self {
        self.automount_service_account_token = mount;
        self
    }

    /// Has the kubelet kill pods older than this; `None` for no deadline.
    pub fn active_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.active_deadline = deadline;
        self
    }

    /// Gives a pod this long to start.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Waits for unschedulable pods (until the start timeout) instead of failing them at once.
    pub fn wait_while_unschedulable(mut self, wait: bool) -> Self {
        self.wait_while_unschedulable = wait;
        self
    }

    /// Gives a destroyed pod's agent this long to stop.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = grace;
        self
    }
}

/// The name of the pod of `worker_id`: `hodei-<worker id>` when the id is a valid DNS label,
/// else a sanitized form with a hash of the id, so that distinct ids never share a pod.
pub fn pod_name(worker_id: &str) -> String {
    let stem_room = MAX_LABEL - POD_PREFIX.len() - CONFIG_MAP_SUFFIX.len();
    format!("{POD_PREFIX}{}", dns_label(worker_id, stem_room))
}

/// The name of the CA ConfigMap of `worker_id`.
pub fn config_map_name(worker_id: &str) -> String {
    format!("{}{CONFIG_MAP_SUFFIX}", pod_name(worker_id))
}

/// `value` if it is a valid label value, else a valid one made of its allowed characters and a
/// hash of it.
pub fn label_value(value: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if is_label_value(value) {
        return value.to_owned();
    }
    let cleaned: String = value.chars().map(|c| if allowed(c) { c } else { '-' }).collect();
    with_hash(&cleaned, value, MAX_LABEL, |c| c.is_ascii_alphanumeric())
}

fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_label_name(value)
}

/// A label key's name part, or a non-empty label value: at most 63 of `[A-Za-z0-9._-]`, starting
/// and ending alphanumeric.
fn is_label_name(text: &str) -> bool {
    text.len() <= MAX_LABEL
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name.
fn is_label_key(key: &str) -> bool {
    match key.rsplit_once('/') {
        None => is_label_name(key),
        Some((prefix, name)) => {
            is_label_name(name)
                && prefix.len() <= 253
                && prefix.split('.').all(|part| is_dns_label(part, MAX_LABEL))
        }
    }
}

fn is_dns_label(text: &str, max: usize) -> bool {
    text.len() <= max
        && text.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && text.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `text` if it is a DNS label of at most `max` characters, else a sanitized one with a hash.
fn dns_label(text: &str, max: usize) -> String {
    if is_dns_label(text, max) {
        return text.to_owned();
    }
    let cleaned: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    with_hash(&cleaned, text, max, |c| c.is_ascii_alphanumeric())
}

/// `cleaned`, cut to leave room for the hash and trimmed to start and end with a character
/// `edge` accepts, then `-` and the hash of `original`.
fn with_hash(cleaned: &str, original: &str, max: usize, edge: impl Fn(char) -> bool + Copy) -> String {
    let hash = format!("{:08x}", fnv1a(original));
    let cut: String = cleaned.chars().take(max - HASH_SUFFIX_LEN).collect();
    let trimmed = cut.trim_matches(|c: char| !edge(c));
    if trimmed.is_empty() { hash } else { format!("{trimmed}-{hash}") }
}

/// 32-bit FNV-1a: stable across Rust releases and platforms, unlike `DefaultHasher`, which
/// matters because names derived from it must be found again by another process.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

/// Workers as Kubernetes pods. See the [module docs](self).
#[derive(Clone)]
pub struct KubernetesProvider {
    config: KubernetesConfig,
    client: kube::Client,
    namespace: String,
}

impl fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("namespace", &self.namespace)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type StringMap = BTreeMap<String, String>;

/// What following a pod with a watch came to.
enum Followed<T> {
    /// The decision taken on one of the pod's versions.
    Decided(T),
    /// The pod was deleted, or never existed.
    Gone,
    /// The deadline passed; the last version seen.
    TimedOut(Box<Pod>),
}

/// Why a pod did not start.
enum StartFailure {
    /// Refused before a pod existed, and what this attempt made is already removed. A refused
    /// ConfigMap is not deleted: a conflict means it is another worker's with the same id.
    Refused(ProviderError),
    /// An error that says it all; the pod exists and must be removed.
    Error(ProviderError),
    /// The agent's container ended (or never ran): its output belongs in the error.
    Exited(String),
}

impl KubernetesProvider {
    /// A provider on this client (e.g. `kube::Client::try_default()`, or a mock in tests).
    pub fn new(client: kube::Client, config: KubernetesConfig) -> Self {
        let namespace = config.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
        Self { config, client, namespace }
    }

    /// A provider on the client of the local kubeconfig, or of the pod's service account when
    /// running in a cluster: [`ProviderError::Unreachable`] when there is neither.
    pub async fn connect(config: KubernetesConfig) -> Result<Self, ProviderError> {
        let client = kube::Client::try_default().await.map_err(|e| ProviderError::Unreachable {
            provider: NAME.to_owned(),
            endpoint: "the API server of the kubeconfig or in-cluster environment".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self::new(client, config))
    }

    /// Its configuration.
    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// The namespace its workers live in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The kube client, for callers that need more of the API than the provider offers.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The worker's CA ConfigMap and Pod for `spec`, or why the spec cannot be one.
    pub fn objects(&self, spec: &WorkerSpec) -> Result<(ConfigMap, Pod), ProviderError> {
        let (labels, annotations) = self.metadata_maps(spec)?;
        let pod_name = pod_name(&spec.worker_id);
        let config_map_name = config_map_name(&spec.worker_id);
        let metadata = |name: &str| ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        };
        let config_map = ConfigMap {
            metadata: metadata(&config_map_name),
            data: Some([(CA_BUNDLE_KEY.to_owned(), spec.agent.ca_bundle_pem.clone())].into()),
            immutable: Some(true),
            ..ConfigMap::default()
        };

        let mut env: Vec<EnvVar> = spec
            .agent
            .variables(&spec.worker_id)
            .into_iter()
            .map(|(name, value)| env_var(name, value))
            .collect();
        env.push(env_var("HODEI_CA_BUNDLE", CA_BUNDLE_PATH.to_owned()));
        env.push(env_var("HODEI_WORK_DIR", WORK_DIR_PATH.to_owned()));

        let image = spec.image.clone().unwrap_or_else(|| self.config.image.clone());
        let container = Container {
            name: AGENT_CONTAINER.to_owned(),
            image: Some(image),
            image_pull_policy: self.config.image_pull_policy.clone(),
            env: Some(env),
            resources: self.resources(spec)?,
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "ca".to_owned(),
                    mount_path: CA_DIR.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "agent".to_owned(),
                    mount_path: AGENT_DIR.to_owned(),
                    ..VolumeMount::default()
                },
            ]),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                ..SecurityContext::default()
            }),
            ..Container::default()
        };

        let mut node_selector = self.config.node_selector.clone();
        let mut tolerations = self.config.tolerations.clone();
        let mut service_account = self.config.service_account.clone();
        let mut active_deadline = self.config.active_deadline.map(|d| d.as_secs().max(1));
        if let Some(entries) = spec.provider_config.get(NODE_SELECTOR_KEY) {
            node_selector.extend(self.parse_node_selector(entries)?);
        }
        for (key, value) in &node_selector {
            if !is_label_key(key) || !is_label_value(value) {
                return Err(self.invalid(format!("node selector `{key}={value}` is not a valid label")));
            }
        }
        if let Some(json) = spec.provider_config.get(TOLERATIONS_KEY) {
            let extra: Vec<Toleration> = serde_json::from_str(json).map_err(|e| {
                self.invalid(format!("`{TOLERATIONS_KEY}` is not a JSON array of tolerations: {e}"))
            })?;
            tolerations.extend(extra);
        }
        if let Some(account) = spec.provider_config.get(SERVICE_ACCOUNT_KEY) {
            if !account.split('.').all(|part| is_dns_label(part, MAX_LABEL)) {
                return Err(self.invalid(format!("service account `{account}` is not a valid name")));
            }
            service_account = Some(account.clone());
        }
        if let Some(seconds) = spec.provider_config.get(ACTIVE_DEADLINE_KEY) {
            match seconds.parse::<u64>() {
                Ok(seconds) if seconds > 0 => active_deadline = Some(seconds),
                _ => {
                    return Err(self.invalid(format!(
                        "`{ACTIVE_DEADLINE_KEY}` must be a positive number of seconds, not `{seconds}`"
                    )));
                }
            }
        }
        let active_deadline_seconds = active_deadline
            .map(|seconds| {
                i64::try_from(seconds).map_err(|_| self.invalid(format!("an active deadline of {seconds}s")))
            })
            .transpose()?;

        let pod = Pod {
            metadata: metadata(&pod_name),
            spec: Some(PodSpec {
                containers: vec![container],
                restart_policy: Some("Never".to_owned()),
                active_deadline_seconds,
                node_selector: (!node_selector.is_empty()).then_some(node_selector),
                tolerations: (!tolerations.is_empty()).then_some(tolerations),
                service_account_name: service_account,
                automount_service_account_token: Some(self.config.automount_service_account_token),
                // Service links would put every service of the namespace into the agent's
                // environment, which jobs inherit nothing from anyway.
                enable_service_links: Some(false),
                termination_grace_period_seconds: Some(
                    i64::try_from(self.config.grace_period.as_secs()).unwrap_or(i64::MAX),
                ),
                security_context: Some(PodSecurityContext {
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".to_owned(),
                        ..SeccompProfile::default()
                    }),
                    ..PodSecurityContext::default()
                }),
                volumes: Some(vec![
                    Volume {
                        name: "ca".to_owned(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: config_map_name,
                            items: Some(vec![KeyToPath {
                                key: CA_BUNDLE_KEY.to_owned(),
                                path: CA_BUNDLE_KEY.to_owned(),
                                mode: Some(0o444),
                            }]),
                            ..ConfigMapVolumeSource::default()
                        }),
                        ..Volume::default()
                    },
                    Volume {
                        name: "agent".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    },
                ]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        Ok((config_map, pod))
    }

    /// The objects' labels, made valid, and the annotations that keep the values that were not.
    fn metadata_maps(&self, spec: &WorkerSpec) -> Result<(StringMap, StringMap), ProviderError> {
        let mut labels = BTreeMap::new();
        let mut annotations = BTreeMap::new();
        for (key, value) in spec.all_labels() {
            if !is_label_key(&key) {
                return Err(self.invalid(format!("label key `{key}` is not a valid Kubernetes label key")));
            }
            let valid = label_value(&value);
            if valid != value {
                annotations.insert(key.clone(), value);
            }
            labels.insert(key, valid);
        }
        // The worker id is always annotated, so that listings read it without unhashing.
        annotations.insert(WORKER_ID_LABEL.to_owned(), spec.worker_id.clone());
        Ok((labels, annotations))
    }

    /// Requests equal to limits: the scheduler places the pod where the whole limit fits, and
    /// the pod gets the Guaranteed class, the last to be evicted.
    fn resources(&self, spec: &WorkerSpec) -> Result<Option<ResourceRequirements>, ProviderError> {
        let mut amounts = BTreeMap::new();
        match spec.resources.cpu_millis {
            None => {}
            Some(0) => return Err(self.invalid("a cpu limit of 0 millicores")),
            Some(millis) => {
                amounts.insert("cpu".to_owned(), Quantity(format!("{millis}m")));
            }
        }
        match spec.resources.memory_bytes {
            None => {}
            Some(0) => return Err(self.invalid("a memory limit of 0 bytes")),
            Some(bytes) => {
                amounts.insert("memory".to_owned(), Quantity(bytes.to_string()));
            }
        }
        Ok((!amounts.is_empty()).then(|| ResourceRequirements {
            limits: Some(amounts.clone()),
            requests: Some(amounts),
            ..ResourceRequirements::default()
        }))
    }

    fn parse_node_selector(&self, entries: &str) -> Result<BTreeMap<String, String>, ProviderError> {
        entries
            .split(',')
            .filter(|entry| !entry.trim().is_empty())
            .map(|entry| match entry.split_once('=') {
                Some((key, value)) => Ok((key.trim().to_owned(), value.trim().to_owned())),
                None => Err(self.invalid(format!("`{NODE_SELECTOR_KEY}` entry `{entry}` is not key=value"))),
            })
            .collect()
    }

    fn invalid(&self, reason: impl Into<String>) -> ProviderError {
        ProviderError::InvalidSpec { provider: NAME.to_owned(), reason: reason.into() }
    }

    /// The typed error for a failed API call: the API server's reason, code and message are kept.
    fn classify(&self, action: &str, error: kube::Error) -> ProviderError {
        match error {
            kube::Error::Api(status) => {
                let said = format!("{action}: {} ({}): {}", status.reason, status.code, status.message);
                match status.code {
                    // Rejected as asked: invalid objects, a missing namespace, missing RBAC
                    // rights. Asking again changes nothing.
                    400 | 401 | 403 | 404 | 409 | 422 => self.invalid(said),
                    _ => ProviderError::Infrastructure { provider: NAME.to_owned(), reason: said },
                }
            }
            kube::Error::HyperError(e) => self.unreachable(action, e.to_string()),
            kube::Error::Service(e) => self.unreachable(action, e.to_string()),
            other => ProviderError::Infrastructure {
                provider: NAME.to_owned(),
                reason: format!("{action}: {other}"),
            },
        }
    }

    fn unreachable(&self, action: &str, reason: String) -> ProviderError {
        ProviderError::Unreachable {
            provider: NAME.to_owned(),
            endpoint: "the Kubernetes API server".to_owned(),
            reason: format!("{action}: {reason}"),
        }
    }

    /// Follows the pod `name` from `start` (a version the API server returned) until `decide`
    /// returns a decision on one of its versions, the pod is gone, or `deadline` passes.
    async fn follow<T>(
        &self,
        name: &str,
        start: Pod,
        deadline: Instant,
        mut decide: impl FnMut(&Pod) -> Option<T>,
    ) -> Result<Followed<T>, ProviderError> {
        if let Some(decision) = decide(&start) {
            return Ok(Followed::Decided(decision));
        }
        let pods = self.pods();
        let selector = format!("metadata.name={name}");
        let mut version = start.metadata.resource_version.clone().unwrap_or_else(|| "0".to_owned());
        let mut last = start;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(Followed::TimedOut(Box::new(last)));
            }
            let seconds = u32::try_from(remaining.as_secs()).unwrap_or(u32::MAX).clamp(1, MAX_WATCH_SECONDS);
            let params = WatchParams::default().fields(&selector).timeout(seconds);
            // The version is too old to watch from (410 Gone, as the request's status or as an
            // event): the pod is read as it is now, then watched from there.
            let mut expired = false;
            let watched = tokio::time::timeout(remaining, async {
                let mut events = match pods.watch(&params, &version).await {
                    Ok(events) => Box::pin(events),
                    Err(kube::Error::Api(status)) if status.code == 410 => {
                        expired = true;
                        return Ok(None);
                    }
                    Err(e) => return Err(self.classify("watching the pod", e)),
                };
                while let Some(event) =
                    events.try_next().await.map_err(|e| self.classify("watching the pod", e))?
                {
                    match event {
                        WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                            if let Some(seen) = &pod.metadata.resource_version {
                                version.clone_from(seen);
                            }
                            if let Some(decision) = decide(&pod) {
                                return Ok(Some(Followed::Decided(decision)));
                            }
                            last = pod;
                        }
                        WatchEvent::Deleted(_) => return Ok(Some(Followed::Gone)),
                        WatchEvent::Bookmark(bookmark) => version = bookmark.metadata.resource_version,
                        WatchEvent::Error(status) if status.code == 410 => {
                            expired = true;
                            return Ok(None);
                        }
                        WatchEvent::Error(status) => {
                            return Err(self.classify("watching the pod", kube::Error::Api(status)));
                        }
                    }
                }
                // The API server ended the stream (its timeout): watch again from where it was.
                Ok::<_, ProviderError>(None)
            })
            .await;
            match watched {
                Ok(Ok(Some(followed))) => return Ok(followed),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(Followed::TimedOut(Box::new(last))),
            }
            if expired {
                let Some(pod) = pods.get_opt(name).await.map_err(|e| self.classify("reading the pod", e))?
                else {
                    return Ok(Followed::Gone);
                };
                version = pod.metadata.resource_version.clone().unwrap_or_default();
                if let Some(decision) = decide(&pod) {
                    return Ok(Followed::Decided(decision));
                }
                last = pod;
            }
        }
    }

    /// Creates the ConfigMap and the Pod and follows the pod until its agent's container runs.
    async fn start(&self, spec: &WorkerSpec, config_map: ConfigMap, pod: Pod) -> Result<Pod, StartFailure> {
        let name = pod_name(&spec.worker_id);
        let deadline = Instant::now() + self.config.start_timeout;
        let params = PostParams::default();
        self.config_maps()
            .create(&params, &config_map)
            .await
            .map_err(|e| StartFailure::Refused(self.classify("creating the CA ConfigMap", e)))?;
        let created = match self.pods().create(&params, &pod).await {
            Ok(created) => created,
            Err(e) => {
                let error = self.classify("creating the pod", e);
                if let Err(e) = self.delete_config_map(&spec.worker_id).await {
                    tracing::warn!(worker = %spec.worker_id, error = %e, "could not remove the CA ConfigMap");
                }
                return Err(StartFailure::Refused(error));
            }
        };
        let tolerate_unschedulable = self.config.wait_while_unschedulable;
        let verdict = |pod: &Pod| start_verdict(pod, tolerate_unschedulable);
        match self.follow(&name, created, deadline, verdict).await.map_err(StartFailure::Error)? {
            Followed::Decided(Ok(pod)) => Ok(pod),
            Followed::Decided(Err(failure)) => Err(failure),
            Followed::Gone => Err(StartFailure::Exited("deleted before its agent started".to_owned())),
            Followed::TimedOut(last) => Err(StartFailure::Error(ProviderError::Infrastructure {
                provider: NAME.to_owned(),
                reason: format!(
                    "pod `{name}` did not start within {:?}; last seen: {}",
                    self.config.start_timeout,
                    describe_pending(&last)
                ),
            })),
        }
    }

    /// Removes what a failed start left, saying so in the logs if that fails too: the start's
    /// error is the one the caller needs, and [`Provider::list`] finds the rest later.
    async fn discard(&self, worker_id: &str) {
        if let Err(e) = self.destroy(worker_id).await {
            tracing::warn!(worker = %worker_id, error = %e, "could not remove a worker that failed to start");
        }
    }

    async fn delete_config_map(&self, worker_id: &str) -> Result<(), ProviderError> {
        match self.config_maps().delete(&config_map_name(worker_id), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(self.classify("deleting the CA ConfigMap", e)),
        }
    }
}

/// Whether the pod has started (`Some(Ok)`), can never start (`Some(Err)`), or may still.
fn start_verdict(pod: &Pod, tolerate_unschedulable: bool) -> Option<Result<Pod, StartFailure>> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.as_ref()?;
    let agent = status.container_statuses.iter().flatten().find(|c| c.name == AGENT_CONTAINER);
    let image = agent.map(|c| c.image.clone()).filter(|image| !image.is_empty()).unwrap_or_else(|| {
        pod.spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default()
    });
    if let Some(state) = agent.and_then(|c| c.state.as_ref()) {
        if state.running.is_some() {
            return Some(Ok(pod.clone()));
        }
        if let Some(terminated) = &state.terminated {
            return Some(Err(StartFailure::Exited(describe_terminated(
                terminated.exit_code,
                terminated.reason.as_deref(),
                terminated.message.as_deref(),
            ))));
        }
        if let Some(waiting) = &state.waiting {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            let said = match waiting.message.as_deref() {
                Some(message) if !message.is_empty() => format!("{reason}: {message}"),
                _ => reason.to_owned(),
            };
            match reason {
                "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull" => {
                    return Some(Err(StartFailure::Error(ProviderError::ImageMissing {
                        provider: NAME.to_owned(),
                        image,
                        hint: format!(
                            "Kubernetes said {said}; build it with `docker/build-agent-image.sh` and push \
                             it to a registry the cluster's nodes pull from"
                        ),
                    })));
                }
                "InvalidImageName" | "CreateContainerConfigError" | "CreateContainerError" => {
                    return Some(Err(StartFailure::Error(ProviderError::InvalidSpec {
                        provider: NAME.to_owned(),
                        reason: format!("pod `{name}`: {said}"),
                    })));
                }
                "CrashLoopBackOff" | "RunContainerError" => {
                    let last = agent.and_then(|c| c.last_state.as_ref()).and_then(|s| s.terminated.as_ref());
                    let ended = last.map_or_else(String::new, |t| {
                        format!("; last {}", describe_terminated(t.exit_code, t.reason.as_deref(), None))
                    });
                    return Some(Err(StartFailure::Exited(format!("{said}{ended}"))));
                }
                _ => {}
            }
        }
    }
    match status.phase.as_deref() {
        Some("Running") if agent.is_none() => return Some(Ok(pod.clone())),
        Some("Failed" | "Succeeded") => {
            let reason = status.reason.as_deref().unwrap_or("Failed");
            let said = match status.message.as_deref() {
                Some(message) if !message.is_empty() => format!("{reason}: {message}"),
                _ => reason.to_owned(),
            };
            return Some(Err(StartFailure::Exited(format!("pod {said}"))));
        }
        _ => {}
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(condition) = unschedulable.filter(|_| !tolerate_unschedulable) {
        return Some(Err(StartFailure::Error(ProviderError::Infrastructure {
            provider: NAME.to_owned(),
            reason: format!(
                "pod `{name}` is Unschedulable: {}",
                condition.message.as_deref().unwrap_or("the scheduler gave no message")
            ),
        })));
    }
    None
}

fn describe_terminated(code: i32, reason: Option<&str>, message: Option<&str>) -> String {
    let mut text = format!("exited with code {code}");
    if let Some(reason) = reason.filter(|r| !r.is_empty()) {
        text.push_str(&format!(" ({reason})"));
    }
    if let Some(message) = message.filter(|m| !m.is_empty()) {
        text.push_str(&format!(": {message}"));
    }
    text
}

/// Where a pod that has not started stands, for the start timeout's message.
fn describe_pending(pod: &Pod) -> String {
    let Some(status) = &pod.status else { return "no status yet".to_owned() };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
    let condition = status.conditions.iter().flatten().find(|c| c.status == "False").map(|c| {
        format!(
            "{} is False ({}: {})",
            c.type_,
            c.reason.as_deref().unwrap_or_default(),
            c.message.as_deref().unwrap_or_default()
        )
    });
    [Some(phase.to_owned()), waiting, condition].into_iter().flatten().collect::<Vec<_>>().join(", ")
}

fn env_var(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value), ..EnvVar::default() }
}

/// The worker state for a pod as the API server reports it.
pub fn pod_state(pod: &Pod) -> WorkerState {
    let Some(status) = &pod.status else { return WorkerState::Pending };
    let agent_state = || -> Option<&ContainerState> {
        status.container_statuses.iter().flatten().find(|c| c.name == AGENT_CONTAINER)?.state.as_ref()
    };
    match status.phase.as_deref() {
        Some("Running") => WorkerState::Running,
        Some("Succeeded" | "Failed") => {
            let terminated = agent_state().and_then(|state| state.terminated.as_ref());
            // The container's own reason (`OOMKilled`, `Error`) says more than the pod's
            // (`DeadlineExceeded`, `Evicted`), which is there when the container has none.
            let reason = terminated
                .and_then(|t| t.reason.clone())
                .or_else(|| status.reason.clone())
                .filter(|reason| !reason.is_empty());
            WorkerState::Exited { code: terminated.map(|t| t.exit_code), reason }
        }
        // The node stopped reporting: nothing this provider can say about the agent.
        Some("Unknown") => WorkerState::Exited {
            code: None,
            reason: Some(
                status.reason.clone().unwrap_or_else(|| "Unknown: the node stopped reporting".to_owned()),
            ),
        },
        _ => WorkerState::Pending,
    }
}

/// The labels Hodei set, with the originals of values that were sanitized.
fn original_labels(meta: &ObjectMeta) -> BTreeMap<String, String> {
    let annotations = meta.annotations.clone().unwrap_or_default();
    let mut labels = meta.labels.clone().unwrap_or_default();
    for (key, value) in labels.iter_mut() {
        if let Some(original) = annotations.get(key) {
            value.clone_from(original);
        }
    }
    labels
}

#[async_trait::async_trait]
impl Provider for KubernetesProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.config.labels.clone()
    }

    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        let (config_map, pod) = self.objects(spec)?;
        let labels = spec.all_labels();
        match self.start(spec, config_map, pod).await {
            Ok(pod) => {
                let name = pod.metadata.name.unwrap_or_else(|| pod_name(&spec.worker_id));
                Ok(WorkerInfo::new(&spec.worker_id, name, labels, WorkerState::Running))
            }
            Err(StartFailure::Refused(error)) => Err(error),
            Err(StartFailure::Error(error)) => {
                self.discard(&spec.worker_id).await;
                Err(error)
            }
            Err(StartFailure::Exited(status)) => {
                let output = self
                    .output(&spec.worker_id)
                    .await
                    .unwrap_or_else(|e| format!("<output unavailable: {e}>"));
                self.discard(&spec.worker_id).await;
                Err(ProviderError::ExitedBeforeRegistering {
                    provider: NAME.to_owned(),
                    worker_id: spec.worker_id.clone(),
                    status,
                    output,
                })
            }
        }
    }

    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        match self.pods().get_opt(&pod_name(worker_id)).await {
            Ok(None) => Ok(WorkerState::Gone),
            Ok(Some(pod)) => Ok(pod_state(&pod)),
            Err(e) => Err(self.classify("reading the pod", e)),
        }
    }

    async fn output(&self, worker_id: &str) -> Result<String, ProviderError> {
        let params = LogParams {
            container: Some(AGENT_CONTAINER.to_owned()),
            tail_lines: Some(self.config.log_tail_lines),
            ..LogParams::default()
        };
        match self.pods().logs(&pod_name(worker_id), &params).await {
            Ok(text) => Ok(text),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                Err(ProviderError::NotFound { provider: NAME.to_owned(), worker_id: worker_id.to_owned() })
            }
            // The container has not started: it has printed nothing yet.
            Err(kube::Error::Api(status)) if status.code == 400 => Ok(String::new()),
            Err(e) => Err(self.classify("reading the pod's output", e)),
        }
    }

    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        let name = pod_name(worker_id);
        let params = DeleteParams {
            grace_period_seconds: Some(u32::try_from(self.config.grace_period.as_secs()).unwrap_or(u32::MAX)),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let wait = self.config.grace_period + self.config.destroy_timeout;
        match self.pods().delete(&name, &params).await {
            // The API server answers with the pod, marked for deletion: it is gone once the
            // kubelet has stopped it and a DELETED event says so.
            Ok(deleted) => {
                if let Some(terminating) = deleted.left() {
                    match self.follow(&name, terminating, Instant::now() + wait, |_| None::<()>).await? {
                        Followed::Gone | Followed::Decided(()) => {}
                        Followed::TimedOut(last) => {
                            return Err(ProviderError::Infrastructure {
                                provider: NAME.to_owned(),
                                reason: format!(
                                    "pod `{name}` was still there {wait:?} after its deletion ({})",
                                    describe_pending(&last)
                                ),
                            });
                        }
                    }
                }
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(self.classify("deleting the pod", e)),
        }
        self.delete_config_map(worker_id).await
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        let selector = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
        let pods = self.pods().list(&selector).await.map_err(|e| self.classify("listing pods", e))?;
        let config_maps =
            self.config_maps().list(&selector).await.map_err(|e| self.classify("listing ConfigMaps", e))?;
        let worker_of = |meta: &ObjectMeta| {
            let annotations = meta.annotations.as_ref();
            annotations
                .and_then(|a| a.get(WORKER_ID_LABEL))
                .or_else(|| meta.labels.as_ref()?.get(WORKER_ID_LABEL))
                .cloned()
        };
        let mut workers: Vec<WorkerInfo> = pods
            .items
            .iter()
            .filter_map(|pod| {
                let worker_id = worker_of(&pod.metadata)?;
                let handle = pod.metadata.name.clone().unwrap_or_default();
                Some(WorkerInfo::new(worker_id, handle, original_labels(&pod.metadata), pod_state(pod)))
            })
            .collect();
        // A ConfigMap whose pod is missing was left by a start that never created its pod:
        // listed as gone, so that reaping removes it too.
        for config_map in &config_maps.items {
            let Some(worker_id) = worker_of(&config_map.metadata) else { continue };
            if workers.iter().any(|worker| worker.worker_id == worker_id) {
                continue;
            }
            let handle = config_map.metadata.name.clone().unwrap_or_default();
            workers.push(WorkerInfo::new(
                worker_id,
                handle,
                original_labels(&config_map.metadata),
                WorkerState::Gone,
            ));
        }
        Ok(workers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_values_are_valid_and_distinct() {
        assert_eq!(pod_name("w-1"), "hodei-w-1");
        assert_eq!(config_map_name("w-1"), "hodei-w-1-ca");
        let upper = pod_name("W-1");
        assert!(is_dns_label(&upper, MAX_LABEL), "{upper}");
        assert_ne!(upper, pod_name("w-1"), "case must not collide");
        let long = "x".repeat(200);
        for name in [pod_name(&long), config_map_name(&long), pod_name("ünïcode/id"), pod_name("---")] {
            assert!(is_dns_label(&name, MAX_LABEL), "{name}");
        }
        assert_eq!(label_value("saga-42"), "saga-42");
        assert_eq!(label_value(""), "");
        for value in ["saga/with spaces", &long, "-leading", "trailing.", "ü"] {
            let valid = label_value(value);
            assert!(is_label_value(&valid), "{value} -> {valid}");
            assert_ne!(valid, value);
        }
        assert_ne!(label_value("a b"), label_value("a/b"), "sanitized values keep a hash of the original");
        assert!(is_label_key("hodei.dev/worker-id"));
        assert!(is_label_key("team"));
        assert!(!is_label_key("Bad_Prefix/x"));
        assert!(!is_label_key("has space"));
    }
}
