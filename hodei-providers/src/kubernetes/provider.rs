//! The provider itself: its client and namespace, and the [`Provider`] operations on pods.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PropagationPolicy};
use tokio::time::Instant;

use super::manifest::original_labels;
use super::start::StartFailure;
use super::status::describe_pending;
use super::watch::Followed;
use super::{AGENT_CONTAINER, KubernetesConfig, config_map_name, pod_name, pod_state};
use crate::provider::{
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, Provider, ProviderError, WORKER_ID_LABEL, WorkerInfo, WorkerSpec,
    WorkerState,
};

/// The provider's name, which jobs use as a hint.
pub const NAME: &str = "kubernetes";

/// Workers as Kubernetes pods. See the [module docs](super).
#[derive(Clone)]
pub struct KubernetesProvider {
    pub(super) config: KubernetesConfig,
    client: kube::Client,
    pub(super) namespace: String,
}

impl fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("namespace", &self.namespace)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
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

    pub(super) fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub(super) fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub(super) async fn delete_config_map(&self, worker_id: &str) -> Result<(), ProviderError> {
        match self.config_maps().delete(&config_map_name(worker_id), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(self.classify("deleting the CA ConfigMap", e)),
        }
    }
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
