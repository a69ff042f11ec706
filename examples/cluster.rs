//! Three engines on one PostgreSQL, each a process of its own, each starting four runs of a
//! four-step pipeline; the first is killed with SIGKILL while its runs are in their steps. Its
//! lease (one second here) lapses, the other two share its runs out and finish them, without
//! running a journaled step again. Prints how long the failover took and where each run went.
//!
//! ```text
//! eval "$(bash .ci/postgres)"    # a PostgreSQL on 127.0.0.1; or set DATABASE_URL to yours
//! cargo run --example cluster --features postgres
//! ```
//!
//! The example starts copies of itself as the engines (`--engine <name>`), in a schema of its
//! own that it drops at the end.

// The zombie scenario of the same module is for the tests (hodei-core/tests/postgres_failover.rs).
#[allow(dead_code)]
#[path = "support/cluster.rs"]
mod cluster;

use std::time::Duration;

use cluster::Cluster;

const ENGINES: [&str; 3] = ["engine-a", "engine-b", "engine-c"];
const RUNS: usize = 4;
const STEP_TIME: Duration = Duration::from_millis(300);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, name] = args.as_slice()
        && flag == "--engine"
    {
        let var = |key: &str| std::env::var(key);
        let effects = std::path::PathBuf::from(var("CLUSTER_EFFECTS")?).join(format!("{name}.log"));
        cluster::engine_process(
            &var("CLUSTER_URL")?,
            &var("CLUSTER_SCHEMA")?,
            name,
            RUNS,
            &effects,
            STEP_TIME,
        )
        .await?;
        return Ok(());
    }
    let url = std::env::var("DATABASE_URL")
        .or_else(|_| std::env::var("HODEI_TEST_POSTGRES_URL"))
        .map_err(|_| anyhow::anyhow!("set DATABASE_URL (or run `eval \"$(bash .ci/postgres)\"` first)"))?;
    let schema = format!("hodei_cluster_{}", std::process::id());
    let effects = tempfile::tempdir()?;
    let mut cluster = Cluster::start(ENGINES.map(|name| {
        let mut command = tokio::process::Command::new(std::env::current_exe().expect("this example's path"));
        command
            .args(["--engine", name])
            .env("CLUSTER_URL", &url)
            .env("CLUSTER_SCHEMA", &schema)
            .env("CLUSTER_EFFECTS", effects.path());
        command
    }));
    println!("3 engines, {RUNS} runs each; killing {} once its runs are in their steps", ENGINES[0]);
    let failover = cluster.kill_and_finish(0, RUNS, ENGINES.len() * RUNS).await;
    println!(
        "{} killed: its runs went on elsewhere {:.2} s later (lease {:?})",
        ENGINES[0],
        failover.after.as_secs_f64(),
        cluster::LEASE
    );
    for (run, engine) in &failover.heirs {
        println!("  {run} finished on {}", ENGINES[*engine]);
    }
    println!("all {} runs completed", ENGINES.len() * RUNS);
    let stopped = cluster.stop().await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await?;
    anyhow::ensure!(stopped, "an engine did not stop cleanly");
    Ok(())
}
