//! Human output: aligned tables, the run summary and the journal timeline. Pure functions of
//! the API's JSON to text, so that tests pin them from fixed JSON.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::model::{
    DefinitionView, EventView, InFlightCheckView, ReplayReportView, RunDetail, RunSummary, StepView,
    TokenView, WorkerView, is_final_event,
};
use crate::payload_shape;

/// ANSI colours, or none: only for a terminal, and never with `NO_COLOR` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const BLUE: &str = "34";
const DIM: &str = "2";
const BOLD: &str = "1";

impl Style {
    #[cfg(test)]
    pub const PLAIN: Style = Style { color: false };

    pub fn detect() -> Self {
        use std::io::IsTerminal;
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self { color: !no_color && std::io::stdout().is_terminal() }
    }

    fn paint(self, code: Option<&str>, text: &str) -> String {
        match code {
            Some(code) if self.color && !text.is_empty() => format!("\x1b[{code}m{text}\x1b[0m"),
            _ => text.to_owned(),
        }
    }

    pub fn bold(self, text: &str) -> String {
        self.paint(Some(BOLD), text)
    }
}

/// The colour of a run, step or event state.
fn state_color(state: &str) -> Option<&'static str> {
    match state {
        "completed" | "received" | "saga_completed" | "step_completed" | "compensation_completed" => {
            Some(GREEN)
        }
        "failed"
        | "compensation_failed"
        | "cancelled"
        | "timed_out"
        | "parked"
        | "saga_failed"
        | "saga_compensation_failed"
        | "step_failed"
        | "body_failed" => Some(RED),
        "compensated"
        | "compensating"
        | "paused"
        | "waiting_to_retry"
        | "waiting_for_version"
        | "waiting"
        | "saga_compensated"
        | "step_attempt_failed"
        | "cancel_requested"
        | "cancel_requested_by" => Some(YELLOW),
        "running" | "step_started" | "step_started_at" | "saga_started" => Some(BLUE),
        _ => None,
    }
}

/// A table cell: its text, and the colour it is painted with when colours are on.
#[derive(Debug, Clone)]
pub struct Cell {
    text: String,
    color: Option<&'static str>,
}

impl Cell {
    pub fn state(text: &str) -> Self {
        Self { text: text.to_owned(), color: state_color(text) }
    }

    fn dim(text: impl Into<String>) -> Self {
        Self { text: text.into(), color: Some(DIM) }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Self { text, color: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Self { text: text.to_owned(), color: None }
    }
}

/// Columns aligned on the widest cell (in characters); the last column is not padded, so no
/// line ends in spaces.
pub fn table(style: Style, headers: &[&str], rows: &[Vec<Cell>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.text.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<Cell> =
        headers.iter().map(|h| Cell { text: (*h).to_owned(), color: Some(BOLD) }).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(columns) {
            line.push_str(&style.paint(cell.color, &cell.text));
            if i + 1 < columns {
                let pad = widths[i] - cell.text.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `1.234s`, `350ms`, `3m04s`, `2h05m`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// `2026-12-07T09:30:00.125Z` as `2026-12-07 09:30:00.125`; anything else as it came.
pub fn time(at: &str) -> String {
    match at.strip_suffix('Z') {
        Some(rest) if rest.len() >= 19 && rest.as_bytes()[10] == b'T' => rest.replacen('T', " ", 1),
        _ => at.to_owned(),
    }
}

/// A JSON value on one line, cut to `max` characters.
pub fn compact(value: &Value, max: usize) -> String {
    let text = value.to_string();
    if text.chars().count() <= max {
        return text;
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// A time as the journal's event data holds it (milliseconds since the epoch), for people.
fn journal_time(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Number(n) => n.as_u64().map(|ms| time(&crate::clock::format_millis(ms))),
        Value::String(s) => Some(time(s)),
        _ => None,
    }
}

fn or_dash(text: Option<&str>) -> String {
    text.filter(|t| !t.is_empty()).unwrap_or("-").to_owned()
}

pub fn runs_table(style: Style, runs: &[RunSummary]) -> String {
    let rows: Vec<Vec<Cell>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.as_str().into(),
                r.definition.as_str().into(),
                r.version.to_string().into(),
                Cell::state(&r.status),
                time(&r.created_at).into(),
                time(&r.updated_at).into(),
            ]
        })
        .collect();
    table(style, &["ID", "DEFINITION", "VERSION", "STATUS", "CREATED", "UPDATED"], &rows)
}

pub fn definitions_table(style: Style, definitions: &[DefinitionView]) -> String {
    let rows: Vec<Vec<Cell>> = definitions
        .iter()
        .map(|d| {
            let steps: Vec<String> = d
                .steps
                .iter()
                .map(|s| match &s.compensation {
                    Some(undo) => format!("{} (undo: {undo})", s.name),
                    None => s.name.clone(),
                })
                .collect();
            let steps = if steps.is_empty() { Cell::dim("-") } else { steps.join(", ").into() };
            vec![d.name.as_str().into(), d.version.to_string().into(), steps]
        })
        .collect();
    table(style, &["NAME", "VERSION", "STEPS"], &rows)
}

pub fn workers_table(style: Style, workers: &[WorkerView]) -> String {
    let rows: Vec<Vec<Cell>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.as_str().into(),
                or_dash(w.provider.as_deref()).into(),
                if w.draining {
                    Cell::state(&format!("{} (draining)", w.state))
                } else {
                    Cell::state(&w.state)
                },
                or_dash(w.connected_since.as_deref().map(time).as_deref()).into(),
                or_dash(w.last_heard.as_deref().map(time).as_deref()).into(),
                if w.jobs.is_empty() { "-".into() } else { w.jobs.join(", ").into() },
            ]
        })
        .collect();
    table(style, &["ID", "PROVIDER", "STATE", "CONNECTED SINCE", "LAST HEARD", "JOBS"], &rows)
}

pub fn tokens_table(style: Style, tokens: &[TokenView]) -> String {
    let rows: Vec<Vec<Cell>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.as_str().into(),
                t.role.as_str().into(),
                time(&t.created_at).into(),
                if t.revoked { Cell { text: "revoked".into(), color: Some(RED) } } else { "live".into() },
            ]
        })
        .collect();
    table(style, &["NAME", "ROLE", "CREATED", "STATE"], &rows)
}

fn step_state(step: &StepView) -> String {
    match step.attempts.iter().rev().find_map(|a| a.retry_at.as_deref()) {
        Some(at) if step.state == "waiting_to_retry" => format!("waiting_to_retry (at {})", time(at)),
        _ => step.state.clone(),
    }
}

/// `runs get`: the run, its steps, what it waits for, and who did what.
pub fn run_detail(style: Style, run: &RunDetail) -> String {
    let mut out = String::new();
    let s = &run.summary;
    let field = |out: &mut String, name: &str, value: &str| {
        let _ = writeln!(out, "{}  {value}", style.bold(&format!("{name:<10}")));
    };
    field(&mut out, "Run", &s.id);
    field(&mut out, "Definition", &format!("{} v{}", s.definition, s.version));
    let status = match &s.reason {
        Some(reason) => format!("{} ({reason})", style.paint(state_color(&s.status), &s.status)),
        None => style.paint(state_color(&s.status), &s.status),
    };
    field(&mut out, "Status", &status);
    field(&mut out, "Created", &time(&s.created_at));
    field(&mut out, "Updated", &time(&s.updated_at));
    field(&mut out, "Input", &compact(&run.input, 200));
    if let Some(output) = &run.output {
        field(&mut out, "Output", &compact(output, 200));
    }
    if let Some(error) = &run.error {
        field(&mut out, "Error", &style.paint(Some(RED), error));
    }
    if let Some(from) = &run.forked_from {
        field(&mut out, "Forked", &format!("from run {} at step {}", from.run, from.step));
    }

    if !run.steps.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<Cell>> = run
            .steps
            .iter()
            .map(|step| {
                let jobs = match step.jobs.as_slice() {
                    [] => "-".to_owned(),
                    jobs => jobs
                        .iter()
                        .map(|j| format!("{} ({})", j.job_id, j.outcome.as_deref().unwrap_or("running")))
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                let compensation = match &step.compensation {
                    Some(c) if c.attempts > 1 => format!("{} ({} attempts)", c.state, c.attempts),
                    Some(c) => c.state.clone(),
                    None => "-".to_owned(),
                };
                vec![
                    step.step.to_string().into(),
                    step.name.as_str().into(),
                    Cell { color: state_color(&step.state), text: step_state(step) },
                    step.attempts.len().max(1).to_string().into(),
                    step.duration_ms.map_or_else(|| "-".to_owned(), duration).into(),
                    time(&step.started_at).into(),
                    Cell {
                        color: step.compensation.as_ref().and_then(|c| state_color(&c.state)),
                        text: compensation,
                    },
                    jobs.into(),
                ]
            })
            .collect();
        out.push_str(&table(
            style,
            &["STEP", "NAME", "STATE", "ATTEMPTS", "DURATION", "STARTED", "COMPENSATION", "JOBS"],
            &rows,
        ));
        for step in &run.steps {
            for attempt in step.attempts.iter().filter(|a| a.error.is_some()) {
                let _ = writeln!(
                    out,
                    "  step {} {} attempt {}: {}",
                    step.step,
                    step.name,
                    attempt.attempt,
                    attempt.error.as_deref().unwrap_or_default()
                );
            }
            if let Some(error) = step.compensation.as_ref().and_then(|c| c.error.as_deref()) {
                let _ = writeln!(out, "  step {} {} compensation: {error}", step.step, step.name);
            }
        }
    }

    let timers: Vec<String> = run
        .timers
        .iter()
        .filter(|t| !t.fired)
        .map(|t| format!("  timer {} fires at {}", t.key, time(&t.due)))
        .collect();
    let waits: Vec<String> = run
        .signal_waits
        .iter()
        .filter(|w| w.state == "waiting")
        .map(|w| {
            let line = match &w.timeout_at {
                Some(at) => format!("  signal `{}` (wait {}), gives up at {}", w.name, w.key, time(at)),
                None => format!("  signal `{}` (wait {})", w.name, w.key),
            };
            match &w.payload_schema {
                Some(schema) => format!("{line}\n    payload {}", payload_shape::summary(schema)),
                None => line,
            }
        })
        .collect();
    if !(timers.is_empty() && waits.is_empty()) {
        let _ = writeln!(out, "\n{}", style.bold("Waiting for"));
        for line in waits.iter().chain(&timers) {
            let _ = writeln!(out, "{line}");
        }
    }

    if !run.signals.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<Cell>> = run
            .signals
            .iter()
            .map(|sig| {
                vec![
                    sig.seq.to_string().into(),
                    sig.name.as_str().into(),
                    or_dash(sig.by.as_deref()).into(),
                    time(&sig.received_at).into(),
                    or_dash(sig.consumed_by.as_deref().map(|k| format!("wait {k}")).as_deref()).into(),
                    compact(&sig.payload, 60).into(),
                ]
            })
            .collect();
        out.push_str(&table(style, &["SIGNAL", "NAME", "BY", "RECEIVED", "TAKEN BY", "PAYLOAD"], &rows));
    }

    if !run.requests.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<Cell>> = run
            .requests
            .iter()
            .map(|r| {
                vec![
                    r.seq.to_string().into(),
                    time(&r.at).into(),
                    r.action.as_str().into(),
                    or_dash(r.by.as_deref()).into(),
                    or_dash(r.reason.as_deref()).into(),
                ]
            })
            .collect();
        out.push_str(&table(style, &["REQUEST", "AT", "ACTION", "BY", "REASON"], &rows));
    }

    if !run.forks.is_empty() {
        let _ = writeln!(out, "\n{}", style.bold("Forks"));
        for fork in &run.forks {
            let _ = writeln!(out, "  {} (from step {})", fork.run, fork.step);
        }
    }
    out
}

/// `ci-8: would park: step 2: the code now calls ...`: what a replay check found for one run.
pub fn verdict_line(style: Style, report: &ReplayReportView) -> String {
    let verdict = &report.verdict;
    let reason = || verdict.reason.as_deref().map(|reason| format!(": {reason}")).unwrap_or_default();
    let (color, kind, rest) = match (verdict.verdict.as_str(), &verdict.next) {
        ("clean", Some(next)) => (GREEN, "clean".to_owned(), format!("; next: {next}")),
        ("clean", None) => (GREEN, "clean".to_owned(), "; it ends on what it recorded".to_owned()),
        ("no_definition", _) => (
            RED,
            "no definition".to_owned(),
            format!(": {} v{} is not registered there", report.definition, report.version),
        ),
        // `would_park`, `stalled`, and verdicts this CLI does not know (newer servers).
        (other, _) => (RED, other.replace('_', " "), reason()),
    };
    format!("{}: {}{rest}", report.saga, style.paint(Some(color), &kind))
}

/// `runs replay`: the verdict line, then each patch the replay reached and the run's path there.
pub fn replay_report(style: Style, report: &ReplayReportView) -> String {
    let mut out = format!("{}\n", verdict_line(style, report));
    for patch in &report.patches {
        let path = if patch.new_path { "new path" } else { "old path" };
        let _ = writeln!(out, "  patch `{}` at key {}: {path}", patch.patch, patch.key);
    }
    out
}

/// `check`: a line per run in flight, how many would not go on, and for each patch the runs
/// reached, how many took each path (one no run took the old path of can be retired).
pub fn in_flight_check(style: Style, check: &InFlightCheckView) -> String {
    if check.runs.is_empty() {
        return "no runs in flight\n".to_owned();
    }
    let mut out: String =
        check.runs.iter().map(|report| format!("{}\n", verdict_line(style, report))).collect();
    let clean = check.runs.iter().filter(|report| report.verdict.is_clean()).count();
    let _ = writeln!(
        out,
        "{} run(s) in flight checked: {clean} clean, {} not clean",
        check.runs.len(),
        check.runs.len() - clean
    );
    // In the order the runs first reached them.
    let mut patches: Vec<(&str, usize, usize)> = Vec::new();
    for taken in check.runs.iter().flat_map(|report| &report.patches) {
        let at = match patches.iter().position(|(patch, ..)| *patch == taken.patch) {
            Some(at) => at,
            None => {
                patches.push((&taken.patch, 0, 0));
                patches.len() - 1
            }
        };
        if taken.new_path {
            patches[at].2 += 1;
        } else {
            patches[at].1 += 1;
        }
    }
    for (patch, old, new) in patches {
        let retire = if old == 0 { "; no run in flight needs its old path" } else { "" };
        let _ = writeln!(out, "patch `{patch}`: {old} run(s) on the old path, {new} on the new{retire}");
    }
    out
}

/// Renders journal events one line each; remembers step names, which later events give only
/// by number.
#[derive(Debug)]
pub struct Timeline {
    style: Style,
    steps: HashMap<u64, String>,
}

impl Timeline {
    pub fn new(style: Style) -> Self {
        Self { style, steps: HashMap::new() }
    }

    fn step_label(&self, data: &Value) -> String {
        let step = data.get("step").and_then(Value::as_u64);
        match step {
            Some(n) => match self.steps.get(&n) {
                Some(name) => format!("step {n} {name}"),
                None => format!("step {n}"),
            },
            None => String::new(),
        }
    }

    /// `#seq  time  type  details`.
    pub fn line(&mut self, event: &EventView) -> String {
        let d = &event.data;
        let text = |field: &str| d.get(field).and_then(Value::as_str).unwrap_or_default().to_owned();
        let by = || d.get("by").and_then(Value::as_str).map(|b| format!(" by {b}")).unwrap_or_default();
        if let (Some(step), Some(name)) =
            (d.get("step").and_then(Value::as_u64), d.get("name").and_then(Value::as_str))
            && event.kind.starts_with("step_started")
        {
            self.steps.insert(step, name.to_owned());
        }
        let details = match event.kind.as_str() {
            "saga_started" => format!(
                "{} v{} input {}",
                text("definition"),
                d.get("version").and_then(Value::as_u64).unwrap_or_default(),
                compact(d.get("input").unwrap_or(&Value::Null), 80)
            ),
            "step_started" | "step_started_at" => {
                format!(
                    "{} input {}",
                    self.step_label(d),
                    compact(d.get("input").unwrap_or(&Value::Null), 80)
                )
            }
            "step_completed" => {
                format!(
                    "{} output {}",
                    self.step_label(d),
                    compact(d.get("output").unwrap_or(&Value::Null), 80)
                )
            }
            "step_retried" | "compensation_started" => format!(
                "{} attempt {}",
                self.step_label(d),
                d.get("attempt").and_then(Value::as_u64).unwrap_or_default()
            ),
            "step_attempt_failed" | "compensation_attempt_failed" => format!(
                "{} attempt {}: {}{}",
                self.step_label(d),
                d.get("attempt").and_then(Value::as_u64).unwrap_or_default(),
                text("error"),
                journal_time(d.get("retry_at")).map(|at| format!(" (retry at {at})")).unwrap_or_default()
            ),
            "step_failed" | "compensation_failed" => format!("{}: {}", self.step_label(d), text("error")),
            "step_cancelled" => format!("{}: {}", self.step_label(d), text("reason")),
            "compensation_completed" => self.step_label(d),
            "saga_completed" => format!("output {}", compact(d.get("output").unwrap_or(&Value::Null), 80)),
            "saga_failed" | "saga_compensated" | "body_failed" => text("cause"),
            "saga_compensation_failed" => format!("{}: {}", self.step_label(d), text("error")),
            "cancel_requested" | "cancel_requested_by" => format!("{}{}", text("reason"), by()),
            "signal_received" | "signal_received_by" => format!(
                "`{}`{} payload {}",
                text("name"),
                by(),
                compact(d.get("payload").unwrap_or(&Value::Null), 60)
            ),
            "signal_wait_started" => format!("`{}` (wait {})", text("name"), text("key")),
            // The journal keeps the schema as JSON text.
            "signal_wait_expects" => {
                let schema = serde_json::from_str(&text("schema")).unwrap_or(Value::Null);
                format!("wait {} payload {}", text("key"), payload_shape::summary(&schema))
            }
            "signal_consumed" => format!(
                "wait {} took signal #{}",
                text("key"),
                d.get("signal").and_then(Value::as_u64).unwrap_or_default()
            ),
            "timer_started" => {
                format!("{} due {}", text("key"), journal_time(d.get("due")).unwrap_or_default())
            }
            "timer_fired" | "signal_wait_timed_out" => text("key"),
            // Kinds this CLI does not know (newer servers): their fields as JSON, with who asked
            // in words, since operator requests all carry it.
            _ => match d {
                Value::Object(map) => {
                    let rest: serde_json::Map<String, Value> =
                        map.iter().filter(|(k, _)| *k != "by").map(|(k, v)| (k.clone(), v.clone())).collect();
                    let rest =
                        if rest.is_empty() { String::new() } else { compact(&Value::Object(rest), 100) };
                    format!("{rest}{}", by()).trim_start().to_owned()
                }
                Value::Null => String::new(),
                other => compact(other, 100),
            },
        };
        let kind = format!("{:<24}", event.kind);
        let line = format!(
            "{:>5}  {}  {}  {}",
            format!("#{}", event.seq),
            self.style.paint(Some(DIM), &time(&event.at)),
            self.style.paint(state_color(&event.kind), &kind),
            details
        );
        line.trim_end().to_owned()
    }
}

/// `runs start --wait`: a line as each step starts and ends, and the run's end; nothing for the
/// journal's other entries.
pub fn progress_line(timeline: &mut Timeline, event: &EventView) -> Option<String> {
    let show = event.kind.starts_with("step_")
        || event.kind.starts_with("compensation_")
        || event.kind.starts_with("signal_wait")
        || is_final_event(&event.kind);
    // Always rendered, so that the timeline learns step names from lines it does not show.
    let line = timeline.line(event);
    show.then_some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_on_characters_and_leave_no_trailing_spaces() {
        let rows = vec![
            vec![Cell::from("deploy-1"), Cell::from("déploiement"), Cell::state("running")],
            vec![Cell::from("x"), Cell::from("b"), Cell::from("")],
        ];
        assert_eq!(
            table(Style::PLAIN, &["ID", "DEFINITION", "STATUS"], &rows),
            "ID        DEFINITION   STATUS\n\
             deploy-1  déploiement  running\n\
             x         b\n"
        );
    }

    #[test]
    fn colours_only_paint_and_never_shift_columns() {
        let rows = vec![vec![Cell::state("failed"), Cell::from("z")]];
        assert_eq!(
            table(Style { color: true }, &["S", "T"], &rows),
            "\x1b[1mS\x1b[0m       \x1b[1mT\x1b[0m\n\x1b[31mfailed\x1b[0m  z\n"
        );
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(duration(350), "350ms");
        assert_eq!(duration(1_234), "1.2s");
        assert_eq!(duration(184_000), "3m04s");
        assert_eq!(duration(7_500_000), "2h05m");
        assert_eq!(time("2026-12-07T09:30:00.125Z"), "2026-12-07 09:30:00.125");
        assert_eq!(time("yesterday"), "yesterday");
        assert_eq!(compact(&json!({"a": "bbbbbbbb"}), 10), "{\"a\":\"bbb…");
    }

    fn detail() -> RunDetail {
        serde_json::from_value(json!({
            "id": "deploy-7", "definition": "deploy", "version": 2, "status": "running",
            "created_at": "2026-12-07T09:30:00.000Z", "updated_at": "2026-12-07T09:30:02.500Z",
            "input": {"env": "prod"},
            "steps": [
                {"step": 1, "name": "build", "key": "1", "state": "completed", "input": null, "output": 3,
                 "started_at": "2026-12-07T09:30:00.100Z", "ended_at": "2026-12-07T09:30:01.300Z",
                 "duration_ms": 1200,
                 "attempts": [
                    {"attempt": 1, "started_at": "2026-12-07T09:30:00.100Z", "ended_at": "2026-12-07T09:30:00.200Z",
                     "error": "exit 1", "retry_at": "2026-12-07T09:30:00.700Z"},
                    {"attempt": 2, "started_at": "2026-12-07T09:30:00.700Z", "ended_at": "2026-12-07T09:30:01.300Z"}],
                 "jobs": [{"job_id": "deploy-7/1#1", "name": "build", "attempt": 1, "outcome": "exit 1",
                           "stdout_bytes": 10, "stderr_bytes": 0, "wall_time_ms": 90},
                          {"job_id": "deploy-7/1#2", "name": "build", "attempt": 2, "outcome": "exit 0",
                           "stdout_bytes": 10, "stderr_bytes": 0, "wall_time_ms": 500}]},
                {"step": 2, "name": "migrate", "key": "2", "state": "running", "input": null,
                 "started_at": "2026-12-07T09:30:01.400Z",
                 "attempts": [{"attempt": 1, "started_at": "2026-12-07T09:30:01.400Z"}],
                 "compensation": null, "jobs": []}
            ],
            "timers": [{"key": "3", "due": "2026-12-08T00:00:00.000Z", "fired": false},
                       {"key": "0.t", "due": "2026-12-07T00:00:00.000Z", "fired": true}],
            "signal_waits": [{"key": "4", "name": "approval", "state": "waiting",
                              "payload_schema": {"type": "object", "required": ["ok"],
                                                 "properties": {"ok": {"type": "boolean"}}}}],
            "signals": [{"seq": 9, "name": "approval", "payload": {"ok": true},
                         "received_at": "2026-12-07T09:30:02.000Z", "by": "alice", "consumed_by": "4"}],
            "branches": [], "forks": [{"run": "deploy-7b", "step": 2}],
            "requests": [{"seq": 8, "at": "2026-12-07T09:30:01.900Z", "action": "pause", "by": "bob"}],
            "something_new": {"ignored": true}
        }))
        .unwrap()
    }

    #[test]
    fn a_run_in_full() {
        let expected = "\
Run         deploy-7
Definition  deploy v2
Status      running
Created     2026-12-07 09:30:00.000
Updated     2026-12-07 09:30:02.500
Input       {\"env\":\"prod\"}

STEP  NAME     STATE      ATTEMPTS  DURATION  STARTED                  COMPENSATION  JOBS
1     build    completed  2         1.2s      2026-12-07 09:30:00.100  -             deploy-7/1#1 (exit 1), deploy-7/1#2 (exit 0)
2     migrate  running    1         -         2026-12-07 09:30:01.400  -             -
  step 1 build attempt 1: exit 1

Waiting for
  signal `approval` (wait 4)
    payload { ok: boolean }
  timer 3 fires at 2026-12-08 00:00:00.000

SIGNAL  NAME      BY     RECEIVED                 TAKEN BY  PAYLOAD
9       approval  alice  2026-12-07 09:30:02.000  wait 4    {\"ok\":true}

REQUEST  AT                       ACTION  BY   REASON
8        2026-12-07 09:30:01.900  pause   bob  -

Forks
  deploy-7b (from step 2)
";
        assert_eq!(run_detail(Style::PLAIN, &detail()), expected);
    }

    #[test]
    fn a_timeline_names_steps_and_who_acted() {
        let events: Vec<EventView> = serde_json::from_value(json!([
            {"seq": 0, "at": "2026-12-07T09:30:00.000Z", "type": "saga_started",
             "data": {"definition": "deploy", "version": 2, "input": {"env": "prod"}}},
            {"seq": 1, "at": "2026-12-07T09:30:00.100Z", "type": "step_started",
             "data": {"step": 1, "name": "build", "input": null, "compensable": false}},
            {"seq": 2, "at": "2026-12-07T09:30:00.200Z", "type": "step_attempt_failed",
             "data": {"step": 1, "attempt": 1, "error": "exit 1", "retry_at": 1796636400700u64}},
            {"seq": 3, "at": "2026-12-07T09:30:01.300Z", "type": "step_completed", "data": {"step": 1, "output": 3}},
            {"seq": 4, "at": "2026-12-07T09:30:01.500Z", "type": "signal_wait_expects",
             "data": {"key": "2", "schema": "{\"type\":\"object\",\"required\":[\"ok\"],\"properties\":{\"ok\":{\"type\":\"boolean\"}}}"}},
            {"seq": 5, "at": "2026-12-07T09:30:01.500Z", "type": "signal_wait_started",
             "data": {"key": "2", "name": "approval", "timeout_at": null}},
            {"seq": 6, "at": "2026-12-07T09:30:02.000Z", "type": "signal_received_by",
             "data": {"name": "approval", "payload": true, "by": "alice"}},
            {"seq": 7, "at": "2026-12-07T09:30:02.000Z", "type": "pause_requested", "data": {"by": "bob"}},
            {"seq": 8, "at": "2026-12-07T09:30:03.000Z", "type": "saga_completed", "data": {"output": "ok"}}
        ]))
        .unwrap();
        let mut timeline = Timeline::new(Style::PLAIN);
        let lines: Vec<String> = events.iter().map(|e| timeline.line(e)).collect();
        assert_eq!(
            lines,
            [
                "   #0  2026-12-07 09:30:00.000  saga_started              deploy v2 input {\"env\":\"prod\"}",
                "   #1  2026-12-07 09:30:00.100  step_started              step 1 build input null",
                "   #2  2026-12-07 09:30:00.200  step_attempt_failed       step 1 build attempt 1: exit 1 (retry at 2026-12-07 09:40:00.700)",
                "   #3  2026-12-07 09:30:01.300  step_completed            step 1 build output 3",
                "   #4  2026-12-07 09:30:01.500  signal_wait_expects       wait 2 payload { ok: boolean }",
                "   #5  2026-12-07 09:30:01.500  signal_wait_started       `approval` (wait 2)",
                "   #6  2026-12-07 09:30:02.000  signal_received_by        `approval` by alice payload true",
                "   #7  2026-12-07 09:30:02.000  pause_requested           by bob",
                "   #8  2026-12-07 09:30:03.000  saga_completed            output \"ok\"",
            ]
        );
    }

    fn reports() -> InFlightCheckView {
        serde_json::from_value(json!({"runs": [
            {"saga": "ci-7", "definition": "ci", "version": 3,
             "verdict": {"verdict": "clean", "next": "the wait for signal `approval`"},
             "patches": [{"patch": "scan-first", "key": "2", "new_path": true}]},
            {"saga": "ci-8", "definition": "ci", "version": 3,
             "verdict": {"verdict": "would_park",
                         "reason": "step 2: the code now calls `lint`, but the journal recorded `test` there"},
             "patches": [{"patch": "scan-first", "key": "2", "new_path": false}]},
            {"saga": "ci-9", "definition": "ci", "version": 2, "verdict": {"verdict": "no_definition"},
             "patches": []},
            {"saga": "ci-10", "definition": "ci", "version": 3, "verdict": {"verdict": "clean"},
             "patches": [{"patch": "cache", "key": "0", "new_path": true}]},
            {"saga": "ci-11", "definition": "ci", "version": 3,
             "verdict": {"verdict": "stalled", "reason": "the body waits on something not journaled"},
             "patches": []}
        ], "clean": 2, "not_clean": 3}))
        .unwrap()
    }

    #[test]
    fn a_replay_check_says_per_run_whether_it_goes_on_and_which_path_each_patch_took() {
        let check = reports();
        assert_eq!(
            replay_report(Style::PLAIN, &check.runs[1]),
            "ci-8: would park: step 2: the code now calls `lint`, but the journal recorded `test` there\n  \
             patch `scan-first` at key 2: old path\n"
        );
        assert_eq!(
            in_flight_check(Style::PLAIN, &check),
            "ci-7: clean; next: the wait for signal `approval`\n\
             ci-8: would park: step 2: the code now calls `lint`, but the journal recorded `test` there\n\
             ci-9: no definition: ci v2 is not registered there\n\
             ci-10: clean; it ends on what it recorded\n\
             ci-11: stalled: the body waits on something not journaled\n\
             5 run(s) in flight checked: 2 clean, 3 not clean\n\
             patch `scan-first`: 1 run(s) on the old path, 1 on the new\n\
             patch `cache`: 0 run(s) on the old path, 1 on the new; no run in flight needs its old path\n"
        );
        assert_eq!(
            in_flight_check(Style::PLAIN, &InFlightCheckView { runs: Vec::new() }),
            "no runs in flight\n"
        );
        // Colour marks the verdict only.
        assert_eq!(
            verdict_line(Style { color: true }, &check.runs[2]),
            "ci-9: \x1b[31mno definition\x1b[0m: ci v2 is not registered there"
        );
    }

    #[test]
    fn lists_from_fixed_json() {
        let runs: Vec<RunSummary> = serde_json::from_value(json!([
            {"id": "a", "definition": "deploy", "version": 1, "status": "completed",
             "created_at": "2026-12-07T09:30:00.000Z", "updated_at": "2026-12-07T09:31:00.000Z"},
            {"id": "bb", "definition": "deploy", "version": 12, "status": "parked", "reason": "code changed",
             "created_at": "2026-12-07T09:32:00.000Z", "updated_at": "2026-12-07T09:33:00.000Z"}
        ]))
        .unwrap();
        assert_eq!(
            runs_table(Style::PLAIN, &runs),
            "ID  DEFINITION  VERSION  STATUS     CREATED                  UPDATED\n\
             a   deploy      1        completed  2026-12-07 09:30:00.000  2026-12-07 09:31:00.000\n\
             bb  deploy      12       parked     2026-12-07 09:32:00.000  2026-12-07 09:33:00.000\n"
        );
        let definitions: Vec<DefinitionView> = serde_json::from_value(json!([
            {"name": "deploy", "version": 2, "steps": [{"name": "build"}, {"name": "push", "compensation": "unpush"}]},
            {"name": "adhoc", "version": 1, "steps": []}
        ]))
        .unwrap();
        assert_eq!(
            definitions_table(Style::PLAIN, &definitions),
            "NAME    VERSION  STEPS\ndeploy  2        build, push (undo: unpush)\nadhoc   1        -\n"
        );
        let tokens: Vec<TokenView> = serde_json::from_value(json!([
            {"name": "admin", "role": "admin", "created_at": "2026-12-07T09:00:00.000Z", "revoked": false},
            {"name": "ci", "role": "operator", "created_at": "2026-12-07T10:00:00.000Z", "revoked": true}
        ]))
        .unwrap();
        assert_eq!(
            tokens_table(Style::PLAIN, &tokens),
            "NAME   ROLE      CREATED                  STATE\n\
             admin  admin     2026-12-07 09:00:00.000  live\n\
             ci     operator  2026-12-07 10:00:00.000  revoked\n"
        );
    }
}
