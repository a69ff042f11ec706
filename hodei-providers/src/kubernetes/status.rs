//! What a pod's status says: the worker's state, and where a pod that has not started stands.

use k8s_openapi::api::core::v1::{ContainerState, Pod};

use super::AGENT_CONTAINER;
use crate::provider::WorkerState;

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

/// Where a pod that has not started stands, for the start timeout's message.
pub(super) fn describe_pending(pod: &Pod) -> String {
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
