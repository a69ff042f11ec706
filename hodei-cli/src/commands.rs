//! What each command does: requests, then output.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cli::{
    Cli, Command, ExportArgs, Jobs, ListArgs, Output, ReplayArgs, RunStatus, Runs, StartArgs, Tokens, Workers,
};
use crate::client::{Client, Download, Next};
use crate::clock;
use crate::error::{CliError, Result, exit};
use crate::model::{
    DefinitionView, EventView, InFlightCheckView, IssuedTokenView, JobView, LogChunkView, ReplayReportView,
    RunDetail, RunPage, RunSummary, TokenView, WorkerView, is_final, is_final_event,
};
use crate::render::{self, Style, Timeline};
use crate::settings::{self, System};
use crate::sse::SseEvent;

/// The most runs one request asks for: the API's own page limit.
const MAX_PAGE: u64 = 1000;
/// While following a run that is quiet, how often to check whether it got stuck (parked).
const IDLE_CHECK: Duration = Duration::from_secs(10);
/// How often `logs -f` looks for the run's next job once it has shown every job it knows.
const JOB_POLL: Duration = Duration::from_secs(1);

struct Ctx {
    client: Client,
    output: Output,
    style: Style,
}

pub async fn run(cli: Cli) -> Result<u8> {
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut buffer = Vec::new();
        clap_complete::generate(shell, &mut command, "hodei", &mut buffer);
        emit_bytes(&buffer)?;
        return Ok(exit::OK);
    }
    let settings = settings::resolve(&cli.connection.flags(), &System)?;
    let ctx = Ctx { client: Client::new(&settings)?, output: cli.output, style: Style::detect() };
    match cli.command {
        Command::Completions { .. } => Ok(exit::OK),
        Command::Definitions => {
            let value = ctx.client.get(&["definitions"], &[]).await?;
            ctx.show::<Vec<DefinitionView>>(&value, |style, defs| render::definitions_table(style, defs))?;
            Ok(exit::OK)
        }
        Command::Workers { action: Some(Workers::Drain { id }) } => {
            ctx.client.post(&["workers", &id, "drain"], &json!({})).await?;
            ctx.done(&format!("draining worker `{id}`: no new jobs; it goes once its job ends"))?;
            Ok(exit::OK)
        }
        Command::Workers { action: Some(Workers::Remove { id }) } => {
            ctx.client.call(Method::DELETE, ctx.client.url(&["workers", &id], &[]), None).await?;
            ctx.done(&format!("removing worker `{id}`"))?;
            Ok(exit::OK)
        }
        Command::Workers { action: None | Some(Workers::List) } => {
            let value = ctx.client.get(&["workers"], &[]).await?;
            ctx.show::<Vec<WorkerView>>(&value, |style, workers| {
                if workers.is_empty() {
                    "no workers\n".to_owned()
                } else {
                    render::workers_table(style, workers)
                }
            })?;
            Ok(exit::OK)
        }
        Command::Tokens(tokens) => tokens_command(&ctx, tokens).await,
        Command::Jobs(Jobs::Logs { job, stderr, follow }) => {
            let stream = if stderr { "stderr" } else { "stdout" };
            if follow {
                follow_log(&ctx, &job, stream).await?;
            } else {
                read_log(&ctx, &job, stream).await?;
            }
            Ok(exit::OK)
        }
        Command::Runs(runs) => runs_command(&ctx, runs).await,
        Command::Check => check(&ctx).await,
    }
}

impl Ctx {
    /// Prints the API's JSON as it came, or its human rendering.
    fn show<T: DeserializeOwned>(
        &self,
        value: &Value,
        human: impl FnOnce(Style, &T) -> String,
    ) -> Result<()> {
        match self.output {
            Output::Json => emit(&format!("{}\n", pretty(value))),
            Output::Human => emit(&human(self.style, &parse::<T>(value)?)),
        }
    }

    /// A one-line confirmation for people; nothing for scripts, which have the exit code.
    fn done(&self, message: &str) -> Result<()> {
        match self.output {
            Output::Json => Ok(()),
            Output::Human => emit(&format!("{message}\n")),
        }
    }
}

async fn tokens_command(ctx: &Ctx, tokens: Tokens) -> Result<u8> {
    match tokens {
        Tokens::List => {
            let value = ctx.client.get(&["tokens"], &[]).await?;
            ctx.show::<Vec<TokenView>>(&value, |style, tokens| render::tokens_table(style, tokens))?;
        }
        Tokens::Issue { name, role } => {
            let value = ctx.client.post(&["tokens"], &json!({ "name": name, "role": role.as_str() })).await?;
            match ctx.output {
                Output::Json => emit(&format!("{}\n", pretty(&value)))?,
                Output::Human => {
                    let issued: IssuedTokenView = parse(&value)?;
                    // The secret alone on stdout, so that `$(hodei tokens issue ...)` captures it.
                    eprintln!(
                        "issued {} token `{}`; its secret is shown only now:",
                        issued.token.role, issued.token.name
                    );
                    emit(&format!("{}\n", issued.secret))?;
                }
            }
        }
        Tokens::Revoke { name } => {
            ctx.client.call(Method::DELETE, ctx.client.url(&["tokens", &name], &[]), None).await?;
            ctx.done(&format!("revoked token `{name}`"))?;
        }
    }
    Ok(exit::OK)
}

async fn runs_command(ctx: &Ctx, runs: Runs) -> Result<u8> {
    match runs {
        Runs::List(args) => list(ctx, args).await,
        Runs::Get { id } => {
            let value = ctx.client.get(&["runs", &id], &[]).await?;
            ctx.show::<RunDetail>(&value, render::run_detail)?;
            Ok(exit::OK)
        }
        Runs::Events { id, follow, after } => events(ctx, &id, follow, after).await,
        Runs::Logs { id, step, stderr, follow } => logs(ctx, &id, step.as_deref(), stderr, follow).await,
        Runs::Start(args) => start(ctx, args).await,
        Runs::Signal { id, name, payload } => {
            let payload = json_arg("--payload", payload.as_deref())?;
            ctx.client.post(&["runs", &id, "signals"], &json!({ "name": name, "payload": payload })).await?;
            ctx.done(&format!("sent signal `{name}` to run `{id}`"))?;
            Ok(exit::OK)
        }
        Runs::Approve { id, signal, payload } => {
            let payload = json_arg("--payload", payload.as_deref())?;
            ctx.client
                .post(&["runs", &id, "signals"], &json!({ "name": signal, "payload": payload }))
                .await?;
            ctx.done(&format!("approved run `{id}` (signal `{signal}`)"))?;
            Ok(exit::OK)
        }
        Runs::Cancel { id, reason } => {
            let body = match reason {
                Some(reason) => json!({ "reason": reason }),
                None => json!({}),
            };
            let value = ctx.client.post(&["runs", &id, "cancel"], &body).await?;
            // A parked run, or one waiting for its version, ends at once; the answer says how (an
            // older server answers nothing).
            let ended = serde_json::from_value::<RunSummary>(value).ok().filter(|run| is_final(&run.status));
            let message = match ended {
                Some(run) if run.status == "compensation_failed" => format!(
                    "cancelled run `{id}`: compensation_failed, compensations left undone (`hodei runs get \
                     {id}` says why; `hodei runs retry-compensation {id}` runs them)"
                ),
                Some(run) => format!("cancelled run `{id}`: {}", run.status),
                None => format!("cancelling run `{id}`: its started steps are compensated"),
            };
            ctx.done(&message)?;
            Ok(exit::OK)
        }
        Runs::Fork { id, new_id, from_step, version } => {
            let mut body = json!({ "id": new_id });
            if let Some(step) = from_step {
                body["from_step"] = json!(step);
            }
            if let Some(version) = version {
                body["version"] = json!(version);
            }
            let value = ctx.client.post(&["runs", &id, "fork"], &body).await?;
            ctx.show::<RunSummary>(&value, |_, fork| {
                format!("forked run `{id}` into `{}` (version {}, {})\n", fork.id, fork.version, fork.status)
            })?;
            Ok(exit::OK)
        }
        Runs::Retry { id } => verb(ctx, &id, "retry", "retrying the waiting attempt of").await,
        Runs::RetryCompensation { id } => {
            verb(ctx, &id, "retry-compensation", "retrying the failed compensation of").await
        }
        Runs::Pause { id } => verb(ctx, &id, "pause", "pausing").await,
        Runs::Resume { id } => verb(ctx, &id, "resume", "resuming").await,
        Runs::Export(args) => export(ctx, args).await,
        Runs::Replay(args) => replay(ctx, args).await,
    }
}

async fn verb(ctx: &Ctx, id: &str, path: &str, doing: &str) -> Result<u8> {
    ctx.client.call(Method::POST, ctx.client.url(&["runs", id, path], &[]), None).await?;
    ctx.done(&format!("{doing} run `{id}`"))?;
    Ok(exit::OK)
}

async fn list(ctx: &Ctx, args: ListArgs) -> Result<u8> {
    let now = clock::now_millis();
    let mut filters: Vec<(&str, String)> = Vec::new();
    if let Some(status) = args.status {
        filters.push(("status", status.as_str().to_owned()));
    }
    if let Some(definition) = args.definition {
        filters.push(("definition", definition));
    }
    if let Some(version) = args.version {
        filters.push(("version", version.to_string()));
    }
    if let Some(since) = &args.since {
        filters.push(("created_after", clock::since(since, now)?));
    }
    if let Some(until) = &args.until {
        filters.push(("created_before", clock::since(until, now)?));
    }
    let wanted = if args.all { u64::MAX } else { args.limit };
    let (runs, cursor) = fetch_runs(ctx, &filters, wanted).await?;
    match ctx.output {
        Output::Json => {
            let mut page = json!({ "runs": runs });
            if let Some(cursor) = &cursor {
                page["next_cursor"] = json!(cursor);
            }
            emit(&format!("{}\n", pretty(&page)))?;
        }
        Output::Human => {
            let page: RunPage = parse(&json!({ "runs": runs }))?;
            if page.runs.is_empty() {
                emit("no runs\n")?;
            } else {
                emit(&render::runs_table(ctx.style, &page.runs))?;
            }
            if cursor.is_some() {
                eprintln!("(more runs: raise --limit or use --all)");
            }
        }
    }
    Ok(exit::OK)
}

/// Up to `wanted` runs that match `filters`, page after page, as the API gave them, and the
/// cursor of the next page if there are more.
async fn fetch_runs(
    ctx: &Ctx,
    filters: &[(&str, String)],
    wanted: u64,
) -> Result<(Vec<Value>, Option<String>)> {
    let mut runs: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_size = (wanted - runs.len() as u64).min(MAX_PAGE);
        let mut query = filters.to_vec();
        query.push(("limit", page_size.to_string()));
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let page = ctx.client.get(&["runs"], &query).await?;
        let next = page.get("next_cursor").and_then(Value::as_str).map(str::to_owned);
        match page.get("runs") {
            Some(Value::Array(items)) => runs.extend(items.iter().cloned()),
            _ => {
                return Err(CliError::new(
                    "invalid_response",
                    "the server's page of runs has no `runs` list",
                ));
            }
        }
        cursor = next;
        if cursor.is_none() || runs.len() as u64 >= wanted {
            return Ok((runs, cursor));
        }
    }
}

fn json_arg(flag: &str, text: Option<&str>) -> Result<Value> {
    match text {
        None => Ok(Value::Null),
        Some(text) => {
            serde_json::from_str(text).map_err(|e| CliError::usage(format!("{flag} is not JSON: {e}")))
        }
    }
}

fn input_of(args: &StartArgs) -> Result<Value> {
    match (&args.input, &args.input_file) {
        (Some(text), _) => json_arg("--input", Some(text)),
        (None, Some(path)) => {
            let text = if path == Path::new("-") {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| CliError::usage(format!("cannot read the input from stdin: {e}")))?
            } else {
                std::fs::read_to_string(path)
                    .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?
            };
            serde_json::from_str(&text)
                .map_err(|e| CliError::usage(format!("{} is not JSON: {e}", path.display())))
        }
        (None, None) => Ok(Value::Null),
    }
}

async fn start(ctx: &Ctx, args: StartArgs) -> Result<u8> {
    let input = input_of(&args)?;
    let body = json!({ "definition": args.definition, "id": args.id, "input": input });
    let value = ctx.client.post(&["runs"], &body).await?;
    let run: RunSummary = parse(&value)?;
    if !args.wait {
        ctx.show::<RunSummary>(&value, |_, run| {
            format!("run `{}` of {} v{}: {}\n", run.id, run.definition, run.version, run.status)
        })?;
        return Ok(exit::OK);
    }
    if ctx.output == Output::Human {
        emit(&format!("run `{}` of {} v{}: {}\n", run.id, run.definition, run.version, run.status))?;
    }
    let mut timeline = Timeline::new(ctx.style);
    let human = ctx.output == Output::Human;
    follow_events(ctx, &run.id, None, true, |_, event| {
        if human && let Some(line) = render::progress_line(&mut timeline, event) {
            emit(&format!("{line}\n"))?;
        }
        Ok(())
    })
    .await?;
    let value = ctx.client.get(&["runs", &run.id], &[]).await?;
    let detail: RunDetail = parse(&value)?;
    let status = detail.summary.status.as_str();
    match ctx.output {
        Output::Json => emit(&format!("{}\n", pretty(&value)))?,
        Output::Human => {
            let outcome = match (&detail.output, &detail.error) {
                (Some(output), _) if status == "completed" => {
                    format!(": output {}", render::compact(output, 200))
                }
                (_, Some(error)) => format!(": {error}"),
                _ => detail.summary.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default(),
            };
            emit(&format!("run `{}` {status}{outcome}\n", run.id))?;
        }
    }
    Ok(if status == "completed" { exit::OK } else { exit::RUN_NOT_COMPLETED })
}

async fn events(ctx: &Ctx, id: &str, follow: bool, after: Option<u64>) -> Result<u8> {
    let mut timeline = Timeline::new(ctx.style);
    if !follow {
        let mut query = Vec::new();
        if let Some(after) = after {
            query.push(("after", after.to_string()));
        }
        let value = ctx.client.get(&["runs", id, "events"], &query).await?;
        ctx.show::<Vec<EventView>>(&value, |_, events| {
            events.iter().map(|e| format!("{}\n", timeline.line(e))).collect()
        })?;
        return Ok(exit::OK);
    }
    let output = ctx.output;
    follow_events(ctx, id, after, false, |raw, event| match output {
        Output::Json => emit(&format!("{raw}\n")),
        Output::Human => emit(&format!("{}\n", timeline.line(event))),
    })
    .await?;
    Ok(exit::OK)
}

async fn export(ctx: &Ctx, args: ExportArgs) -> Result<u8> {
    let exported = match (args.id, args.dir) {
        (Some(id), _) => {
            let journal = ctx.client.download(&["runs", &id, "journal"]).await?;
            if args.out.as_deref() == Some(Path::new("-")) {
                return emit_bytes(&journal.bytes).map(|()| exit::OK);
            }
            let path = match args.out {
                Some(path) => path,
                None => PathBuf::from(file_name(&id, &journal)?),
            };
            let exported = ExportedJournal::write(id, path, &journal.bytes)?;
            if ctx.output == Output::Human {
                emit(&format!(
                    "exported the journal of run `{}` to {} ({} bytes)\n",
                    exported.run, exported.file, exported.bytes
                ))?;
            }
            vec![exported]
        }
        (None, Some(dir)) => {
            let exported = export_in_flight(ctx, &dir).await?;
            if ctx.output == Output::Human {
                emit(&format!(
                    "exported the journals of {} run(s) in flight to {}\n",
                    exported.len(),
                    dir.display()
                ))?;
            }
            exported
        }
        // clap requires an id or --in-flight, and --in-flight requires --dir.
        (None, None) => return Err(CliError::usage("give a run's id, or --in-flight with --dir")),
    };
    if ctx.output == Output::Json {
        emit(&format!("{}\n", pretty(&json!({ "exported": exported }))))?;
    }
    Ok(exit::OK)
}

/// A journal file `runs export` wrote; `-o json` prints them as `{"exported": [...]}`.
#[derive(Debug, Serialize)]
struct ExportedJournal {
    run: String,
    file: String,
    bytes: usize,
}

impl ExportedJournal {
    fn write(run: String, path: PathBuf, bytes: &[u8]) -> Result<Self> {
        std::fs::write(&path, bytes)
            .map_err(|e| CliError::new("io", format!("cannot write {}: {e}", path.display())))?;
        Ok(Self { run, file: path.display().to_string(), bytes: bytes.len() })
    }
}

/// Writes the journal of every run in flight to `dir`, each in the file the server names it.
async fn export_in_flight(ctx: &Ctx, dir: &Path) -> Result<Vec<ExportedJournal>> {
    // A run that moves from one status to another while they are listed is listed twice, and
    // exported once.
    let mut ids: BTreeSet<String> = BTreeSet::new();
    for status in RunStatus::IN_FLIGHT {
        let (runs, _) = fetch_runs(ctx, &[("status", status.as_str().to_owned())], u64::MAX).await?;
        for run in runs {
            ids.insert(parse::<RunSummary>(&run)?.id);
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::new("io", format!("cannot create {}: {e}", dir.display())))?;
    let mut exported = Vec::new();
    for id in ids {
        let journal = ctx.client.download(&["runs", &id, "journal"]).await?;
        let path = dir.join(file_name(&id, &journal)?);
        exported.push(ExportedJournal::write(id, path, &journal.bytes)?);
    }
    Ok(exported)
}

/// The name the server gave run `id`'s journal file: `<id>.journal`, with what cannot be in a
/// file name percent-encoded.
fn file_name(id: &str, journal: &Download) -> Result<String> {
    journal.file_name.clone().ok_or_else(|| {
        CliError::new(
            "invalid_response",
            format!("the server gave no plain file name for the journal of run `{id}`; name one with --out"),
        )
    })
}

async fn replay(ctx: &Ctx, args: ReplayArgs) -> Result<u8> {
    let value = match (args.id, args.file) {
        (Some(id), _) => ctx.client.get(&["runs", &id, "replay"], &[]).await?,
        (None, Some(file)) => {
            let bytes = if file == Path::new("-") {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                    .map_err(|e| CliError::usage(format!("cannot read the journal from stdin: {e}")))?;
                bytes
            } else {
                std::fs::read(&file)
                    .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?
            };
            ctx.client.post_bytes(&["replay"], bytes).await?
        }
        // clap requires one of the two.
        (None, None) => return Err(CliError::usage("give a run's id, or a journal file with --file")),
    };
    let report: ReplayReportView = parse(&value)?;
    ctx.show::<ReplayReportView>(&value, render::replay_report)?;
    Ok(if report.verdict.is_clean() { exit::OK } else { exit::CHECK_NOT_CLEAN })
}

async fn check(ctx: &Ctx) -> Result<u8> {
    let value = ctx.client.get(&["check"], &[]).await?;
    let checked: InFlightCheckView = parse(&value)?;
    ctx.show::<InFlightCheckView>(&value, render::in_flight_check)?;
    let clean = checked.runs.iter().all(|report| report.verdict.is_clean());
    Ok(if clean { exit::OK } else { exit::CHECK_NOT_CLEAN })
}

/// Consecutive connection failures: the wait before the next try, and when to give up.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    const MAX_FAILURES: u32 = 8;

    /// After a failure: how long to wait, or the error to give up with.
    fn next(&mut self, error: CliError) -> Result<Duration> {
        self.failures += 1;
        if self.failures > Self::MAX_FAILURES {
            return Err(error);
        }
        Ok(Duration::from_millis((250u64 << (self.failures - 1).min(5)).min(5000)))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Only a dropped connection is worth another try; a refusal (revoked token, gone run) is final.
fn retryable(error: &CliError) -> bool {
    error.code == "connection" || error.code == "unavailable"
}

/// Follows a run's journal until its final event, reconnecting with `Last-Event-ID` after a
/// dropped connection, so that every event is handed over exactly once. With
/// `stop_when_parked`, a run that goes quiet is checked, and a parked one ends the follow: it
/// will not move until its code is fixed.
async fn follow_events(
    ctx: &Ctx,
    id: &str,
    after: Option<u64>,
    stop_when_parked: bool,
    mut each: impl FnMut(&str, &EventView) -> Result<()>,
) -> Result<()> {
    let url = ctx.client.url(&["runs", id, "events"], &[("follow", "true".to_owned())]);
    let mut last_seq: Option<u64> = after;
    let mut backoff = Backoff::default();
    loop {
        let last_id = last_seq.map(|seq| seq.to_string());
        let connection = match ctx.client.stream(url.clone(), last_id.as_deref()).await {
            Ok(connection) => Some(connection),
            Err(error) if retryable(&error) => {
                tokio::time::sleep(backoff.next(error)?).await;
                None
            }
            Err(error) => return Err(error),
        };
        let Some(mut connection) = connection else { continue };
        let dropped = loop {
            let idle = stop_when_parked.then_some(IDLE_CHECK);
            match connection.next_within(idle).await {
                Ok(Some(Next::Event(event))) => {
                    backoff.reset();
                    let view = event_view(&event)?;
                    // A server that resent what we saw: skipped, never shown twice.
                    if last_seq.is_some_and(|last| view.seq <= last) {
                        continue;
                    }
                    last_seq = Some(view.seq);
                    each(&event.data, &view)?;
                    if is_final_event(&view.kind) {
                        return Ok(());
                    }
                }
                Ok(Some(Next::End)) => {
                    break CliError::connection("the event stream closed before the run ended");
                }
                Ok(None) => {
                    let run: RunSummary = parse(&ctx.client.get(&["runs", id], &[]).await?)?;
                    if run.status == "parked" || is_final(&run.status) {
                        return Ok(());
                    }
                }
                Err(error) => break error,
            }
        };
        tokio::time::sleep(backoff.next(dropped)?).await;
    }
}

fn event_view(event: &SseEvent) -> Result<EventView> {
    serde_json::from_str(&event.data)
        .map_err(|e| CliError::new("invalid_response", format!("a journal event is not an EventView: {e}")))
}

/// The run's jobs in step order, with the name of their step.
fn jobs_of(run: &RunDetail, step: Option<&str>) -> Vec<(String, JobView)> {
    run.steps
        .iter()
        .filter(|s| step.is_none_or(|name| s.name == name))
        .flat_map(|s| s.jobs.iter().map(move |j| (s.name.clone(), j.clone())))
        .collect()
}

async fn logs(ctx: &Ctx, id: &str, step: Option<&str>, stderr: bool, follow: bool) -> Result<u8> {
    let stream = if stderr { "stderr" } else { "stdout" };
    let mut done: HashSet<String> = HashSet::new();
    loop {
        let run: RunDetail = parse(&ctx.client.get(&["runs", id], &[]).await?)?;
        if !follow
            && let Some(name) = step
            && !run.steps.iter().any(|s| s.name == name)
        {
            return Err(CliError::new("not_found", format!("run `{id}` has no step `{name}`")));
        }
        let jobs = jobs_of(&run, step);
        if !follow && jobs.is_empty() {
            eprintln!("run `{id}` has no jobs");
            return Ok(exit::OK);
        }
        let several = follow || jobs.len() > 1;
        for (step_name, job) in &jobs {
            if done.contains(&job.job_id) {
                continue;
            }
            if several && ctx.output == Output::Human {
                eprintln!("==> {step_name} attempt {} ({}) <==", job.attempt, job.job_id);
            }
            if follow {
                follow_log(ctx, &job.job_id, stream).await?;
            } else {
                read_log(ctx, &job.job_id, stream).await?;
            }
            done.insert(job.job_id.clone());
        }
        // Jobs listed before the run ended are all done; a later step may still add one.
        if !follow || is_final(&run.summary.status) {
            return Ok(exit::OK);
        }
        tokio::time::sleep(JOB_POLL).await;
    }
}

fn print_chunk(ctx: &Ctx, job_id: &str, raw: &Value, chunk: &LogChunkView) -> Result<()> {
    match ctx.output {
        Output::Json => {
            let mut line = raw.clone();
            line["job_id"] = json!(job_id);
            emit(&format!("{line}\n"))
        }
        Output::Human => emit(&chunk.text),
    }
}

async fn read_log(ctx: &Ctx, job_id: &str, stream: &str) -> Result<()> {
    let mut offset = 0u64;
    loop {
        let raw =
            ctx.client.get(&["jobs", job_id, "logs", stream], &[("offset", offset.to_string())]).await?;
        let chunk: LogChunkView = parse(&raw)?;
        if chunk.next_offset <= offset {
            return Ok(());
        }
        print_chunk(ctx, job_id, &raw, &chunk)?;
        if chunk.closed {
            return Ok(());
        }
        offset = chunk.next_offset;
    }
}

/// Follows one job's log to its end, reconnecting with `Last-Event-ID` (the offset the last
/// chunk ended at) after a dropped connection: every byte is printed once.
async fn follow_log(ctx: &Ctx, job_id: &str, stream: &str) -> Result<()> {
    let url = ctx.client.url(&["jobs", job_id, "logs", stream], &[("follow", "true".to_owned())]);
    let mut next_offset: Option<u64> = None;
    let mut backoff = Backoff::default();
    loop {
        let last_id = next_offset.map(|offset| offset.to_string());
        let mut connection = match ctx.client.stream(url.clone(), last_id.as_deref()).await {
            Ok(connection) => connection,
            Err(error) if retryable(&error) => {
                tokio::time::sleep(backoff.next(error)?).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        let dropped = loop {
            match connection.next().await {
                Ok(Next::Event(event)) => {
                    backoff.reset();
                    match event.event.as_str() {
                        "log" => {
                            let raw: Value = serde_json::from_str(&event.data).map_err(|e| {
                                CliError::new("invalid_response", format!("a log event is not JSON: {e}"))
                            })?;
                            let chunk: LogChunkView = parse(&raw)?;
                            if next_offset.is_some_and(|seen| chunk.next_offset <= seen) {
                                continue;
                            }
                            print_chunk(ctx, job_id, &raw, &chunk)?;
                            next_offset = Some(chunk.next_offset);
                        }
                        "end" => return Ok(()),
                        "error" => {
                            return Err(CliError::new(
                                "internal",
                                format!("job `{job_id}`'s log: {}", event.data),
                            ));
                        }
                        _ => {}
                    }
                }
                Ok(Next::End) => break CliError::connection("the log stream closed before its end"),
                Err(error) => break error,
            }
        };
        tokio::time::sleep(backoff.next(dropped)?).await;
    }
}

fn parse<T: DeserializeOwned>(value: &Value) -> Result<T> {
    T::deserialize(value).map_err(|e| {
        CliError::new("invalid_response", format!("the server's answer is not what this CLI reads: {e}"))
    })
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

fn emit(text: &str) -> Result<()> {
    emit_bytes(text.as_bytes())
}

/// Writes and flushes stdout (followed output must show as it comes). A closed pipe
/// (`hodei runs list | head`) ends the program quietly, as it would a filter.
fn emit_bytes(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(CliError::new("io", format!("cannot write to stdout: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_gives_up_and_resets_on_progress() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..Backoff::MAX_FAILURES)
            .map(|_| backoff.next(CliError::connection("x")).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(backoff.next(CliError::connection("last")).unwrap_err().message, "last");
        backoff.reset();
        assert_eq!(backoff.next(CliError::connection("x")).unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn only_transport_failures_are_retried() {
        assert!(retryable(&CliError::connection("reset")));
        assert!(retryable(&CliError::api(503, "unavailable", "stopping")));
        assert!(!retryable(&CliError::api(401, "unauthenticated", "revoked")));
        assert!(!retryable(&CliError::api(404, "not_found", "gone")));
    }

    #[test]
    fn payloads_must_be_json() {
        assert_eq!(json_arg("--payload", None).unwrap(), Value::Null);
        assert_eq!(json_arg("--payload", Some(r#"{"ok":true}"#)).unwrap(), json!({"ok": true}));
        let error = json_arg("--payload", Some("yes")).unwrap_err();
        assert_eq!(error.code, "usage");
        assert!(error.message.starts_with("--payload is not JSON"));
    }

    #[test]
    fn jobs_are_found_in_step_order_and_by_step_name() {
        let run: RunDetail = serde_json::from_value(json!({
            "id": "r", "definition": "d", "version": 1, "status": "running",
            "steps": [
                {"step": 1, "name": "build", "jobs": [{"job_id": "r/1#1", "attempt": 1}, {"job_id": "r/1#2", "attempt": 2}]},
                {"step": 2, "name": "test", "jobs": [{"job_id": "r/2#1", "attempt": 1}]}
            ]
        }))
        .unwrap();
        let ids = |step| jobs_of(&run, step).into_iter().map(|(_, j)| j.job_id).collect::<Vec<_>>();
        assert_eq!(ids(None), ["r/1#1", "r/1#2", "r/2#1"]);
        assert_eq!(ids(Some("test")), ["r/2#1"]);
        assert!(ids(Some("deploy")).is_empty());
    }
}
