//! The operator API against the same work done in process, on sled with durability on:
//!
//! - **start**: a 10-step saga started with `POST /api/v1/runs` and awaited by following its
//!   journal (`GET /api/v1/runs/{id}/events?follow=true` to its end), against the same saga
//!   started and awaited in process (`engine.start` + `outcome`). Reported: the median time per
//!   run of each and their ratio, what HTTP, JSON and server-sent events add to a run.
//! - **list**: one page (100 runs) of `GET /api/v1/runs` from a random cursor with 100,000 runs
//!   in the store, against the same page read in process from the store's index
//!   (`engine.list_page`). Reported: p50 and p99 of each and the ratio of the p50s.
//! - **logs**: a 32 MiB job log followed over server-sent events to its end, against the same
//!   log followed in process (`LogStore::follow`). Reported: MB/s of each and their ratio.
//!
//! Run: `cargo bench --bench api`. Knobs: `HODEI_BENCH_SCALE` multiplies the counts and sizes
//! (200 runs per side and round, 100,000 stored runs, 500 pages, 32 MiB), `HODEI_BENCH_ROUNDS`
//! (default 3) the rounds, `HODEI_BENCH_ONLY=start,list,logs` the parts. Each round runs both
//! sides in the order a, b, b, a, and its ratio is taken within the round.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Table, knob, median, noop_saga, run_noop_saga, scaled, sled_engine, thousands};
use futures_util::StreamExt;
use hodei::api::ApiServer;
use hodei::server::logstore::{LogStore, LogStream};
use hodei::{Engine, SagaContext, SagaDefinition, SagaFilter, SagaId, StepError};

const SAGA: &str = "bench-api";

fn main() {
    let rt = common::runtime();
    rt.block_on(async {
        println!("## hodei operator API against in-process calls (sled, durability on)");
        let rounds = knob("HODEI_BENCH_ROUNDS", 3).max(1);
        if common::selected("start") {
            start(rounds).await;
        }
        if common::selected("list") {
            list(rounds).await;
        }
        if common::selected("logs") {
            logs(rounds).await;
        }
    });
}

struct Served {
    _dir: tempfile::TempDir,
    engine: Engine,
    server: ApiServer,
    http: reqwest::Client,
    token: String,
}

impl Served {
    async fn start(
        definitions: Vec<SagaDefinition>,
        logs: Option<Arc<LogStore>>,
        dir: tempfile::TempDir,
    ) -> Self {
        let engine = sled_engine(&dir.path().join("journal"), definitions).await;
        let mut builder =
            ApiServer::builder(engine.clone(), dir.path()).bind(SocketAddr::from(([127, 0, 0, 1], 0)));
        if let Some(logs) = logs {
            builder = builder.logs(logs);
        }
        let server = builder.serve().await.expect("serving the API");
        let token = std::fs::read_to_string(dir.path().join("api/admin-token")).expect("the admin token");
        Self { _dir: dir, engine, server, http: reqwest::Client::new(), token: token.trim().to_owned() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.local_addr())
    }

    /// Starts a run through the API and follows its journal to the end; checks it completed.
    async fn run_over_http(&self, id: &str) {
        let body = serde_json::json!({"definition": SAGA, "id": id, "input": 7});
        let started =
            self.http.post(self.url("/api/v1/runs")).bearer_auth(&self.token).json(&body).send().await;
        assert_eq!(started.expect("POST /runs").status(), reqwest::StatusCode::CREATED);
        let events = self
            .http
            .get(self.url(&format!("/api/v1/runs/{id}/events?follow=true")))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("following the journal");
        let text = events.text().await.expect("the journal stream");
        assert!(text.contains("event: saga_completed"), "run {id} did not complete:\n{text}");
    }
}

async fn start(rounds: usize) {
    let runs = scaled(200);
    let table = Table::new(
        &format!("start and await a {}-step saga, {runs} runs per side and round", common::STEPS),
        &["round", "in process (ms/run)", "through the API (ms/run)", "API / in process"],
    );
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let served = Served::start(vec![noop_saga(SAGA)], None, tempfile::tempdir().unwrap()).await;
        let (mut local, mut http) = (Vec::new(), Vec::new());
        for side in ["a", "b", "b", "a"] {
            let began = Instant::now();
            for n in 0..runs / 2 {
                let id = format!("{round}-{side}-{n}-{}", local.len() + http.len());
                match side {
                    "a" => run_noop_saga(&served.engine, SAGA, id).await,
                    _ => served.run_over_http(&id).await,
                }
            }
            let per_run = began.elapsed().as_secs_f64() * 1000.0 / (runs / 2).max(1) as f64;
            if side == "a" { local.push(per_run) } else { http.push(per_run) }
        }
        let (local, http) = (median(local), median(http));
        ratios.push(http / local);
        table.row(&[
            round.to_string(),
            format!("{local:.2}"),
            format!("{http:.2}"),
            format!("{:.2}x", http / local),
        ]);
        served.server.shutdown().await;
    }
    println!("\nmedian ratio: {:.2}x", median(ratios));
}

async fn list(rounds: usize) {
    let stored = scaled(100_000);
    let pages = scaled(500);
    let empty =
        SagaDefinition::new("empty", 1, |_: SagaContext, n: u32| async move { Ok::<_, StepError>(n) });
    let served = Served::start(vec![empty], None, tempfile::tempdir().unwrap()).await;
    let began = Instant::now();
    let engine = served.engine.clone();
    common::closed_loop(64, stored, move |n| {
        let engine = engine.clone();
        async move {
            let run = hodei::SagaRun::new("empty", format!("run-{n:07}"), &1u32).expect("a run");
            let handle = engine.start(run).await.expect("starting");
            handle.outcome::<u32>().await.expect("awaiting");
        }
    })
    .await;
    println!("\n{stored} runs stored in {:.1?}", began.elapsed());
    let table = Table::new(
        &format!(
            "one page of 100 runs from a random cursor, {} runs stored, {pages} pages per side and round",
            thousands(stored as f64)
        ),
        &["round", "store p50 (µs)", "store p99 (µs)", "API p50 (µs)", "API p99 (µs)", "API / store (p50)"],
    );
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut cursor = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        format!("run-{:07}", seed % stored as u64)
    };
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let (mut store, mut api) = (Vec::new(), Vec::new());
        for side in ["a", "b", "b", "a"] {
            for _ in 0..pages / 2 {
                let at = cursor();
                let began = Instant::now();
                if side == "a" {
                    let id = SagaId::new(at).expect("an id");
                    let page =
                        served.engine.list_page(&SagaFilter::default(), Some(&id), 100).expect("a page");
                    assert!(page.records.len() <= 100);
                    store.push(began.elapsed());
                } else {
                    let url = served.url(&format!("/api/v1/runs?limit=100&cursor={at}"));
                    let page: serde_json::Value = served
                        .http
                        .get(url)
                        .bearer_auth(&served.token)
                        .send()
                        .await
                        .expect("GET")
                        .json()
                        .await
                        .expect("JSON");
                    assert!(page["runs"].as_array().is_some_and(|runs| runs.len() <= 100));
                    api.push(began.elapsed());
                }
            }
        }
        let (s50, s99, a50, a99) = (
            percentile(&mut store, 50),
            percentile(&mut store, 99),
            percentile(&mut api, 50),
            percentile(&mut api, 99),
        );
        let ratio = a50.as_secs_f64() / s50.as_secs_f64();
        ratios.push(ratio);
        table.row(&[
            round.to_string(),
            micros(s50),
            micros(s99),
            micros(a50),
            micros(a99),
            format!("{ratio:.2}x"),
        ]);
    }
    println!("\nmedian ratio: {:.2}x", median(ratios));
    served.server.shutdown().await;
}

fn percentile(values: &mut [Duration], p: usize) -> Duration {
    values.sort();
    values[(values.len() * p / 100).min(values.len() - 1)]
}

fn micros(d: Duration) -> String {
    thousands(d.as_secs_f64() * 1e6)
}

async fn logs(rounds: usize) {
    // Under the log store's default cap, so that both sides read every byte written.
    let bytes = scaled(32 << 20);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LogStore::open(dir.path().join("logs-store")).await.expect("a log store"));
    let job = "bench/0#1";
    store.begin(job).await.expect("begin");
    let line = "2026-12-07T09:30:00.125Z  INFO compiling shop-api v1.0.0 (/src/shop-api) ...... ok\n";
    let batch: String = line.repeat((1 << 20) / line.len());
    let mut offset = 0u64;
    while (offset as usize) < bytes {
        store.append(job, LogStream::Stdout, offset, batch.as_bytes()).await.expect("append");
        offset += batch.len() as u64;
    }
    store.close(job).await.expect("close");
    let total = offset;
    let served = Served::start(Vec::new(), Some(store.clone()), dir).await;
    let table = Table::new(
        &format!("follow a closed {} MiB log to its end", total >> 20),
        &["round", "in process (MB/s)", "over SSE (MB/s)", "SSE / in process"],
    );
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let (mut local, mut sse) = (Vec::new(), Vec::new());
        for side in ["a", "b", "b", "a"] {
            let began = Instant::now();
            let got = if side == "a" {
                let mut follower = store.follow(job, LogStream::Stdout, 0).await.expect("follow");
                let mut got = 0u64;
                while let Some(chunk) = follower.next().await {
                    got += chunk.expect("a chunk").bytes.len() as u64;
                }
                got
            } else {
                let url = served.url("/api/v1/jobs/bench%2F0%231/logs/stdout?follow=true");
                let response = served.http.get(url).bearer_auth(&served.token).send().await.expect("GET");
                let mut body = response.bytes_stream();
                let mut last_id = 0u64;
                let mut pending = Vec::new();
                while let Some(chunk) = body.next().await {
                    pending.extend_from_slice(&chunk.expect("a chunk"));
                    while let Some(at) = pending.iter().position(|&b| b == b'\n') {
                        if let Some(id) = pending[..at].strip_prefix(b"id: ") {
                            last_id = std::str::from_utf8(id)
                                .ok()
                                .and_then(|id| id.parse().ok())
                                .expect("an offset");
                        }
                        pending.drain(..=at);
                    }
                }
                last_id
            };
            assert_eq!(got, total, "side {side} did not read the whole log");
            let rate = total as f64 / 1e6 / began.elapsed().as_secs_f64();
            if side == "a" { local.push(rate) } else { sse.push(rate) }
        }
        let (local, sse) = (median(local), median(sse));
        ratios.push(sse / local);
        table.row(&[
            round.to_string(),
            format!("{local:.0}"),
            format!("{sse:.0}"),
            format!("{:.2}x", sse / local),
        ]);
    }
    println!("\nmedian ratio: {:.2}x", median(ratios));
    served.server.shutdown().await;
}
