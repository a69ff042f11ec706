//! Replay checks and journal export: whether runs still fit the code, asked before a deploy
//! rather than found out by parking them, and a run's journal as a file to check elsewhere.
//!
//! All of them read: a check replays a scratch copy of a journal with nothing run live and
//! nothing written, so whoever may read runs may ask.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hodei_core::{JournalFile, PatchUse, ReplayReport, ReplayVerdict, SagaId};

use super::auth::authorize;
use super::error::{ApiError, ErrorBody};
use super::model::{InFlightCheckView, PatchUseView, ReplayReportView, ReplayVerdictKind, ReplayVerdictView};
use super::runs::run_id;
use super::server::ApiState;
use super::tokens::Role;

/// The media type of a journal file.
const JOURNAL_MEDIA_TYPE: &str = "application/octet-stream";
/// The longest part of a journal file's name taken from the run's id: with the hash and the
/// extension, well under the 255 bytes file systems allow.
const MAX_NAME_STEM: usize = 200;

/// A journal file: one run's journal in the stores' record format (a format byte, a CRC-32, then
/// the run's id and events in bincode).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code, reason = "the OpenAPI document's schema of the body; the handlers move bytes")]
pub(crate) struct JournalFileBytes(Vec<u8>);

/// The run's journal as a journal file (the stores' record format), to check on another build
/// (`POST /api/v1/replay`) or import into another store.
#[utoipa::path(get, path = "/api/v1/runs/{id}/journal", tag = "replay",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The journal file, named `<id>.journal` in `Content-Disposition` \
            (characters other than ASCII letters, digits, `.`, `_` and `-` percent-encoded)",
            content_type = "application/octet-stream", body = JournalFileBytes,
            headers(("content-disposition" = String, description = "`attachment; filename=\"<id>.journal\"`"))),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn journal(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let id = run_id(&id)?;
    let events = state.engine.history(&id)?;
    let file = JournalFile { saga: id.clone(), events };
    // The server's own journal failing to encode is the server's fault, not the request's.
    let bytes = file.to_bytes().map_err(|e| ApiError::internal(e.to_string()))?;
    let disposition = format!("attachment; filename=\"{}\"", journal_file_name(&id));
    let disposition = HeaderValue::from_str(&disposition)
        .map_err(|e| ApiError::internal(format!("the journal file's name: {e}")))?;
    Ok((
        [(CONTENT_TYPE, HeaderValue::from_static(JOURNAL_MEDIA_TYPE)), (CONTENT_DISPOSITION, disposition)],
        bytes,
    )
        .into_response())
}

/// Replays the run's journal on the code this server registers, running nothing: whether the
/// run would go on, park or wait for its version, and where.
#[utoipa::path(get, path = "/api/v1/runs/{id}/replay", tag = "replay",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "What the replay found", body = ReplayReportView),
        (status = 404, description = "No such run", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn check_run(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ReplayReportView>, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let id = run_id(&id)?;
    let report = state.engine.check_run(&id).await?;
    Ok(Json(report_view(&report)))
}

/// Replays a journal file (from `GET /api/v1/runs/{id}/journal` of another server, such as the
/// one a deploy would replace) on the code this server registers, running nothing and storing
/// nothing: the pre-deploy check, asked of a server running the new build.
#[utoipa::path(post, path = "/api/v1/replay", tag = "replay",
    request_body(content = JournalFileBytes, content_type = "application/octet-stream",
        description = "A journal file, as `GET /api/v1/runs/{id}/journal` answers it"),
    responses(
        (status = 200, description = "What the replay found", body = ReplayReportView),
        (status = 400, description = "The body is not a journal file, or not a run's journal", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn check_journal(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReplayReportView>, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", rejection.body_text())
        }
        _ => ApiError::invalid_request(rejection.body_text()),
    })?;
    let file = JournalFile::from_bytes(&body)
        .map_err(|e| ApiError::invalid_request(format!("the body is not a journal file: {e}")))?;
    let report = state.engine.check_journal(&file.saga, &file.events).await.map_err(|error| match error {
        // What the file holds is not a run's journal: it does not begin with the run's start,
        // or its sequence numbers are not 0, 1, 2, ...
        hodei_core::Error::CorruptRecord { .. } | hodei_core::Error::SequenceConflict { .. } => {
            ApiError::invalid_request(format!("the journal file does not hold a run's journal: {error}"))
        }
        other => ApiError::from(other),
    })?;
    Ok(Json(report_view(&report)))
}

/// Replays every run in flight (running, paused, compensating, parked or waiting for its
/// version) on the code this server registers, running nothing.
#[utoipa::path(get, path = "/api/v1/check", tag = "replay",
    responses((status = 200, description = "A report per run in flight, and how many would go on", body = InFlightCheckView)),
    security(("bearer" = [])))]
pub(crate) async fn check_in_flight(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<InFlightCheckView>, ApiError> {
    authorize(&state.tokens, &headers, Role::Viewer)?;
    let mut reports = state.engine.check_in_flight().await?;
    // The store's order is its own; people and scripts compare lists by id.
    reports.sort_by(|a, b| a.saga.cmp(&b.saga));
    let clean = reports.iter().filter(|report| report.verdict.is_clean()).count();
    Ok(Json(InFlightCheckView {
        clean: u32::try_from(clean).unwrap_or(u32::MAX),
        not_clean: u32::try_from(reports.len() - clean).unwrap_or(u32::MAX),
        runs: reports.iter().map(report_view).collect(),
    }))
}

fn report_view(report: &ReplayReport) -> ReplayReportView {
    ReplayReportView {
        saga: report.saga.to_string(),
        definition: report.definition.clone(),
        version: report.version,
        verdict: verdict_view(&report.verdict),
        patches: report.patches.iter().map(patch_view).collect(),
    }
}

fn verdict_view(verdict: &ReplayVerdict) -> ReplayVerdictView {
    let (verdict, next, reason) = match verdict {
        ReplayVerdict::Clean { next } => (ReplayVerdictKind::Clean, next.clone(), None),
        ReplayVerdict::WouldPark { reason } => (ReplayVerdictKind::WouldPark, None, Some(reason.clone())),
        ReplayVerdict::NoDefinition => (ReplayVerdictKind::NoDefinition, None, None),
        ReplayVerdict::Stalled { reason } => (ReplayVerdictKind::Stalled, None, Some(reason.clone())),
        // A verdict this build does not know yet: not clean, with its debug form, never
        // passed off as one that goes on.
        other => (ReplayVerdictKind::Stalled, None, Some(format!("{other:?}"))),
    };
    ReplayVerdictView { verdict, next, reason }
}

fn patch_view(patch: &PatchUse) -> PatchUseView {
    PatchUseView { patch: patch.patch.clone(), key: patch.key.clone(), new_path: patch.new_path }
}

/// `<id>.journal`, safe as a file name and in a quoted header parameter whatever the id holds
/// (an id may hold `/`, quotes or `..`): bytes other than ASCII letters, digits, `.`, `_` and
/// `-` are percent-encoded, so distinct ids get distinct names; an id too long for a file name
/// is cut, and a hash of it whole keeps the name distinct.
pub(crate) fn journal_file_name(id: &SagaId) -> String {
    let mut stem = String::new();
    for byte in id.as_str().bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-') {
            stem.push(char::from(byte));
        } else {
            stem.push_str(&format!("%{byte:02X}"));
        }
    }
    if stem.len() > MAX_NAME_STEM {
        // Only ASCII is left in the stem, so any byte index is a character boundary.
        stem.truncate(MAX_NAME_STEM);
        stem.push_str(&format!("~{:016x}", fnv1a(id.as_str().as_bytes())));
    }
    format!("{stem}.journal")
}

/// FNV-1a, 64 bits: stable across builds and platforms, which a file name must be (std's
/// hashers promise neither).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The view is the contract: it must say what the engine's own serialization says.
    #[test]
    fn verdicts_show_as_the_engine_serializes_them() {
        let verdicts = [
            ReplayVerdict::Clean { next: Some("step `deploy`".into()) },
            ReplayVerdict::Clean { next: None },
            ReplayVerdict::WouldPark { reason: "step 0: the code now calls `a`".into() },
            ReplayVerdict::NoDefinition,
            ReplayVerdict::Stalled { reason: "waits on a channel".into() },
        ];
        for verdict in verdicts {
            let view = serde_json::to_value(verdict_view(&verdict)).unwrap();
            // The engine writes `"next": null`; the API leaves out what is absent, as it does
            // everywhere.
            let mut engine = serde_json::to_value(&verdict).unwrap();
            engine.as_object_mut().unwrap().retain(|_, value| !value.is_null());
            assert_eq!(view, engine, "{verdict:?}");
        }
    }

    fn name(id: &str) -> String {
        journal_file_name(&SagaId::new(id).unwrap())
    }

    #[test]
    fn a_plain_id_is_its_own_file_name() {
        assert_eq!(name("ci-8"), "ci-8.journal");
        assert_eq!(name("release_2.1"), "release_2.1.journal");
    }

    #[test]
    fn separators_quotes_and_other_bytes_are_percent_encoded() {
        assert_eq!(name("../etc/passwd"), "..%2Fetc%2Fpasswd.journal");
        assert_eq!(name("a \"b\""), "a%20%22b%22.journal");
        assert_eq!(name("déploiement"), "d%C3%A9ploiement.journal");
        assert_ne!(name("a/b"), name("a_b"));
    }

    #[test]
    fn a_long_id_is_cut_and_told_apart_by_its_hash() {
        let long = "x".repeat(256);
        let other = format!("{}y", "x".repeat(255));
        let (a, b) = (name(&long), name(&other));
        assert_ne!(a, b);
        assert!(a.len() <= 255 && b.len() <= 255, "{a}");
        assert!(a.starts_with(&"x".repeat(MAX_NAME_STEM)) && a.ends_with(".journal"), "{a}");
    }
}
