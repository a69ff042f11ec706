//! The dashboard in headless Chromium against a page that renders the same data as a plain
//! `<pre>`, both timed inside the page with the Performance API:
//!
//! - **run page**: a completed 1,000-step saga, from navigation to every step's row drawn,
//!   against fetching the same run's JSON into a `<pre>`.
//! - **log**: a closed 1,000,000-line job log, from navigation to the last line drawn, against
//!   reading the same log (1 MiB at a time through the read endpoint) into a `<pre>`.
//!
//! Run: `cargo bench -p hodei-server --bench dashboard` (needs Debian's `chromium` and
//! `chromium-driver`; without a driver it says so and stops, and with `HODEI_REQUIRE_BROWSER`
//! set that is a failure). Knobs: `HODEI_BENCH_SCALE` multiplies the steps and lines,
//! `HODEI_BENCH_ROUNDS` (default 3) the rounds; each round times both sides as a, b, b, a.

#[path = "../tests/support/browser.rs"]
mod browser;

use std::net::SocketAddr;
use std::sync::Arc;

use fantoccini::Client;
use hodei_core::{Engine, Outcome, SagaContext, SagaDefinition, SagaRun, SledStore, StepError};
use hodei_server::api::ApiServer;
use hodei_server::logstore::{LogStore, LogStream};

fn knob(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn many_steps(steps: u32) -> SagaDefinition {
    SagaDefinition::new("many", 1, move |ctx: SagaContext, (): ()| async move {
        for i in 0..steps {
            ctx.step(format!("step-{i}"))
                .input(i)
                .run(|_, i: u32| async move { Ok::<_, StepError>(i) })
                .await?;
        }
        Ok(steps)
    })
}

/// Runs `script` in the page (an async function body that returns milliseconds) and returns
/// its number.
async fn timed(browser: &Client, script: &str) -> f64 {
    let wrapped = format!(
        "const done = arguments[0]; (async () => {{ {script} }})().then(done, e => done(String(e)));"
    );
    let value = browser.execute_async(&wrapped, vec![]).await.expect("the script runs");
    value.as_f64().unwrap_or_else(|| panic!("the page answered {value}"))
}

const OURS_RUN: &str = r##"
    location.hash = "#/nowhere";
    await new Promise(requestAnimationFrame);
    const t0 = performance.now();
    location.hash = "#/runs/many-1";
    await new Promise((resolve) => {
        const check = () => document.querySelectorAll("#steps tr").length === STEPS ? resolve() : requestAnimationFrame(check);
        check();
    });
    await new Promise(requestAnimationFrame);
    return performance.now() - t0;
"##;

const PLAIN_RUN: &str = r##"
    location.hash = "#/nowhere";
    const t0 = performance.now();
    const run = await (await fetch("/api/v1/runs/many-1", {headers: {"X-Hodei-CSRF": "1"}})).json();
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(run, null, 2);
    document.body.append(pre);
    await new Promise(requestAnimationFrame);
    const took = performance.now() - t0;
    pre.remove();
    return took;
"##;

const OURS_LOG: &str = r##"
    location.hash = "#/nowhere";
    await new Promise(requestAnimationFrame);
    const t0 = performance.now();
    location.hash = "#/jobs/bench%2F0%231/stdout";
    await new Promise((resolve) => {
        const check = () => {
            const status = document.getElementById("log-status");
            const last = document.getElementById("LLINES");
            status && status.textContent.startsWith("ended") && last ? resolve() : requestAnimationFrame(check);
        };
        check();
    });
    await new Promise(requestAnimationFrame);
    return performance.now() - t0;
"##;

const PLAIN_LOG: &str = r##"
    location.hash = "#/nowhere";
    const t0 = performance.now();
    let offset = 0, text = "";
    for (;;) {
        const chunk = await (await fetch(`/api/v1/jobs/bench%2F0%231/logs/stdout?offset=${offset}`, {headers: {"X-Hodei-CSRF": "1"}})).json();
        text += chunk.text;
        if (chunk.next_offset === offset || chunk.closed) break;
        offset = chunk.next_offset;
    }
    const pre = document.createElement("pre");
    pre.textContent = text;
    document.body.append(pre);
    pre.scrollIntoView(false);
    await new Promise(requestAnimationFrame);
    const took = performance.now() - t0;
    pre.remove();
    return took;
"##;

fn main() {
    // Without a driver this says so and returns None; with HODEI_REQUIRE_BROWSER it fails.
    let Some(driver) = browser::start_driver() else { return };
    let scale = knob("HODEI_BENCH_SCALE", 1.0);
    let rounds = (knob("HODEI_BENCH_ROUNDS", 3.0) as usize).max(1);
    let steps = ((1000.0 * scale).round() as u32).max(1);
    let lines = ((1_000_000.0 * scale).round() as usize).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder()
            .store(SledStore::open(dir.path().join("journal")).unwrap())
            .register(many_steps(steps))
            .start()
            .await
            .unwrap();
        let handle = engine.start(SagaRun::new("many", "many-1", &()).unwrap()).await.unwrap();
        assert_eq!(handle.outcome::<u32>().await.unwrap(), Outcome::Completed(steps));
        let logs = Arc::new(LogStore::open(dir.path()).await.unwrap());
        logs.begin("bench/0#1").await.unwrap();
        let (mut offset, mut batch) = (0u64, String::new());
        for n in 0..lines {
            batch.push_str(&format!("{n:07} \x1b[32mok\x1b[0m compiling a crate of the build\n"));
            if batch.len() >= 1 << 20 || n + 1 == lines {
                logs.append("bench/0#1", LogStream::Stdout, offset, batch.as_bytes()).await.unwrap();
                offset += batch.len() as u64;
                batch.clear();
            }
        }
        logs.close("bench/0#1").await.unwrap();
        let server = ApiServer::builder(engine, dir.path())
            .logs(logs)
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .serve()
            .await
            .unwrap();
        let token = std::fs::read_to_string(dir.path().join("api/admin-token")).unwrap();

        let browser = browser::browser(&driver).await;
        browser.goto(&format!("http://{}/#/login", server.local_addr())).await.unwrap();
        let login = format!(
            r#"await fetch("/api/v1/session", {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: JSON.stringify({{token: {:?}}})}}); return 0;"#,
            token.trim()
        );
        timed(&browser, &login).await;

        let ours_run = OURS_RUN.replace("STEPS", &steps.to_string());
        let ours_log = OURS_LOG.replace("LLINES", &format!("L{lines}"));
        println!("## the dashboard against a plain <pre> of the same data (headless Chromium)\n");
        println!("| round | run page, {steps} steps: dashboard / <pre> (ms) | ratio | log, {lines} lines: dashboard / <pre> (ms) | ratio |");
        println!("| --- | --- | --- | --- | --- |");
        let (mut run_ratios, mut log_ratios) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let (mut ours, mut plain, mut ours_l, mut plain_l) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for side in ["a", "b", "b", "a"] {
                if side == "a" {
                    ours.push(timed(&browser, &ours_run).await);
                    ours_l.push(timed(&browser, &ours_log).await);
                } else {
                    plain.push(timed(&browser, PLAIN_RUN).await);
                    plain_l.push(timed(&browser, PLAIN_LOG).await);
                }
            }
            let (o, p, ol, pl) = (median(ours), median(plain), median(ours_l), median(plain_l));
            run_ratios.push(o / p);
            log_ratios.push(ol / pl);
            println!("| {round} | {o:.0} / {p:.0} | {:.2}x | {ol:.0} / {pl:.0} | {:.2}x |", o / p, ol / pl);
        }
        println!("\nmedian ratios: run page {:.2}x, log {:.2}x", median(run_ratios), median(log_ratios));
        browser.close().await.unwrap();
        server.shutdown().await;
    });
}
