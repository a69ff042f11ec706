//! A job's stdout and stderr: read from any offset, or followed live over server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::authorize;
use super::error::{ApiError, ErrorBody};
use super::model::{LogChunkView, LogQuery};
use super::server::ApiState;
use super::tokens::Role;
use crate::logstore::{LogChunk, LogStore, LogStream};

/// A job's two logs, as the path names them.
#[derive(Debug, Clone, Copy, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code, reason = "the OpenAPI document's enum of the path segment; the handler reads a string")]
pub(crate) enum LogStreamName {
    Stdout,
    Stderr,
}

/// The most a plain read returns.
const MAX_READ: u32 = 1 << 20;

/// A job's log, from an offset; with `follow=true`, live until the log is closed.
#[utoipa::path(get, path = "/api/v1/jobs/{job}/logs/{stream}", tag = "logs",
    params(
        ("job" = String, Path, description = "The job's id (percent-encoded: ids hold `/` and `#`)"),
        ("stream" = LogStreamName, Path, description = "`stdout` or `stderr`"),
        LogQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "When following: the offset the last event ended at"),
    ),
    responses(
        (status = 200, description = "The bytes, or `text/event-stream` of `LogChunkView`s when following",
            content((LogChunkView = "application/json"), (String = "text/event-stream"))),
        (status = 404, description = "No such job, or no control plane", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn read(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((job, stream)): Path<(String, String)>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let Query(query) = query?;
    let stream = match stream.as_str() {
        "stdout" => LogStream::Stdout,
        "stderr" => LogStream::Stderr,
        other => return Err(ApiError::invalid_request(format!("no stream `{other}`: stdout or stderr"))),
    };
    let logs = state
        .logs
        .clone()
        .ok_or_else(|| ApiError::not_found("this server has no control plane, so no job logs"))?;
    if !logs.exists(&job).await? {
        return Err(ApiError::not_found(format!("no job `{job}`")));
    }
    let from = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::invalid_request("Last-Event-ID must be a log offset"))?,
        None => query.offset.unwrap_or(0),
    };
    if query.follow.unwrap_or(false) {
        return follow(logs, job, stream, from).await;
    }
    let limit = query.limit.unwrap_or(MAX_READ);
    if !(1..=MAX_READ).contains(&limit) {
        return Err(ApiError::invalid_request(format!("limit must be 1 to {MAX_READ}, not {limit}")));
    }
    let chunk = logs.read(&job, stream, from, limit as usize).await?;
    let status = logs.status(&job).await?;
    let mut view = text_view(&mut Vec::new(), chunk);
    view.closed = status.closed && view.next_offset >= status.stream(stream).end;
    Ok(Json(view).into_response())
}

async fn follow(
    logs: Arc<LogStore>,
    job: String,
    stream: LogStream,
    from: u64,
) -> Result<Response, ApiError> {
    let mut follower = logs.follow(&job, stream, from).await?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut pending = Vec::new();
        while let Some(next) = follower.next().await {
            let event = match next {
                Ok(chunk) => {
                    let view = text_view(&mut pending, chunk);
                    if view.text.is_empty() {
                        continue;
                    }
                    let data = serde_json::to_string(&view).unwrap_or_default();
                    SseEvent::default().id(view.next_offset.to_string()).event("log").data(data)
                }
                Err(error) => SseEvent::default().event("error").data(error.to_string()),
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        let end = serde_json::json!({ "offset": follower.offset() }).to_string();
        let _ =
            tx.send(Ok(SseEvent::default().id(follower.offset().to_string()).event("end").data(end))).await;
    });
    let events: ReceiverStream<Result<SseEvent, Infallible>> = ReceiverStream::new(rx);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// The chunk as text, after the bytes `pending` held back from the chunk before. A UTF-8
/// character cut by the chunk's end is held back in `pending` (and `next_offset` stops before
/// it), so that it is never shown as two replacement characters and a reconnect at
/// `next_offset` reads it whole.
fn text_view(pending: &mut Vec<u8>, chunk: LogChunk) -> LogChunkView {
    let offset = chunk.offset - pending.len() as u64;
    let mut bytes = std::mem::take(pending);
    bytes.extend_from_slice(&chunk.bytes);
    let mut next_offset = chunk.next_offset;
    if chunk.truncation.is_none() {
        let cut = incomplete_tail(&bytes);
        if cut > 0 {
            *pending = bytes.split_off(bytes.len() - cut);
            next_offset -= cut as u64;
        }
    }
    LogChunkView { offset, next_offset, text: String::from_utf8_lossy(&bytes).into_owned(), closed: false }
}

/// How many bytes at the end of `bytes` start a UTF-8 character they do not finish.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let needed = match byte {
            b if b & 0xE0 == 0xC0 => 2,
            b if b & 0xF0 == 0xE0 => 3,
            b if b & 0xF8 == 0xF0 => 4,
            _ => return 0,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, bytes: &[u8]) -> LogChunk {
        LogChunk { offset, bytes: bytes.to_vec(), next_offset: offset + bytes.len() as u64, truncation: None }
    }

    #[test]
    fn a_character_cut_by_a_chunk_is_carried_whole_to_the_next() {
        let text = "héllo ✓ done 🦀\n".as_bytes();
        for split in 0..=text.len() {
            let mut pending = Vec::new();
            let first = text_view(&mut pending, chunk(0, &text[..split]));
            let second = text_view(&mut pending, chunk(split as u64, &text[split..]));
            assert_eq!(format!("{}{}", first.text, second.text), "héllo ✓ done 🦀\n", "split at {split}");
            assert_eq!(first.next_offset, second.offset, "split at {split}");
            assert_eq!(second.next_offset, text.len() as u64);
            assert!(pending.is_empty());
        }
    }

    #[test]
    fn invalid_bytes_are_replaced_not_held() {
        let mut pending = Vec::new();
        let view = text_view(&mut pending, chunk(0, b"ok \xff\xfe"));
        assert_eq!(view.text, "ok \u{fffd}\u{fffd}");
        assert_eq!(view.next_offset, 5);
    }
}
