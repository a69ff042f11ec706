//! The API's JSON bodies: what it answers and what it takes. These are the contract the
//! OpenAPI document describes; the engine's own types stay behind them.
//!
//! Times are RFC 3339 in UTC with milliseconds (`2026-12-07T09:30:00.125Z`); user payloads
//! (inputs, outputs, signal payloads) are JSON values.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// The server is up.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// A registered saga definition.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DefinitionView {
    /// Its name: what runs are started by.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// The step calls in source order, for definitions made with `#[saga]`; empty otherwise.
    pub steps: Vec<StepShapeView>,
}

/// One step call in a definition's static shape.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepShapeView {
    /// The step's name.
    pub name: String,
    /// Its compensation, as written in the code.
    pub compensation: Option<String>,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Running its body.
    Running,
    /// Paused by an operator: it waits before its next step.
    Paused,
    /// Running its compensations.
    Compensating,
    /// Stopped because its code no longer matches its journal (see `reason`).
    Parked,
    /// Its definition version is not registered in this process.
    WaitingForVersion,
    /// Final: completed.
    Completed,
    /// Final: failed, then fully compensated.
    Compensated,
    /// Final: a compensation failed; an operator must act.
    CompensationFailed,
    /// Final: failed with nothing to compensate.
    Failed,
}

impl RunStatus {
    /// Whether the run has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::CompensationFailed | Self::Failed)
    }
}

/// A run, as lists show it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunSummary {
    /// The run's id (its idempotency key).
    pub id: String,
    /// The definition it runs.
    pub definition: String,
    /// The definition version it runs.
    pub version: u32,
    /// Where it stands.
    pub status: RunStatus,
    /// Why it is parked, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was started.
    pub created_at: String,
    /// When its status last changed.
    pub updated_at: String,
}

/// One page of runs, in id order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunPage {
    /// The runs on this page.
    pub runs: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters and paging of `GET /api/v1/runs`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunQuery {
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Only runs of this definition.
    pub definition: Option<String>,
    /// Only runs of this definition version.
    pub version: Option<u32>,
    /// Only runs started at or after this time (RFC 3339).
    pub created_after: Option<String>,
    /// Only runs started before this time (RFC 3339).
    pub created_before: Option<String>,
    /// Only runs whose id contains this text.
    pub q: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Runs per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// Instead of a page, keep the response open and send, as server-sent events (`run`, a
    /// `RunSummary`), each run that starts or changes status and matches the filters. After a
    /// `lagged` event some changes were missed: list again.
    pub follow: Option<bool>,
}

/// A run with everything that happened in it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunDetail {
    /// The run's summary.
    #[serde(flatten)]
    pub summary: RunSummary,
    /// Its input.
    pub input: Value,
    /// Its output, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed, was compensated or cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its steps, in the order they started.
    pub steps: Vec<StepView>,
    /// Its durable timers.
    pub timers: Vec<TimerView>,
    /// Its waits for signals.
    pub signal_waits: Vec<SignalWaitView>,
    /// The signals it received, consumed or still in its inbox.
    pub signals: Vec<SignalView>,
    /// Its groups of concurrent branches.
    pub branches: Vec<BranchGroupView>,
    /// The run it was forked from, with the first step it ran live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkLink>,
    /// The runs forked from it.
    pub forks: Vec<ForkLink>,
    /// Operator requests journaled against it (cancel, pause, resume, retries), in order.
    pub requests: Vec<RequestView>,
    /// The child sagas it started, each by the step that runs it.
    pub children: Vec<ChildLink>,
    /// How many entries its journal holds: follow its events with `after` one less to get
    /// only what comes after this view.
    pub journal_length: u64,
}

/// A child saga, started by a step of its parent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChildLink {
    /// The child run's id.
    pub run: String,
    /// Its definition.
    pub definition: String,
    /// The parent's step that runs it.
    pub step: u32,
}

/// A link between a run and its fork.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkLink {
    /// The other run.
    pub run: String,
    /// The step the fork ran live from.
    pub step: u32,
}

/// What a step is doing or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// An attempt runs.
    Running,
    /// An attempt failed; the next one is due at its `retry_at`.
    WaitingToRetry,
    /// Returned its output.
    Completed,
    /// Failed for good.
    Failed,
    /// Stopped by a cancel.
    Cancelled,
}

/// One step of a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepView {
    /// Its number, unique in the run.
    pub step: u32,
    /// Its name.
    pub name: String,
    /// Its operation key: its place in the saga's code.
    pub key: String,
    /// What it is doing or did.
    pub state: StepState,
    /// Its input.
    pub input: Value,
    /// Its output, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When its first attempt started.
    pub started_at: String,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// From start to end, once ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Every attempt.
    pub attempts: Vec<AttemptView>,
    /// Its compensation, once one started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CompensationView>,
    /// The remote jobs it ran (one per attempt), with a control plane.
    pub jobs: Vec<JobView>,
}

/// One attempt of a step.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// From 1.
    pub attempt: u32,
    /// When it started.
    pub started_at: String,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Its error, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next attempt is due, if it failed and may be retried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

/// A step's compensation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompensationView {
    /// `running`, `completed` or `failed`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Its last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it first started.
    pub started_at: String,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

/// A remote job a step ran on a worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// Its id: what its logs are found by.
    pub job_id: String,
    /// The step's name (`<name> rollback` for its rollback job).
    pub name: String,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The worker that runs it, while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// How it ended: `exit 0`, `signal 9`, `cancelled: ...`, `timed out`, `lost: ...`; absent
    /// while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Its exit code, if it exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Bytes of stdout and stderr it wrote.
    pub stdout_bytes: u64,
    /// Bytes of stderr.
    pub stderr_bytes: u64,
    /// Its run time.
    pub wall_time_ms: u64,
}

/// A durable timer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TimerView {
    /// Its operation key.
    pub key: String,
    /// When it was set.
    pub set_at: String,
    /// When it fires.
    pub due: String,
    /// Whether it fired.
    pub fired: bool,
}

/// A wait for a signal.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SignalWaitView {
    /// Its operation key.
    pub key: String,
    /// When the wait began.
    pub started_at: String,
    /// When it took its signal or timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// The signal it waits for.
    pub name: String,
    /// When it gives up, if it has a timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_at: Option<String>,
    /// `waiting`, `received` or `timed_out`.
    pub state: String,
    /// The JSON Schema (draft 2020-12) of the payload the wait expects, traced from the type
    /// the saga reads it as; absent when that type could not be traced (for example
    /// `serde_json::Value`) or the wait was journaled before schemas were.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub payload_schema: Option<Value>,
}

/// A signal the run received.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SignalView {
    /// Its journal sequence number.
    pub seq: u64,
    /// Its name.
    pub name: String,
    /// Its payload.
    pub payload: Value,
    /// When it arrived.
    pub received_at: String,
    /// The token that sent it, when sent through the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The key of the wait that took it; absent while it waits in the inbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumed_by: Option<String>,
}

/// A group of concurrent branches.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BranchGroupView {
    /// Its operation key.
    pub key: String,
    /// Its name.
    pub name: String,
    /// How many branches.
    pub count: u32,
    /// `all` or `first`.
    pub mode: String,
    /// The branches that finished, in the order they did.
    pub finished: Vec<BranchView>,
}

/// A finished branch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BranchView {
    /// Its index.
    pub branch: u32,
    /// Its error, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An operator request journaled against a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RequestView {
    /// Its journal sequence number.
    pub seq: u64,
    /// When it was journaled.
    pub at: String,
    /// What was asked: `cancel`, `pause`, `resume`, `retry_now`, `retry_compensation`.
    pub action: String,
    /// The token that asked, when asked through the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The reason given, for a cancel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One journal entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// Its place in the run's journal, from 0.
    pub seq: u64,
    /// When it was written.
    pub at: String,
    /// Its kind, in snake case: `saga_started`, `step_started`, `step_completed`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Its fields; payloads as JSON.
    pub data: Value,
}

/// The journal from a sequence number on.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only entries after this sequence number.
    pub after: Option<u64>,
    /// Keep the response open and send new entries as server-sent events (`text/event-stream`,
    /// each event's id its sequence number, so a reconnect with `Last-Event-ID` resumes).
    pub follow: Option<bool>,
}

/// Starts a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StartRun {
    /// The definition to run.
    pub definition: String,
    /// The run's id: starting the same id again with the same input returns that run.
    pub id: String,
    /// The definition's input.
    #[serde(default)]
    pub input: Value,
}

/// Sends a signal (an approval is a signal).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SendSignal {
    /// The signal's name.
    pub name: String,
    /// Its payload, as the waiting code reads it.
    #[serde(default)]
    pub payload: Value,
}

/// Cancels a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CancelRun {
    /// Why; journaled.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Forks a run (finished, parked, or waiting for its version) into a new one that reuses what it
/// recorded before `from_step`, on `version` of its definition. A parked or waiting run is moved:
/// it ends `failed`, "moved to fork ...", and the fork carries on in its place.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkRun {
    /// The new run's id.
    pub id: String,
    /// The first step the fork runs live; absent: the first step the run started after the last
    /// top-level step it completed (for a run that failed in a step, that step), or, if it started
    /// none after it, the end of its journal. Required for a completed run.
    #[serde(default)]
    pub from_step: Option<u32>,
    /// The definition version the fork runs; absent: the run's own version if it is registered,
    /// else the newest registered one.
    #[serde(default)]
    pub version: Option<u32>,
}

/// An API token as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Its name: what the journal records as who did something.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// When it was issued.
    pub created_at: String,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// Issues a token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IssueToken {
    /// 1 to 64 ASCII letters, digits, `-`, `_` or `.`.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
}

/// A token just issued: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IssuedTokenView {
    /// Its entry.
    #[serde(flatten)]
    pub token: TokenView,
    /// The bearer token.
    pub secret: String,
}

/// A worker the control plane holds or that is connected.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// The provider that started it, if the scheduler holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Drained by an operator: it takes no new job and goes once its job ends.
    pub draining: bool,
    /// Its provider's labels, which jobs are matched against.
    pub labels: std::collections::BTreeMap<String, String>,
    /// When its last message (a heartbeat at the least) arrived, while connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heard: Option<String>,
    /// `connected` (a session is open) or `provisioned` (started, not connected).
    pub state: String,
    /// Since when its session is open, while connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// The jobs it runs now.
    pub jobs: Vec<String>,
    /// The latest resource sample of each job it runs.
    pub metrics: Vec<JobMetrics>,
}

/// A resource sample of a running job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobMetrics {
    /// The job.
    pub job_id: String,
    /// The worker that runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When it was taken.
    pub at: String,
    /// CPU time used so far, in microseconds.
    pub cpu_usage_usec: u64,
    /// Memory in use.
    pub memory_current_bytes: u64,
    /// The peak of memory use.
    pub memory_peak_bytes: u64,
}

/// Reads a job's log.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The byte offset to read from (default 0).
    pub offset: Option<u64>,
    /// At most this many bytes (default and maximum 1 MiB); ignored when following.
    pub limit: Option<u32>,
    /// Keep the response open and send new output as server-sent events until the log is
    /// closed; each event's id is the offset after it, so a reconnect with `Last-Event-ID`
    /// resumes with no gap and no duplicate.
    pub follow: Option<bool>,
}

/// Bytes of a job's log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogChunkView {
    /// The offset of the first byte.
    pub offset: u64,
    /// Where the next read continues.
    pub next_offset: u64,
    /// The bytes as text (invalid UTF-8 replaced; a character cut by the end of the chunk is
    /// left for the next).
    pub text: String,
    /// Whether the log is closed and this is its end.
    pub closed: bool,
}

/// Logs in: the token to hold in the session cookie.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Login {
    /// An API token (`hodei_...`).
    pub token: String,
}

/// Who the request's token is.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name: what the journal records as who did something.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
}

/// What a replay check found for one run: its journal replayed on the server's code, with
/// nothing run and nothing written.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReplayReportView {
    /// The run's id.
    pub saga: String,
    /// Its definition's name.
    pub definition: String,
    /// The definition version its journal records.
    pub version: u32,
    /// Whether the run would go on, and if not, why.
    pub verdict: ReplayVerdictView,
    /// Each `patched` call the replay reached, with the path the run took there.
    pub patches: Vec<PatchUseView>,
}

/// Whether a run's journal fits the code.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReplayVerdictView {
    /// What the replay found.
    pub verdict: ReplayVerdictKind,
    /// For `clean`: the first operation the run would run live, such as "step `deploy`" or
    /// "the wait for signal `approval`"; absent when it ends on what its journal records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    /// For `would_park`: the park reason, word for word; for `stalled`: where the replay
    /// stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The kinds of replay verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplayVerdictKind {
    /// The code reaches every recorded operation as recorded: the run goes on.
    Clean,
    /// The run would park: its code no longer matches its journal (see `reason`).
    WouldPark,
    /// No definition of the run's name and version is registered: it would wait for one.
    NoDefinition,
    /// The replay did not reach the end of the journal: the body waits on something that is
    /// neither journaled nor an operation (see `reason`).
    Stalled,
}

/// A `patched` call a replay reached.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PatchUseView {
    /// The patch's id.
    pub patch: String,
    /// The operation key that follows the call.
    pub key: String,
    /// Whether the run took the new path there (`false`: it recorded the old code's path).
    pub new_path: bool,
}

/// Every run in flight, checked: whether each would go on on the server's code.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InFlightCheckView {
    /// One report per run in flight (running, paused, compensating, parked or waiting for its
    /// version), in id order.
    pub runs: Vec<ReplayReportView>,
    /// How many would go on (`clean`).
    pub clean: u32,
    /// How many would not: they would park, wait for their version, or stall.
    pub not_clean: u32,
}
