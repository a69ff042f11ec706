//! Starting a worker's pod: creating its objects, then following the pod until its agent's
//! container runs or can never run.

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::PostParams;
use tokio::time::Instant;

use super::status::describe_pending;
use super::watch::Followed;
use super::{AGENT_CONTAINER, KubernetesProvider, NAME, pod_name};
use crate::provider::{Provider, ProviderError, WorkerSpec};

/// Why a pod did not start.
pub(super) enum StartFailure {
    /// Refused before a pod existed, and what this attempt made is already removed. A refused
    /// ConfigMap is not deleted: a conflict means it is another worker's with the same id.
    Refused(ProviderError),
    /// An error that says it all; the pod exists and must be removed.
    Error(ProviderError),
    /// The agent's container ended (or never ran): its output belongs in the error.
    Exited(String),
}

impl KubernetesProvider {
    /// Creates the ConfigMap and the Pod and follows the pod until its agent's container runs.
    pub(super) async fn start(
        &self,
        spec: &WorkerSpec,
        config_map: ConfigMap,
        pod: Pod,
    ) -> Result<Pod, StartFailure> {
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
    pub(super) async fn discard(&self, worker_id: &str) {
        if let Err(e) = self.destroy(worker_id).await {
            tracing::warn!(worker = %worker_id, error = %e, "could not remove a worker that failed to start");
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
