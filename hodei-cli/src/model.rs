//! The operator API's JSON, as this client reads it (hodei-server's `api::model`).
//!
//! Mirrored rather than imported so that the CLI does not build the control plane. Unknown
//! fields are ignored and statuses are plain strings, so a newer server's additions show up in
//! `-o json` and never break the human output.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
pub struct DefinitionView {
    pub name: String,
    pub version: u32,
    #[serde(default)]
    pub steps: Vec<StepShapeView>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StepShapeView {
    pub name: String,
    #[serde(default)]
    pub compensation: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunSummary {
    pub id: String,
    pub definition: String,
    pub version: u32,
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub updated_at: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunPage {
    pub runs: Vec<RunSummary>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepView>,
    #[serde(default)]
    pub timers: Vec<TimerView>,
    #[serde(default)]
    pub signal_waits: Vec<SignalWaitView>,
    #[serde(default)]
    pub signals: Vec<SignalView>,
    #[serde(default)]
    pub forked_from: Option<ForkLink>,
    #[serde(default)]
    pub forks: Vec<ForkLink>,
    #[serde(default)]
    pub requests: Vec<RequestView>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ForkLink {
    pub run: String,
    pub step: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StepView {
    pub step: u32,
    pub name: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub started_at: String,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub attempts: Vec<AttemptView>,
    #[serde(default)]
    pub compensation: Option<CompensationView>,
    #[serde(default)]
    pub jobs: Vec<JobView>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AttemptView {
    pub attempt: u32,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub retry_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompensationView {
    pub state: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JobView {
    pub job_id: String,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub outcome: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TimerView {
    pub key: String,
    pub due: String,
    #[serde(default)]
    pub fired: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SignalWaitView {
    pub key: String,
    pub name: String,
    #[serde(default)]
    pub timeout_at: Option<String>,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub payload_schema: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SignalView {
    pub seq: u64,
    pub name: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub received_at: String,
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub consumed_by: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RequestView {
    pub seq: u64,
    #[serde(default)]
    pub at: String,
    pub action: String,
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EventView {
    pub seq: u64,
    #[serde(default)]
    pub at: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub role: String,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IssuedTokenView {
    #[serde(flatten)]
    pub token: TokenView,
    pub secret: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerView {
    pub id: String,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub connected_since: Option<String>,
    #[serde(default)]
    pub last_heard: Option<String>,
    #[serde(default)]
    pub jobs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogChunkView {
    pub next_offset: u64,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub closed: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReplayReportView {
    pub saga: String,
    pub definition: String,
    pub version: u32,
    pub verdict: ReplayVerdictView,
    #[serde(default)]
    pub patches: Vec<PatchUseView>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReplayVerdictView {
    /// `clean`, `would_park`, `no_definition` or `stalled`.
    pub verdict: String,
    #[serde(default)]
    pub next: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl ReplayVerdictView {
    /// Whether the run would go on: any other verdict, known or not, would not.
    pub fn is_clean(&self) -> bool {
        self.verdict == "clean"
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PatchUseView {
    pub patch: String,
    pub key: String,
    pub new_path: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InFlightCheckView {
    pub runs: Vec<ReplayReportView>,
}

/// The statuses a run ends in.
pub fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "compensated" | "compensation_failed" | "failed")
}

/// The journal events a run ends with (the follow stream closes after one).
pub fn is_final_event(kind: &str) -> bool {
    matches!(kind, "saga_completed" | "saga_failed" | "saga_compensated" | "saga_compensation_failed")
}
