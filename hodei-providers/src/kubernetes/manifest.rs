//! A worker's two objects, its CA ConfigMap and its Pod, built from its spec and the
//! configuration; and the labels read back from them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, KeyToPath, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::names::{
    MAX_LABEL, config_map_name, is_dns_label, is_label_key, is_label_value, label_value, pod_name,
};
use super::{
    ACTIVE_DEADLINE_KEY, KubernetesProvider, NODE_SELECTOR_KEY, SERVICE_ACCOUNT_KEY, TOLERATIONS_KEY,
};
use crate::provider::{ProviderError, WORKER_ID_LABEL, WorkerSpec};

/// The name of the agent's container in each pod.
pub const AGENT_CONTAINER: &str = "agent";
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

type StringMap = BTreeMap<String, String>;

impl KubernetesProvider {
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
}

fn env_var(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value), ..EnvVar::default() }
}

/// The labels Hodei set, with the originals of values that were sanitized.
pub(super) fn original_labels(meta: &ObjectMeta) -> BTreeMap<String, String> {
    let annotations = meta.annotations.clone().unwrap_or_default();
    let mut labels = meta.labels.clone().unwrap_or_default();
    for (key, value) in labels.iter_mut() {
        if let Some(original) = annotations.get(key) {
            value.clone_from(original);
        }
    }
    labels
}
