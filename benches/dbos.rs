//! hodei against DBOS Transact for Python (`dbos` on PyPI), a peer durable-workflow library
//! that also journals to PostgreSQL, on the same server in the same run: workflows (sagas) of
//! 10 sequential no-op steps, each returning 100 bytes, in a closed loop at 1, 16 and 64
//! concurrent workflows. The figure is completed workflows per second.
//!
//! Run: `eval "$(bash .ci/postgres)"; cargo bench --bench dbos --features postgres`. Needs
//! `HODEI_TEST_POSTGRES_URL` and a `python3` that imports `dbos`
//! (`pip install -r benches/peer/dbos/requirements.txt`); skips with a message without either,
//! unless `HODEI_REQUIRE_POSTGRES=1` or `HODEI_REQUIRE_DBOS=1` makes it fail instead (CI).
//! Knobs: `HODEI_BENCH_SCALE` multiplies the workflow counts (at least 1 each),
//! `HODEI_BENCH_ROUNDS` (default 3) sets the rounds; each round measures hodei then DBOS back to
//! back at each concurrency, and the table gives the medians and the median of the rounds'
//! ratios.
//!
//! Both sides, chosen to be like for like:
//! - hodei: one engine on `PostgresStore` with its default options, a fresh schema per
//!   measurement, driven by `noop_sagas` (start, then await the outcome, which must be a
//!   completion);
//! - DBOS: `benches/peer/dbos/bench.py` as a child process, its system database one of this
//!   run's own on the same server with a fresh schema per measurement, DBOS's default settings,
//!   driven by `DBOS.start_workflow` and `get_result` from as many client threads as the
//!   concurrency (why not a queue: see the script);
//! - both get the same warm-up (the larger of the concurrency and 10 workflows) before the timed
//!   run, so that neither pays for connecting or first-use costs in the figure; the time is
//!   taken by each side from its first start to its last result, so that DBOS's interpreter
//!   start and migrations are not counted either.

#[allow(dead_code)]
mod common;
#[path = "common/postgres_admin.rs"]
mod postgres_admin;

use std::process::Stdio;
use std::time::Duration;

use common::{OUTPUT_BYTES, STEPS, Table, knob, median, noop_saga, noop_sagas, rate, scaled, thousands};
use hodei::{Engine, PostgresOptions, PostgresStore};
use postgres_admin::Admin;

/// The concurrencies the issue asks for, with the workflows timed at each (at scale 1): enough
/// for a steady figure from the slower side while a full run stays within a few minutes.
const LEVELS: [(usize, usize); 3] = [(1, 200), (16, 600), (64, 600)];

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peer/dbos/bench.py");

fn required(variable: &str) -> bool {
    std::env::var(variable).is_ok_and(|v| v == "1")
}

fn main() {
    let Ok(url) = std::env::var("HODEI_TEST_POSTGRES_URL") else {
        let why = "HODEI_TEST_POSTGRES_URL is not set (eval \"$(bash .ci/postgres)\" starts one)";
        if required("HODEI_REQUIRE_POSTGRES") || required("HODEI_REQUIRE_DBOS") {
            panic!("HODEI_REQUIRE_POSTGRES=1 or HODEI_REQUIRE_DBOS=1 is set, but {why}");
        }
        println!("skipped: {why}");
        return;
    };
    if let Err(why) = dbos_importable() {
        if required("HODEI_REQUIRE_DBOS") {
            panic!("HODEI_REQUIRE_DBOS=1 is set, but {why}");
        }
        println!("skipped: {why}");
        return;
    }
    let rt = common::runtime();
    rt.block_on(async move {
        println!("## hodei vs DBOS Transact (Python) on PostgreSQL");
        let rounds = knob("HODEI_BENCH_ROUNDS", 3).max(1);
        let admin = Admin::connect(&url).await;
        // DBOS's system database: one of this run's own, so that nothing it leaves meets hodei's
        // schemas or another run's; dropped at the end.
        let database = format!("hodei_bench_dbos_{}", std::process::id());
        let create = format!("CREATE DATABASE {database}");
        admin.0.batch_execute(&create).await.expect("creating DBOS's database");
        let mut version = String::new();
        // Per level: hodei's rates, DBOS's rates and the ratios, one of each per round.
        let mut results = vec![(vec![], vec![], vec![]); LEVELS.len()];
        for round in 0..rounds {
            for (&(concurrency, workflows), (hodeis, dboses, ratios)) in LEVELS.iter().zip(&mut results) {
                let workflows = scaled(workflows);
                let warmup = concurrency.max(10);
                let schema = format!("hodei_bench_dbos_{}_{round}_{concurrency}", std::process::id());
                let hodei = hodei_workflows(&url, &schema, concurrency, warmup, workflows).await;
                admin.drop_schemas(&[&schema]).await;
                let dbos = dbos_workflows(&url, &database, round, concurrency, warmup, workflows).await;
                eprintln!(
                    "round {}/{rounds}, {concurrency} concurrent: hodei {hodei:.1} workflows/s, DBOS {:.1}",
                    round + 1,
                    dbos.per_second
                );
                version = dbos.version;
                hodeis.push(hodei);
                dboses.push(dbos.per_second);
                ratios.push(hodei / dbos.per_second);
            }
        }
        admin
            .0
            .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            .await
            .expect("dropping DBOS's database");
        let table = Table::new(
            &format!(
                "Completed workflows per second on PostgreSQL, workflows of {STEPS} no-op steps returning \
                 {OUTPUT_BYTES} bytes each, closed loop (median of {rounds} rounds; DBOS Transact {version}, \
                 Python)"
            ),
            &[
                "concurrent workflows",
                "workflows timed",
                "hodei: workflows/s",
                "DBOS: workflows/s",
                "hodei / DBOS (median of the rounds' ratios)",
            ],
        );
        for (&(concurrency, workflows), (hodeis, dboses, ratios)) in LEVELS.iter().zip(results) {
            table.row(&[
                concurrency.to_string(),
                thousands(scaled(workflows) as f64),
                thousands(median(hodeis)),
                thousands(median(dboses)),
                format!("{:.2}", median(ratios)),
            ]);
        }
    });
}

/// Whether `python3` runs and imports `dbos`: the reason it does not, if not.
fn dbos_importable() -> Result<(), String> {
    let hint = "pip install -r benches/peer/dbos/requirements.txt";
    match std::process::Command::new("python3").args(["-c", "import dbos"]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`python3 -c 'import dbos'` failed ({hint}): {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
        )),
        Err(e) => Err(format!("python3 could not be run ({e}); DBOS needs it ({hint})")),
    }
}

/// Completed workflows/s of hodei: one engine on a fresh `schema`, `warmup` sagas, then
/// `workflows` sagas timed, `concurrency` at once.
async fn hodei_workflows(
    url: &str,
    schema: &str,
    concurrency: usize,
    warmup: usize,
    workflows: usize,
) -> f64 {
    let store = PostgresStore::connect_with(url, PostgresOptions::default().schema(schema))
        .await
        .expect("connecting the store");
    let engine = Engine::builder().store(store).register(noop_saga("noop")).start().await.expect("starting");
    noop_sagas(&engine, "noop", "warm", concurrency, warmup).await;
    let elapsed = noop_sagas(&engine, "noop", "timed", concurrency, workflows).await;
    engine.shutdown(Duration::from_secs(5)).await.expect("shutting down");
    rate(workflows, elapsed)
}

/// What the DBOS script reported for one measurement.
struct DbosRun {
    per_second: f64,
    version: String,
}

/// Completed workflows/s of DBOS: the script on `database`, a fresh schema, the same warm-up,
/// count and concurrency as hodei's.
async fn dbos_workflows(
    url: &str,
    database: &str,
    round: usize,
    concurrency: usize,
    warmup: usize,
    workflows: usize,
) -> DbosRun {
    let out = tokio::process::Command::new("python3")
        .arg(SCRIPT)
        .args(["--url", url, "--database", database])
        .args(["--schema", &format!("dbos_{round}_{concurrency}")])
        .args(["--workflows", &workflows.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .args(["--warmup", &warmup.to_string()])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running python3");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{SCRIPT} failed ({}):\n{stderr}{stdout}", out.status);
    let line = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("{SCRIPT} printed {line:?}, not its JSON report ({e}); stderr:\n{stderr}")
    });
    let completed = report["workflows"].as_u64();
    assert_eq!(
        completed,
        Some(workflows as u64),
        "DBOS was asked for {workflows} workflows and reported {report}"
    );
    DbosRun {
        per_second: report["workflows_per_second"].as_f64().expect("a workflows_per_second in the report"),
        version: report["dbos_version"].as_str().unwrap_or("?").to_string(),
    }
}
