//! The API's OpenAPI document, generated from the handlers and bodies themselves, served at
//! `/api/v1/openapi.json` and committed as `hodei-server/openapi.json` (a test fails when the
//! two drift).

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorDetail};
use super::model::*;
use super::{admin, logs, metrics, replay, runs, webhooks, workers};

/// The document.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Hodei operator API", version = "1", description = "Watch and steer Hodei's pipelines from outside the process that runs them."),
    paths(
        admin::health, admin::login, admin::whoami, admin::logout, admin::definitions,
        runs::list, runs::start, runs::get, runs::events, runs::signal, runs::cancel, runs::fork,
        runs::pause, runs::resume, runs::retry_now, runs::retry_compensation,
        replay::journal, replay::check_run, replay::check_journal, replay::check_in_flight,
        logs::read, workers::list, workers::drain, workers::remove, workers::metrics,
        admin::list_tokens, admin::issue_token, admin::revoke_token,
        webhooks::trigger, metrics::scrape,
    ),
    components(schemas(
        ErrorBody, ErrorDetail, Health, DefinitionView, StepShapeView, RunStatus, RunSummary, RunPage,
        RunDetail, ForkLink, ChildLink, StepState, StepView, AttemptView, CompensationView, JobView, TimerView,
        SignalWaitView, SignalView, BranchGroupView, BranchView, RequestView, EventView, StartRun,
        SendSignal, CancelRun, ForkRun, TokenView, IssueToken, IssuedTokenView, WorkerView, JobMetrics,
        LogChunkView, logs::LogStreamName, Login, WhoAmI, ReplayReportView, ReplayVerdictView,
        ReplayVerdictKind, PatchUseView, InFlightCheckView, replay::JournalFileBytes,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "runs", description = "Saga runs: start, list, inspect, follow and steer"),
        (name = "replay", description = "Replay checks of runs against the code, and their journals as files"),
        (name = "logs", description = "The logs of remote jobs"),
        (name = "workers", description = "The control plane's workers"),
        (name = "definitions", description = "Registered saga definitions"),
        (name = "tokens", description = "API tokens (admin)"),
        (name = "webhooks", description = "Runs started by webhook deliveries"),
        (name = "meta", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        // What every operation may answer besides its own responses, documented once here
        // rather than on each handler: a malformed request, and for those behind a token, the
        // token's refusals; for those with a body, the cap.
        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.post, &mut item.delete].into_iter().flatten() {
                let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
                let mut common =
                    vec![("400", "A malformed request: a path, query or body that does not parse")];
                if secured {
                    common.push(("401", "No token, or one that is unknown, malformed or revoked"));
                    common.push(("403", "The token's role does not allow this"));
                }
                if operation.request_body.is_some() {
                    common.push(("413", "The body is over the cap (1 MiB)"));
                }
                for (status, description) in common {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error_response(description));
                }
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    RefOr::T(ResponseBuilder::new().description(description).content("application/json", content).build())
}

/// The document as served and committed: pretty JSON with a final newline.
pub fn openapi_document() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}

/// The OpenAPI document. Needs no token.
pub(crate) async fn openapi_json() -> Json<serde_json::Value> {
    Json(serde_json::to_value(ApiDoc::openapi()).unwrap_or_default())
}
