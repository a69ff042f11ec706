//! A run as the API shows it, read from its summary record and its journal.

use std::collections::BTreeMap;

use hodei_core::{Event, RecordedEvent, SagaRecord, SagaStatus};
use serde_json::{Map, Value};

use super::model::{
    AttemptView, BranchGroupView, BranchView, ChildLink, CompensationView, EventView, ForkLink, RequestView,
    RunDetail, RunStatus, RunSummary, SignalView, SignalWaitView, StepState, StepView, TimerView,
};
use super::time::format_millis;

/// The fields of journal events that hold user payloads.
const PAYLOAD_FIELDS: [&str; 3] = ["input", "output", "payload"];

/// A user payload as JSON. One the API cannot read (a legacy bincode payload, journaled before
/// payloads were JSON, which only its Rust type can decode) is shown as
/// `{"$unreadable": "<why>"}`, never guessed at.
pub(crate) fn payload_json(bytes: &[u8]) -> Value {
    hodei_core::payload_to_json(bytes).unwrap_or_else(|e| serde_json::json!({ "$unreadable": e.to_string() }))
}

pub(crate) fn status_of(status: &SagaStatus) -> (RunStatus, Option<String>) {
    match status {
        SagaStatus::Running => (RunStatus::Running, None),
        SagaStatus::Paused => (RunStatus::Paused, None),
        SagaStatus::Compensating => (RunStatus::Compensating, None),
        SagaStatus::Parked { reason } => (RunStatus::Parked, Some(reason.clone())),
        SagaStatus::WaitingForVersion => (RunStatus::WaitingForVersion, None),
        SagaStatus::Completed => (RunStatus::Completed, None),
        SagaStatus::Compensated => (RunStatus::Compensated, None),
        SagaStatus::CompensationFailed => (RunStatus::CompensationFailed, None),
        SagaStatus::Failed => (RunStatus::Failed, None),
        // A status this build does not know yet: shown as running, with its debug form.
        other => (RunStatus::Running, Some(format!("{other:?}"))),
    }
}

/// The engine's status kind for a filter on `status`.
pub(crate) fn engine_status(status: RunStatus) -> SagaStatus {
    match status {
        RunStatus::Running => SagaStatus::Running,
        RunStatus::Paused => SagaStatus::Paused,
        RunStatus::Compensating => SagaStatus::Compensating,
        RunStatus::Parked => SagaStatus::Parked { reason: String::new() },
        RunStatus::WaitingForVersion => SagaStatus::WaitingForVersion,
        RunStatus::Completed => SagaStatus::Completed,
        RunStatus::Compensated => SagaStatus::Compensated,
        RunStatus::CompensationFailed => SagaStatus::CompensationFailed,
        RunStatus::Failed => SagaStatus::Failed,
    }
}

pub(crate) fn summary(record: &SagaRecord) -> RunSummary {
    let (status, reason) = status_of(&record.status);
    RunSummary {
        id: record.id.to_string(),
        definition: record.definition.clone(),
        version: record.version,
        status,
        reason,
        created_at: format_millis(record.created_at.0),
        updated_at: format_millis(record.updated_at.0),
    }
}

/// One journal entry as JSON: its variant's name in snake case, and its fields with payloads
/// decoded. Generic over the variants, so events added later show without a change here.
pub(crate) fn event_view(recorded: &RecordedEvent) -> EventView {
    let (kind, data) = match serde_json::to_value(&recorded.event) {
        Ok(Value::Object(map)) if map.len() == 1 => {
            let Some((name, fields)) = map.into_iter().next() else { unreachable!("one entry") };
            (snake_case(&name), decode_payloads(fields))
        }
        Ok(Value::String(name)) => (snake_case(&name), Value::Object(Map::new())),
        Ok(other) => ("unknown".to_owned(), other),
        Err(error) => ("unknown".to_owned(), Value::String(error.to_string())),
    };
    EventView { seq: recorded.seq, at: format_millis(recorded.at.0), kind, data }
}

fn decode_payloads(fields: Value) -> Value {
    let Value::Object(mut map) = fields else { return fields };
    for field in PAYLOAD_FIELDS {
        if let Some(Value::Array(items)) = map.get(field) {
            let bytes: Option<Vec<u8>> =
                items.iter().map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok())).collect();
            if let Some(bytes) = bytes {
                map.insert(field.to_owned(), payload_json(&bytes));
            }
        }
    }
    Value::Object(map)
}

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Everything the journal says about a run.
pub(crate) fn run_detail(record: &SagaRecord, history: &[RecordedEvent]) -> RunDetail {
    let mut detail = RunDetail {
        summary: summary(record),
        input: Value::Null,
        output: None,
        error: None,
        steps: Vec::new(),
        timers: Vec::new(),
        signal_waits: Vec::new(),
        signals: Vec::new(),
        branches: Vec::new(),
        forked_from: None,
        forks: Vec::new(),
        requests: Vec::new(),
        children: Vec::new(),
        journal_length: history.len() as u64,
    };
    // Step number -> index in `detail.steps`.
    let mut steps: BTreeMap<u32, usize> = BTreeMap::new();
    // Operation key -> the payload schema journaled just before its wait started.
    let mut expected: BTreeMap<&str, Value> = BTreeMap::new();
    for recorded in history {
        let at = format_millis(recorded.at.0);
        match &recorded.event {
            Event::SagaStarted { input, .. } => detail.input = payload_json(input),
            Event::StepStarted { step, name, input, .. } | Event::StepStartedAt { step, name, input, .. } => {
                let key = match &recorded.event {
                    Event::StepStartedAt { key, .. } => key.clone(),
                    _ => step.to_string(),
                };
                steps.insert(*step, detail.steps.len());
                detail.steps.push(StepView {
                    step: *step,
                    name: name.clone(),
                    key,
                    state: StepState::Running,
                    input: payload_json(input),
                    output: None,
                    error: None,
                    started_at: at.clone(),
                    ended_at: None,
                    duration_ms: None,
                    attempts: vec![AttemptView {
                        attempt: 1,
                        started_at: at,
                        ended_at: None,
                        error: None,
                        retry_at: None,
                    }],
                    compensation: None,
                    jobs: Vec::new(),
                });
            }
            Event::StepRetried { step, attempt } => {
                if let Some(view) = step_mut(&mut detail, &steps, step) {
                    view.state = StepState::Running;
                    view.attempts.push(AttemptView {
                        attempt: *attempt,
                        started_at: at,
                        ended_at: None,
                        error: None,
                        retry_at: None,
                    });
                }
            }
            Event::StepAttemptFailed { step, attempt, error, retry_at } => {
                if let Some(view) = step_mut(&mut detail, &steps, step) {
                    view.state = StepState::WaitingToRetry;
                    if let Some(a) = view.attempts.iter_mut().find(|a| a.attempt == *attempt) {
                        a.ended_at = Some(at);
                        a.error = Some(error.clone());
                        a.retry_at = Some(format_millis(retry_at.0));
                    }
                }
            }
            Event::StepCompleted { step, output } => {
                if let Some(view) = step_mut(&mut detail, &steps, step) {
                    view.state = StepState::Completed;
                    view.output = Some(payload_json(output));
                    end_step(view, recorded, None);
                }
            }
            Event::StepFailed { step, error, .. } => {
                if let Some(view) = step_mut(&mut detail, &steps, step) {
                    view.state = StepState::Failed;
                    end_step(view, recorded, Some(error.clone()));
                }
            }
            Event::StepCancelled { step, reason } => {
                if let Some(view) = step_mut(&mut detail, &steps, step) {
                    view.state = StepState::Cancelled;
                    end_step(view, recorded, Some(reason.clone()));
                }
            }
            Event::CompensationStarted { step, attempt } => {
                if let Some(view) = step_mut(&mut detail, &steps, step) {
                    let compensation = view.compensation.get_or_insert_with(|| CompensationView {
                        state: "running".into(),
                        attempts: 0,
                        error: None,
                        started_at: at.clone(),
                        ended_at: None,
                    });
                    compensation.state = "running".into();
                    compensation.attempts = *attempt;
                    compensation.ended_at = None;
                }
            }
            Event::CompensationAttemptFailed { step, error, .. } => {
                if let Some(c) = step_mut(&mut detail, &steps, step).and_then(|v| v.compensation.as_mut()) {
                    c.error = Some(error.clone());
                }
            }
            Event::CompensationCompleted { step } => {
                if let Some(c) = step_mut(&mut detail, &steps, step).and_then(|v| v.compensation.as_mut()) {
                    c.state = "completed".into();
                    c.ended_at = Some(at);
                }
            }
            Event::CompensationFailed { step, error } => {
                if let Some(c) = step_mut(&mut detail, &steps, step).and_then(|v| v.compensation.as_mut()) {
                    c.state = "failed".into();
                    c.error = Some(error.clone());
                    c.ended_at = Some(at);
                }
            }
            Event::SagaCompleted { output } => detail.output = Some(payload_json(output)),
            Event::BodyFailed { cause } | Event::SagaFailed { cause } | Event::SagaCompensated { cause } => {
                detail.error = Some(cause.clone());
            }
            Event::SagaCompensationFailed { step, error, .. } => {
                detail.error = Some(format!("the compensation of step {step} failed: {error}"));
            }
            Event::CancelRequested { reason } => {
                detail.error = Some(format!("cancelled: {reason}"));
                detail.requests.push(request(recorded, "cancel", None, Some(reason.clone())));
            }
            Event::CancelRequestedBy { reason, by } => {
                detail.error = Some(format!("cancelled: {reason}"));
                detail.requests.push(request(recorded, "cancel", Some(by.clone()), Some(reason.clone())));
            }
            Event::Paused { by } => detail.requests.push(request(recorded, "pause", Some(by.clone()), None)),
            Event::Resumed { by } => {
                detail.requests.push(request(recorded, "resume", Some(by.clone()), None))
            }
            Event::RetryNowRequested { by } => {
                detail.requests.push(request(recorded, "retry_now", Some(by.clone()), None));
            }
            Event::CompensationRetryRequested { by } => {
                detail.requests.push(request(recorded, "retry_compensation", Some(by.clone()), None));
            }
            Event::TimerStarted { key, due } => detail.timers.push(TimerView {
                key: key.clone(),
                set_at: at,
                due: format_millis(due.0),
                fired: false,
            }),
            Event::TimerFired { key } => {
                if let Some(t) = detail.timers.iter_mut().find(|t| t.key == *key) {
                    t.fired = true;
                }
            }
            Event::SignalReceived { name, payload } => detail.signals.push(SignalView {
                seq: recorded.seq,
                name: name.clone(),
                payload: payload_json(payload),
                received_at: at,
                by: None,
                consumed_by: None,
            }),
            Event::SignalReceivedBy { name, payload, by } => detail.signals.push(SignalView {
                seq: recorded.seq,
                name: name.clone(),
                payload: payload_json(payload),
                received_at: at,
                by: Some(by.clone()),
                consumed_by: None,
            }),
            // A schema the API cannot read is left out: the wait still shows, with a JSON box.
            Event::SignalWaitExpects { key, schema } => {
                if let Ok(schema) = serde_json::from_str(schema) {
                    expected.insert(key, schema);
                }
            }
            Event::SignalWaitStarted { key, name, timeout_at } => detail.signal_waits.push(SignalWaitView {
                payload_schema: expected.remove(key.as_str()),
                key: key.clone(),
                started_at: at,
                ended_at: None,
                name: name.clone(),
                timeout_at: timeout_at.map(|t| format_millis(t.0)),
                state: "waiting".into(),
            }),
            Event::SignalConsumed { key, signal } => {
                if let Some(s) = detail.signals.iter_mut().find(|s| s.seq == *signal) {
                    s.consumed_by = Some(key.clone());
                }
                if let Some(w) = detail.signal_waits.iter_mut().find(|w| w.key == *key) {
                    w.state = "received".into();
                    w.ended_at = Some(at);
                }
            }
            Event::SignalWaitTimedOut { key } => {
                if let Some(w) = detail.signal_waits.iter_mut().find(|w| w.key == *key) {
                    w.state = "timed_out".into();
                    w.ended_at = Some(at);
                }
            }
            Event::BranchesStarted { key, name, count, mode } => detail.branches.push(BranchGroupView {
                key: key.clone(),
                name: name.clone(),
                count: *count,
                mode: format!("{mode:?}").to_lowercase(),
                finished: Vec::new(),
            }),
            Event::BranchFinished { key, branch, error } => {
                if let Some(g) = detail.branches.iter_mut().find(|g| g.key == *key) {
                    g.finished
                        .push(BranchView { branch: *branch, error: error.as_ref().map(|(e, _)| e.clone()) });
                }
            }
            Event::ForkedFrom { source, step } => {
                detail.forked_from = Some(ForkLink { run: source.to_string(), step: *step });
            }
            Event::Forked { fork, step } => {
                detail.forks.push(ForkLink { run: fork.to_string(), step: *step })
            }
            // Events added after this build: in the journal (`events`), not in the summary.
            _ => {}
        }
    }
    for step in &mut detail.steps {
        if let Some(child) = child_of(step) {
            detail.children.push(child);
        }
    }
    detail
}

/// The child saga a step runs, if it is a child-saga step (`child <definition>`, its input the
/// child's run): its inner input, a payload of its own, is shown as JSON too.
fn child_of(step: &mut StepView) -> Option<ChildLink> {
    let definition = step.name.strip_prefix("child ")?;
    let run = step.input.get("id")?.as_str()?.to_owned();
    if let Some(inner) = step.input.get_mut("input") {
        let bytes: Option<Vec<u8>> = inner
            .as_array()
            .and_then(|items| items.iter().map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok())).collect());
        if let Some(bytes) = bytes {
            *inner = payload_json(&bytes);
        }
    }
    Some(ChildLink { run, definition: definition.to_owned(), step: step.step })
}

fn request(
    recorded: &RecordedEvent,
    action: &str,
    by: Option<String>,
    reason: Option<String>,
) -> RequestView {
    RequestView { seq: recorded.seq, at: format_millis(recorded.at.0), action: action.to_owned(), by, reason }
}

fn step_mut<'a>(
    detail: &'a mut RunDetail,
    steps: &BTreeMap<u32, usize>,
    step: &u32,
) -> Option<&'a mut StepView> {
    steps.get(step).copied().map(|i| &mut detail.steps[i])
}

fn end_step(view: &mut StepView, recorded: &RecordedEvent, error: Option<String>) {
    let at = format_millis(recorded.at.0);
    if let Some(last) = view.attempts.last_mut().filter(|a| a.ended_at.is_none()) {
        last.ended_at = Some(at.clone());
        last.error.clone_from(&error);
    }
    view.error = error;
    view.ended_at = Some(at);
    view.duration_ms =
        super::time::parse_millis(&view.started_at).ok().map(|s| recorded.at.0.saturating_sub(s));
}
