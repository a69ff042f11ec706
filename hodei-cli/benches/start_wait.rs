//! `hodei runs start --wait` against the same saga started and awaited in process: what the CLI
//! adds to a run (a process start, settings, the HTTP start, following the journal to its end),
//! on sled with durability on.
//!
//! Run: `cargo bench -p hodei-cli --bench start_wait`. Knobs: `HODEI_BENCH_SCALE` multiplies the
//! runs per side and round (100), `HODEI_BENCH_ROUNDS` (default 3) the rounds. Each round runs
//! both sides in the order a, b, b, a and takes its ratio within the round.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use hodei_core::{Engine, Outcome, SagaContext, SagaDefinition, SagaRun, StepError};
use hodei_server::api::ApiServer;

const SAGA: &str = "bench-cli";
const STEPS: u32 = 10;

/// Ten no-op steps, each returning 100 bytes: what is measured is the journaling, not work.
fn noop_saga() -> SagaDefinition {
    SagaDefinition::new(SAGA, 1, |ctx: SagaContext, n: u32| async move {
        for i in 0..STEPS {
            ctx.step(format!("s{i}"))
                .input(n)
                .run(|_, n: u32| async move { Ok::<_, StepError>(vec![n as u8; 100]) })
                .await?;
        }
        Ok(n)
    })
}

fn knob(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let runs = ((100.0 * knob("HODEI_BENCH_SCALE", 1.0)).round() as usize).max(1);
    let rounds = (knob("HODEI_BENCH_ROUNDS", 3.0) as usize).max(1);
    runtime.block_on(async {
        println!("## `hodei runs start --wait` against in process (sled, durability on)\n");
        println!("| round | in process (ms/run) | `hodei runs start --wait` (ms/run) | CLI / in process |");
        println!("| --- | --- | --- | --- |");
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let dir = tempfile::tempdir().expect("a directory");
            let engine = Engine::builder()
                .store(hodei_core::SledStore::open(dir.path().join("journal")).expect("a journal"))
                .register(noop_saga())
                .start()
                .await
                .expect("an engine");
            let server = ApiServer::builder(engine.clone(), dir.path())
                .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .serve()
                .await
                .expect("the API");
            let token_file = dir.path().join("api/admin-token");
            let (mut local, mut cli) = (Vec::new(), Vec::new());
            for (turn, side) in ["a", "b", "b", "a"].into_iter().enumerate() {
                let began = Instant::now();
                for n in 0..runs.div_ceil(2) {
                    let id = format!("{round}-{turn}-{n}");
                    if side == "a" {
                        let handle =
                            engine.start(SagaRun::new(SAGA, id, &7u32).expect("a run")).await.expect("start");
                        let outcome = handle.outcome::<u32>().await.expect("an outcome");
                        assert_eq!(outcome, Outcome::Completed(7));
                    } else {
                        let mut command = Command::new(env!("CARGO_BIN_EXE_hodei"));
                        command
                            .env_clear()
                            .args(["--addr", &server.local_addr().to_string(), "--token-file"])
                            .arg(&token_file)
                            .args(["runs", "start", SAGA, "--id", &id, "--input", "7", "--wait"]);
                        let output =
                            tokio::task::spawn_blocking(move || command.output().expect("the CLI runs"))
                                .await
                                .expect("the CLI's thread");
                        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
                    }
                }
                let per_run = began.elapsed().as_secs_f64() * 1000.0 / runs.div_ceil(2) as f64;
                if side == "a" { local.push(per_run) } else { cli.push(per_run) }
            }
            let (local, cli) = (median(local), median(cli));
            ratios.push(cli / local);
            println!("| {round} | {local:.2} | {cli:.2} | {:.2}x |", cli / local);
            server.shutdown().await;
        }
        println!("\nmedian ratio: {:.2}x", median(ratios));
    });
}
