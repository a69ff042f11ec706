//! Cold start of a Docker worker against the bare container start, in the same run.
//!
//! - cold start: `provision` of a container from the agent image until its agent has registered
//!   over mutual TLS and a no-op job (`/hodei-agent --help`) has run through the hub and its
//!   result is back;
//! - the limit: `docker run <same image> --help` through the same bollard client: create,
//!   start, wait for the exit.
//!
//! Like with like: the headline ratio counts neither side's removal; a second ratio counts
//! both (the worker's `destroy` against the bare container's forced removal). Runs alternate,
//! so that both see the same load. Prints the median of each and their ratios (target: at
//! most 1.5x).
//!
//! `cargo bench --bench docker --features docker` (needs a Docker engine; builds the image).
//! `HODEI_BENCH_ROUNDS` sets the runs of each (default 15 times `HODEI_BENCH_SCALE`, at least 1).

#[path = "../hodei-providers/tests/docker_support/mod.rs"]
mod docker_support;

use std::time::{Duration, Instant};

use docker_support::{AGENT_IMAGE, TestHub, images, unique_worker, within};
use hodei_agent::protocol::v1::{self, job_result::Outcome};
use hodei_providers::docker::bollard::models::{ContainerCreateBody, HostConfig};
use hodei_providers::docker::bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use hodei_providers::docker::{DockerConfig, DockerProvider, container_name};
use hodei_providers::{Provider, WorkerSpec, WorkerState};

const RUNS: usize = 15;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Provision until the no-op job's result is in; then the removal, timed apart.
async fn cold_start(provider: &DockerProvider, hub: &TestHub, run: usize) -> (Duration, Duration) {
    let worker = unique_worker(&format!("bench-{run}"));
    let mut spec = WorkerSpec::new(&worker, hub.agent_env(&worker));
    spec.image = Some(AGENT_IMAGE.to_owned());
    let started = Instant::now();
    within(provider.provision(&spec)).await.expect("provisioned");
    hub.wait_registered(&worker).await;
    let job = v1::JobSpec {
        job_id: format!("bench/{worker}"),
        command: vec!["/hodei-agent".to_owned(), "--help".to_owned()],
        ..v1::JobSpec::default()
    };
    let result = within(hub.hub.run_job(&worker, job)).await.expect("the job ran");
    let ready = started.elapsed();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");
    within(provider.destroy(&worker)).await.expect("destroyed");
    (ready, started.elapsed())
}

/// `docker run <image> --help`, through the API, then its removal, timed apart.
async fn bare_run(provider: &DockerProvider, run: usize) -> (Duration, Duration) {
    let docker = provider.client().await.expect("connected");
    let id = unique_worker(&format!("bare-{run}"));
    let name = container_name(&id);
    let body = ContainerCreateBody {
        image: Some(AGENT_IMAGE.to_owned()),
        cmd: Some(vec!["--help".to_owned()]),
        host_config: Some(HostConfig { network_mode: Some("host".to_owned()), ..HostConfig::default() }),
        ..ContainerCreateBody::default()
    };
    let started = Instant::now();
    let options = CreateContainerOptionsBuilder::new().name(&name).build();
    docker.create_container(Some(options), body).await.expect("created");
    docker.start_container(&name, None).await.expect("started");
    let state = within(provider.wait_exit(&id)).await.expect("waited");
    let exited = started.elapsed();
    let removal = RemoveContainerOptionsBuilder::new().force(true).build();
    docker.remove_container(&name, Some(removal)).await.expect("removed");
    assert_eq!(state, WorkerState::Exited { code: Some(0), reason: None });
    (exited, started.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let provider = match DockerProvider::connect(DockerConfig::default().network_mode("host")).await {
        Ok(provider) => provider,
        Err(e) if std::env::var_os("HODEI_REQUIRE_DOCKER").is_some() => {
            panic!("HODEI_REQUIRE_DOCKER is set and no Docker engine answers: {e}")
        }
        Err(e) => {
            eprintln!("docker bench skipped: {e}");
            return;
        }
    };
    tokio::task::spawn_blocking(images).await.unwrap().expect("the agent image builds");
    let hub = TestHub::start().await;
    // One of each first, unmeasured: the image's layers into the page cache, the hub warm.
    cold_start(&provider, &hub, 0).await;
    bare_run(&provider, 0).await;

    let scale =
        std::env::var("HODEI_BENCH_SCALE").map_or(1.0, |v| v.parse().expect("HODEI_BENCH_SCALE: a number"));
    let scaled_runs = (RUNS as f64 * scale).round() as usize;
    let runs =
        std::env::var("HODEI_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(scaled_runs).max(1);
    let (mut ready, mut with_removal, mut bare, mut bare_removed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let (to_job, to_removed) = cold_start(&provider, &hub, run).await;
        ready.push(to_job);
        with_removal.push(to_removed);
        let (to_exit, to_bare_removed) = bare_run(&provider, run).await;
        bare.push(to_exit);
        bare_removed.push(to_bare_removed);
    }
    let (ready, with_removal) = (median(ready), median(with_removal));
    let (bare, bare_removed) = (median(bare), median(bare_removed));
    println!("docker cold start, {runs} runs each, medians:");
    println!("  provision -> registered -> no-op job done:  {:8.1} ms", ms(ready));
    println!("  docker run (create/start/wait for exit):    {:8.1} ms", ms(bare));
    println!("  ratio: {:.2}x (target <= 1.5x)", ready.as_secs_f64() / bare.as_secs_f64());
    println!(
        "  the same, each side's removal counted too:  {:8.1} ms against {:.1} ms: {:.2}x",
        ms(with_removal),
        ms(bare_removed),
        with_removal.as_secs_f64() / bare_removed.as_secs_f64()
    );
}
