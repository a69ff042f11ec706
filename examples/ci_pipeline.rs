//! A CI service: pipelines of real shell jobs (checkout, build, a test matrix, a staging deploy,
//! an approval gate, the production deploy and a post-deploy check, with rollback jobs for the
//! deploys), run by a long-lived process that serves the operator API. Nothing has to stop for
//! an approval: operators start, follow, approve and cancel pipelines with the `hodei` CLI (or
//! any HTTP client) while it runs.
//!
//! ```text
//! cargo run --example ci_pipeline                          # serves http://127.0.0.1:7433
//! hodei runs start ci --id ci-1 --input '{"repository": "acme/shop", "branch": "main"}'
//! hodei runs logs ci-1 -f                                  # every job's output, live
//! hodei runs approve ci-1                                  # the gate opens; journaled as yours
//! hodei runs get ci-1                                      # steps, jobs, and who approved
//! ```
//!
//! The first start writes an admin token to `hodei-data-ci/api/admin-token`; the CLI reads it
//! with `--token-file` (or `HODEI_TOKEN`). A pipeline's input may name a step to fail (`"fail":
//! "verify"`: the deploys are rolled back; `"test"`: the integration suite fails). Ctrl-C stops
//! the service; pipelines in flight resume on the next start, at their gate if that is where
//! they wait. `--addr` picks another address (a non-loopback one needs TLS, which this example
//! does not set up, and is refused); `--data` another directory; `--accept-data-loss` opens a
//! directory that lost acknowledged writes.
//!
//! `check <dir>` is the pre-deploy gate: it replays every journal file in `<dir>` (exported from
//! the running service with `hodei runs export --in-flight --dir <dir>`) on this build's code,
//! runs nothing, prints one line per run and exits 1 if any would park or wait for its version.
//!
//! Logs go to stderr, as JSON lines with `HODEI_LOG_FORMAT=json` (each line inside a step
//! names its saga and step). Built with `--features otel` and given
//! `OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317`, it exports one trace per pipeline.

#[path = "support/ci.rs"]
mod ci_saga;
#[path = "support/logging.rs"]
mod logging;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use ci_saga::ci;
use hodei::api::ApiServer;
use hodei::core::{JournalFile, ReplayVerdict};
use hodei::{Node, SledOptions};

struct Args {
    addr: SocketAddr,
    data: String,
    accept_data_loss: bool,
    /// `check <dir>`: the pre-deploy gate over the journal files in `<dir>`.
    check: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: hodei::api::DEFAULT_ADDR,
        data: "hodei-data-ci".into(),
        accept_data_loss: false,
        check: None,
    };
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("check") {
        argv.next();
        let dir = argv.next().ok_or("check needs the directory of the exported journals")?;
        if let Some(extra) = argv.next() {
            return Err(format!("unexpected argument `{extra}` after check {dir}"));
        }
        args.check = Some(PathBuf::from(dir));
        return Ok(args);
    }
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--addr" => {
                let value = argv.next().ok_or("--addr needs an address, like 127.0.0.1:7433")?;
                args.addr = value.parse().map_err(|e| format!("--addr {value}: {e}"))?;
            }
            "--data" => args.data = argv.next().ok_or("--data needs a directory")?,
            "--accept-data-loss" => args.accept_data_loss = true,
            other => {
                return Err(format!("unknown argument `{other}`; use --addr, --data, --accept-data-loss"));
            }
        }
    }
    Ok(args)
}

/// Replays each exported journal in `dir` on this build's pipeline and says whether the run
/// would go on. Returns whether every run would.
async fn check(dir: &Path) -> anyhow::Result<bool> {
    // A node of its own, on a scratch directory: the replay needs the pipeline's resources
    // (its job dispatcher), and the service's directory is locked by the service.
    let scratch = tempfile::tempdir()?;
    let node = Node::builder(scratch.path()).register(ci::definition()).start().await?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "journal"))
        .collect();
    files.sort();
    let mut clean = true;
    for file in &files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let journal = JournalFile::from_bytes(&bytes).with_context(|| file.display().to_string())?;
        let report = node.engine().check_journal(&journal.saga, &journal.events).await?;
        clean &= report.verdict.is_clean();
        let verdict = match &report.verdict {
            ReplayVerdict::Clean { next: Some(next) } => format!("clean; next: {next}"),
            ReplayVerdict::Clean { next: None } => "clean; it ends on what it recorded".into(),
            ReplayVerdict::WouldPark { reason } => format!("WOULD PARK: {reason}"),
            ReplayVerdict::NoDefinition => {
                format!("NO DEFINITION of {} v{}", report.definition, report.version)
            }
            ReplayVerdict::Stalled { reason } => format!("STALLED: {reason}"),
            other => format!("{other:?}"),
        };
        println!("{}: {verdict}", report.saga);
    }
    println!("{} run(s) checked", files.len());
    node.shutdown(Duration::from_secs(5)).await?;
    Ok(clean)
}

async fn serve(args: Args) -> anyhow::Result<()> {
    // `/metrics` for Prometheus, readable with the API's tokens (the default access).
    let node = Node::builder(&args.data)
        .metrics(hodei::server::metrics::Metrics::new())
        .register(ci::definition())
        .sled_options(SledOptions::default().accept_data_loss(args.accept_data_loss))
        .start()
        .await?;
    let api = match ApiServer::for_node(&node).bind(args.addr).serve().await {
        Ok(api) => api,
        Err(error) => {
            node.shutdown(Duration::from_secs(5)).await?;
            return Err(error.into());
        }
    };
    let addr = api.local_addr();
    let token_file = format!("{}/api/admin-token", args.data);
    println!("ci service: pipeline `{}` v{}, operator API on http://{addr}", ci::NAME, ci::VERSION);
    if let Some(file) = api.admin_token_file() {
        println!("the first admin token is in {} (mode 0600)", file.display());
    }
    println!("\n  export HODEI_ADDR=http://{addr} HODEI_TOKEN=$(cat {token_file})");
    println!(
        "  hodei runs start ci --id ci-1 --input '{{\"repository\": \"acme/shop\", \"branch\": \"main\"}}'"
    );
    println!("  hodei runs logs ci-1 -f");
    println!("  hodei runs approve ci-1");
    println!("  hodei runs get ci-1\n");
    println!("Ctrl-C stops it; pipelines in flight resume on the next start.");
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    api.shutdown().await;
    let left = node.shutdown(Duration::from_secs(5)).await?;
    if !left.in_flight.is_empty() {
        println!("{} pipeline(s) in flight resume on the next start", left.in_flight.len());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("error: {usage}");
            return ExitCode::from(2);
        }
    };
    let logging = match logging::init("ci_pipeline") {
        Ok(logging) => logging,
        Err(e) => {
            eprintln!("error: logs: {e}");
            return ExitCode::from(2);
        }
    };
    let served = match &args.check {
        Some(dir) => check(dir).await,
        None => serve(args).await.map(|()| true),
    };
    logging.shutdown().await;
    match served {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
