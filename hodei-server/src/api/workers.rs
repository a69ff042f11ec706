//! The workers: those the scheduler holds and those connected to the hub.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

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
    let draining = state.scheduler.as_ref().map(|s| s.draining()).unwrap_or_default();
    let mut labels = state.scheduler.as_ref().map(|s| s.worker_labels()).unwrap_or_default();
    let heard = hub.last_heard();
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
                    worker: Some(id.clone()),
                    at: format_millis(u64::try_from(m.at_unix_ms).unwrap_or(0)),
                    cpu_usage_usec: m.cpu_usage_usec,
                    memory_current_bytes: m.memory_current_bytes,
                    memory_peak_bytes: m.memory_peak_bytes,
                })
                .collect();
            let connected_since = connected.get(id).map(|t| unix_millis(*t));
            WorkerView {
                id: id.clone(),
                provider: providers.get(id).cloned(),
                draining: draining.contains(id),
                labels: labels.remove(id).unwrap_or_default(),
                last_heard: heard.get(id).map(|t| unix_millis(*t)),
                state: if connected_since.is_some() { "connected" } else { "provisioned" }.to_owned(),
                connected_since,
                jobs,
                metrics,
            }
        })
        .collect();
    Ok(Json(workers))
}

fn unix_millis(at: std::time::SystemTime) -> String {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format_millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

fn scheduler(state: &ApiState) -> Result<&crate::scheduler::Scheduler, ApiError> {
    state
        .scheduler
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this server has no control plane, so no workers"))
}

fn worker_error(error: crate::scheduler::SchedulerError) -> ApiError {
    match error {
        crate::scheduler::SchedulerError::UnknownWorker(_) => ApiError::not_found(error.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// Drains a worker: no new jobs; it finishes the one it runs, then is destroyed.
#[utoipa::path(post, path = "/api/v1/workers/{id}/drain", tag = "workers",
    params(("id" = String, Path, description = "The worker's id")),
    responses(
        (status = 202, description = "Draining"),
        (status = 404, description = "No such worker", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn drain(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&state.tokens, &headers, Role::Operator)?;
    scheduler(&state)?.drain(&id).map_err(worker_error)?;
    Ok(StatusCode::ACCEPTED)
}

/// Removes a worker now: the job it runs ends as lost and its step retries elsewhere.
#[utoipa::path(delete, path = "/api/v1/workers/{id}", tag = "workers",
    params(("id" = String, Path, description = "The worker's id")),
    responses(
        (status = 202, description = "Being destroyed"),
        (status = 404, description = "No such worker", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn remove(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&state.tokens, &headers, Role::Operator)?;
    scheduler(&state)?.remove(&id).map_err(worker_error)?;
    Ok(StatusCode::ACCEPTED)
}

/// Every resource sample of every job as the agents send it (about one a second per running
/// job), as server-sent events (`sample`, a `JobMetrics` with its worker), for live charts.
#[utoipa::path(get, path = "/api/v1/metrics", tag = "workers",
    responses(
        (status = 200, description = "`text/event-stream` of `JobMetrics`", content((String = "text/event-stream"))),
        (status = 404, description = "No control plane", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn metrics(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let hub = state
        .hub
        .clone()
        .ok_or_else(|| ApiError::not_found("this server has no control plane, so no metrics"))?;
    let mut samples = hub.subscribe_metrics();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let sample = match samples.recv().await {
                Ok(sample) => sample,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let worker = hub
                .running_jobs()
                .into_iter()
                .find_map(|(worker, jobs)| jobs.contains(&sample.job_id).then_some(worker));
            let view = JobMetrics {
                job_id: sample.job_id,
                worker,
                at: format_millis(u64::try_from(sample.at_unix_ms).unwrap_or(0)),
                cpu_usage_usec: sample.cpu_usage_usec,
                memory_current_bytes: sample.memory_current_bytes,
                memory_peak_bytes: sample.memory_peak_bytes,
            };
            let data = serde_json::to_string(&view).unwrap_or_default();
            if tx
                .send(Ok::<_, std::convert::Infallible>(Event::default().event("sample").data(data)))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}
