//! The workers: those the scheduler holds and those connected to the hub.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;

use super::auth::authorize;
use super::error::{ApiError, ErrorBody};
use super::model::{JobMetrics, WorkerView};
use super::server::ApiState;
use super::time::format_millis;
use super::tokens::Role;

/// Every worker, by id: its provider, whether it is connected, when it was last heard from, its
/// jobs and their latest resource samples.
#[utoipa::path(get, path = "/api/v1/workers", tag = "workers",
    responses(
        (status = 200, description = "The workers, by id", body = [WorkerView]),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Vec<WorkerView>>, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let Some(hub) = &state.hub else { return Ok(Json(Vec::new())) };
    let providers = state.scheduler.as_ref().map(|s| s.workers()).unwrap_or_default();
    let connected = hub.connected_workers();
    let mut running = hub.running_jobs();
    let mut ids: BTreeMap<&String, ()> = providers.keys().map(|id| (id, ())).collect();
    ids.extend(connected.keys().map(|id| (id, ())));
    let workers = ids
        .into_keys()
        .map(|id| {
            let jobs: Vec<String> = running.remove(id).map(|j| j.into_iter().collect()).unwrap_or_default();
            let metrics = jobs
                .iter()
                .filter_map(|job| hub.job_metrics(job))
                .map(|m| JobMetrics {
                    job_id: m.job_id,
                    at: format_millis(u64::try_from(m.at_unix_ms).unwrap_or(0)),
                    cpu_usage_usec: m.cpu_usage_usec,
                    memory_current_bytes: m.memory_current_bytes,
                    memory_peak_bytes: m.memory_peak_bytes,
                })
                .collect();
            let connected_since = connected.get(id).map(|t| {
                let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                format_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
            });
            WorkerView {
                id: id.clone(),
                provider: providers.get(id).cloned(),
                state: if connected_since.is_some() { "connected" } else { "provisioned" }.to_owned(),
                connected_since,
                jobs,
                metrics,
            }
        })
        .collect();
    Ok(Json(workers))
}
