//! How the provider places workers: namespace, image, scheduling constraints and timeouts, and
//! the `provider_config` keys through which one spec adds to them or overrides them.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;

/// The image used when neither the spec nor the configuration names one.
pub const DEFAULT_IMAGE: &str = "hodei-agent:latest";

/// `provider_config` key: the service account of one worker's pod.
pub const SERVICE_ACCOUNT_KEY: &str = "service_account";
/// `provider_config` key: node selector entries added for one worker, `key=value,key=value`.
pub const NODE_SELECTOR_KEY: &str = "node_selector";
/// `provider_config` key: tolerations added for one worker, a JSON array of Kubernetes
/// `Toleration` objects.
pub const TOLERATIONS_KEY: &str = "tolerations";
/// `provider_config` key: the pod's active deadline for one worker, in seconds.
pub const ACTIVE_DEADLINE_KEY: &str = "active_deadline_seconds";

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
    /// Labels every worker offers to jobs ([`Provider::labels`](crate::Provider::labels)).
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
    /// How long [`Provider::destroy`](crate::Provider::destroy) waits for the pod to be gone,
    /// beyond the grace period.
    pub destroy_timeout: Duration,
    /// How many lines of a pod's output [`Provider::output`](crate::Provider::output) returns.
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
