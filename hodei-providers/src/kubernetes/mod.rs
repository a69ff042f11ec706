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
//! [`MANAGED_BY_LABEL`]: crate::MANAGED_BY_LABEL
//! [`Provider::list`]: crate::Provider::list
//! [`ProviderError::Infrastructure`]: crate::ProviderError::Infrastructure

mod config;
mod errors;
mod manifest;
mod names;
mod provider;
mod start;
mod status;
mod watch;

/// k8s-openapi, whose types the configuration takes (e.g. [`Toleration`]).
///
/// [`Toleration`]: k8s_openapi::api::core::v1::Toleration
pub use k8s_openapi;
/// kube, whose [`kube::Client`] the provider is built on.
pub use kube;

pub use config::{
    ACTIVE_DEADLINE_KEY, DEFAULT_IMAGE, KubernetesConfig, NODE_SELECTOR_KEY, SERVICE_ACCOUNT_KEY,
    TOLERATIONS_KEY,
};
pub use manifest::{AGENT_CONTAINER, AGENT_DIR, CA_BUNDLE_KEY, CA_BUNDLE_PATH, CA_DIR, WORK_DIR_PATH};
pub use names::{CONFIG_MAP_SUFFIX, POD_PREFIX, config_map_name, label_value, pod_name};
pub use provider::{KubernetesProvider, NAME};
pub use status::pod_state;
