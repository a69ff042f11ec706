//! Runs: start, list, get, the journal (with follow), and the operator verbs.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use hodei_core::{EngineEventKind, Event, SagaFilter, SagaId, SagaRun, Timestamp};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::auth::authorize;
use super::error::{ApiError, ErrorBody};
use super::model::{
    CancelRun, EventQuery, EventView, ForkRun, JobView, RunDetail, RunPage, RunQuery, RunSummary, SendSignal,
    StartRun,
};
use super::server::ApiState;
use super::time::parse_millis;
use super::tokens::Role;
use super::view::{engine_status, event_view, run_detail, summary};
use crate::jobs::saga_jobs;

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub(crate) fn run_id(id: &str) -> Result<SagaId, ApiError> {
    SagaId::new(id).map_err(|e| ApiError::invalid_request(e.to_string()))
}

/// Starts a run, or returns the one with that id if it was started with the same input.
#[utoipa::path(post, path = "/api/v1/runs", tag = "runs", request_body = StartRun,
    responses(
        (status = 201, description = "Started", body = RunSummary),
        (status = 200, description = "A run with this id and input exists: that run", body = RunSummary),
        (status = 404, description = "No such definition", body = ErrorBody),
        (status = 409, description = "A run with this id exists with another input", body = ErrorBody),
        (status = 422, description = "The input does not fit the definition", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn start(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<StartRun>, JsonRejection>,
) -> Result<Response, ApiError> {
    authorize(&state.tokens, &headers, Role::Operator)?;
    let Json(body) = body?;
    let id = run_id(&body.id)?;
    let existed = state.engine.status(&id).is_ok();
    let run = SagaRun::from_json(body.definition, id.as_str(), &body.input)?;
    let handle = state.engine.start(run).await?;
    let record = state.engine.status(handle.id())?;
    let code = if existed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(summary(&record))).into_response())
}

/// Lists runs in id order, one page at a time.
#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(RunQuery),
    responses(
        (status = 200, description = "A page of runs, or `text/event-stream` of `RunSummary`s when following",
            content((RunPage = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "A malformed filter", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<RunQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let Query(query) = query?;
    let mut filter = SagaFilter::default();
    if let Some(definition) = query.definition {
        filter = filter.definition(definition);
    }
    if let Some(status) = query.status {
        filter = filter.status(&engine_status(status));
    }
    if let Some(version) = query.version {
        filter = filter.version(version);
    }
    if let Some(text) = query.q.filter(|q| !q.is_empty()) {
        filter = filter.id_contains(text);
    }
    if let Some(after) = &query.created_after {
        filter = filter.created_after(Timestamp(parse_millis(after).map_err(ApiError::invalid_request)?));
    }
    if let Some(before) = &query.created_before {
        filter = filter.created_before(Timestamp(parse_millis(before).map_err(ApiError::invalid_request)?));
    }
    if query.follow.unwrap_or(false) {
        return Ok(follow_runs(&state, filter));
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid_request(format!("limit must be 1 to {MAX_PAGE}, not {limit}")));
    }
    let cursor = query.cursor.as_deref().map(run_id).transpose()?;
    let page = state.engine.list_page(&filter, cursor.as_ref(), limit as usize)?;
    Ok(Json(RunPage {
        runs: page.records.iter().map(summary).collect(),
        next_cursor: page.next.map(|id| id.to_string()),
    })
    .into_response())
}

/// Each run that starts or changes status and matches `filter`, as it happens.
fn follow_runs(state: &ApiState, filter: SagaFilter) -> Response {
    let mut live = state.engine.subscribe();
    let engine = state.engine.clone();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let event = match live.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let lagged =
                        SseEvent::default().event("lagged").data("some changes were missed: list again");
                    if tx.send(Ok::<_, Infallible>(lagged)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let changed = match &event.kind {
                EngineEventKind::Status(_) => true,
                EngineEventKind::Journaled(recorded) => matches!(recorded.event, Event::SagaStarted { .. }),
                _ => false,
            };
            let Some(record) = changed.then(|| engine.status(&event.saga_id).ok()).flatten() else {
                continue;
            };
            if !filter.matches(&record) {
                continue;
            }
            let data = serde_json::to_string(&summary(&record)).unwrap_or_default();
            if tx.send(Ok(SseEvent::default().event("run").data(data))).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A run with its steps, attempts, timers, signals, branches and jobs.
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run", body = RunDetail),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<RunDetail>, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let id = run_id(&id)?;
    let record = state.engine.status(&id)?;
    let history = state.engine.history(&id)?;
    let mut detail = run_detail(&record, &history);
    if let Some(hub) = state.hub.as_ref().filter(|hub| hub.logs().is_some()) {
        let jobs = saga_jobs(hub, &id, &history).await.map_err(|e| ApiError::internal(e.to_string()))?;
        // Which worker runs each job now; a finished job's worker is not kept.
        let running: std::collections::BTreeMap<String, String> = hub
            .running_jobs()
            .into_iter()
            .flat_map(|(worker, jobs)| jobs.into_iter().map(move |job| (job, worker.clone())))
            .collect();
        for job in jobs {
            if let Some(step) = detail.steps.iter_mut().find(|s| s.step == job.step) {
                let mut view = job_view(&job);
                view.worker = running.get(&job.job_id).cloned();
                step.jobs.push(view);
            }
        }
    }
    Ok(Json(detail))
}

fn job_view(job: &crate::jobs::SagaJob) -> JobView {
    use hodei_agent::protocol::v1::job_result::Outcome;
    let result = job.result.as_ref();
    let outcome = result.and_then(|r| r.outcome.as_ref()).map(|o| match o {
        Outcome::ExitCode(code) => format!("exit {code}"),
        Outcome::Signal(signal) => format!("signal {signal}"),
        Outcome::Cancelled(reason) => format!("cancelled: {reason}"),
        Outcome::TimedOut(_) => "timed out".to_owned(),
        Outcome::FailedToStart(reason) => format!("failed to start: {reason}"),
        Outcome::Lost(reason) => format!("lost: {reason}"),
    });
    let exit_code = match result.and_then(|r| r.outcome.as_ref()) {
        Some(Outcome::ExitCode(code)) => Some(*code),
        _ => None,
    };
    JobView {
        job_id: job.job_id.clone(),
        name: job.name.clone(),
        attempt: job.attempt,
        worker: None,
        outcome,
        exit_code,
        stdout_bytes: result.map_or(0, |r| r.stdout_bytes),
        stderr_bytes: result.map_or(0, |r| r.stderr_bytes),
        wall_time_ms: result.map_or(0, |r| r.wall_time_ms),
    }
}

/// The run's journal; with `follow=true`, a stream of server-sent events that ends with the run.
#[utoipa::path(get, path = "/api/v1/runs/{id}/events", tag = "runs",
    params(("id" = String, Path, description = "The run's id"), EventQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "When following: the last sequence number seen")),
    responses(
        (status = 200, description = "Journal entries (JSON array), or `text/event-stream` when following",
            content((Vec<EventView> = "application/json"), (String = "text/event-stream"))),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let Query(query) = query?;
    let id = run_id(&id)?;
    let last_seen = match headers.get("last-event-id") {
        Some(value) => {
            Some(value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).ok_or_else(|| {
                ApiError::invalid_request("Last-Event-ID must be a journal sequence number")
            })?)
        }
        None => query.after,
    };
    let after = |seq: u64| last_seen.is_none_or(|last| seq > last);
    if !query.follow.unwrap_or(false) {
        let history = state.engine.history(&id)?;
        let views: Vec<EventView> = history.iter().filter(|r| after(r.seq)).map(event_view).collect();
        return Ok(Json(views).into_response());
    }
    // From any engine: one that does not drive the run reads its journal at each beat.
    let mut follower = state.engine.follow(&id, last_seen.map_or(0, |last| last + 1))?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        // The stream ends with the run (a reconnect after its end gets nothing new).
        while let Some(Ok(recorded)) = follower.next().await {
            if tx.send(sse_event(&recorded)).await.is_err() {
                return;
            }
        }
    });
    let stream = ReceiverStream::new(rx);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

fn sse_event(recorded: &hodei_core::RecordedEvent) -> Result<SseEvent, Infallible> {
    let view = event_view(recorded);
    let data = serde_json::to_string(&view).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    Ok(SseEvent::default().id(recorded.seq.to_string()).event(view.kind).data(data))
}

/// Sends a signal to a run; an approval is a signal. Journaled with the token's name.
#[utoipa::path(post, path = "/api/v1/runs/{id}/signals", tag = "runs",
    params(("id" = String, Path, description = "The run's id")), request_body = SendSignal,
    responses(
        (status = 202, description = "Journaled in the run's inbox"),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has ended", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn signal(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<SendSignal>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let token = authorize(&state.tokens, &headers, Role::Operator)?;
    let Json(body) = body?;
    let id = run_id(&id)?;
    state.engine.signal_as(&id, body.name, &body.payload, &token.name).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Cancels a run: its started steps are compensated. Journaled with the token's name.
///
/// A parked run, or one waiting for a version no process registers, has no code that matches its
/// journal to compensate with: it ends at once, `failed` when nothing of it is to undo, and
/// otherwise `compensation_failed` with the steps left undone (retry the compensation once code
/// that matches its journal runs). The answer is the run as it stands after the cancel.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "The run's id")), request_body = CancelRun,
    responses(
        (status = 202, description = "Journaled; the run compensates (a stranded run has ended)", body = RunSummary),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "The run has ended", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn cancel(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<RunSummary>), ApiError> {
    let token = authorize(&state.tokens, &headers, Role::Operator)?;
    let id = run_id(&id)?;
    // The body is optional: none, or `{"reason": ...}`.
    let body: CancelRun = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRun::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid_request(format!("the body is not a cancel request: {e}")))?
    };
    let reason = body.reason.unwrap_or_else(|| format!("cancelled by {}", token.name));
    state.engine.cancel_as(&id, reason, &token.name).await?;
    let record = state.engine.status(&id)?;
    Ok((StatusCode::ACCEPTED, Json(summary(&record))))
}

/// Forks a run into a new one that reuses what it recorded before a step, on a version of its
/// definition.
///
/// By default the fork starts after the run's last good step, on the run's own version (the
/// newest, if its own is not registered). A parked run, or one waiting for its version, is moved:
/// it ends `failed` ("moved to fork ..."), and the fork carries on in its place.
#[utoipa::path(post, path = "/api/v1/runs/{id}/fork", tag = "runs",
    params(("id" = String, Path, description = "The run to fork")), request_body = ForkRun,
    responses(
        (status = 201, description = "The fork, started", body = RunSummary),
        (status = 404, description = "No such run, or no such version of its definition", body = ErrorBody),
        (status = 409, description = "The run is still running, or has no such step, or the fork's id is taken", body = ErrorBody),
        (status = 422, description = "The run's input does not fit the version", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn fork(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<ForkRun>, JsonRejection>,
) -> Result<(StatusCode, Json<RunSummary>), ApiError> {
    authorize(&state.tokens, &headers, Role::Operator)?;
    let Json(body) = body?;
    let source = run_id(&id)?;
    let new_id = run_id(&body.id)?;
    let handle = state.engine.fork_onto(&source, body.version, body.from_step, new_id.as_str()).await?;
    let record = state.engine.status(handle.id())?;
    Ok((StatusCode::CREATED, Json(summary(&record))))
}

macro_rules! verb {
    ($name:ident, $path:literal, $method:ident, $doc:literal, $what:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "runs",
            params(("id" = String, Path, description = "The run's id")),
            responses(
                (status = 202, description = $what),
                (status = 404, description = "No such run", body = ErrorBody),
                (status = 409, description = "The run is not in a state that allows it", body = ErrorBody),
            ),
            security(("bearer" = [])))]
        pub(crate) async fn $name(
            State(state): State<ApiState>,
            headers: HeaderMap,
            Path(id): Path<String>,
        ) -> Result<StatusCode, ApiError> {
            let token = authorize(&state.tokens, &headers, Role::Operator)?;
            let id = run_id(&id)?;
            state.engine.$method(&id, &token.name).await?;
            Ok(StatusCode::ACCEPTED)
        }
    };
}

verb!(
    pause,
    "/api/v1/runs/{id}/pause",
    pause,
    "Pauses a run: it finishes the step it is in and waits before its next one. Journaled, so a restart keeps it paused.",
    "Journaled; the run pauses after its current step"
);
verb!(resume, "/api/v1/runs/{id}/resume", resume, "Resumes a paused run.", "Journaled; the run continues");
verb!(
    retry_now,
    "/api/v1/runs/{id}/retry",
    retry_now,
    "Starts the next attempt of a step (or compensation) waiting out a retry backoff now.",
    "Journaled; the next attempt starts"
);
verb!(
    retry_compensation,
    "/api/v1/runs/{id}/retry-compensation",
    retry_compensation,
    "Runs the failed compensation of a run in `compensation_failed` again, then the ones it left undone.",
    "Journaled; the compensations run again"
);
