//! `/metrics`: a node with in-process local workers runs a completed, a compensated (its
//! rollback a remote job) and a retried saga; the scrape over HTTP holds exactly what happened,
//! `promtool check metrics` accepts it without a lint warning, and the access rules hold. An
//! opt-in test has a real Prometheus server scrape it.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hodei_core::{
    Engine, EngineEventKind, Event, MemoryStore, Outcome, RetryPolicy, SagaContext, SagaDefinition, SagaRun,
    StepError,
};
use hodei_server::Node;
use hodei_server::api::{ApiServeError, ApiServer, ApiServerBuilder, MetricsAccess};
use hodei_server::jobs::JobOutcome;
use hodei_server::metrics::Metrics;
use reqwest::StatusCode;
use support::node_sagas::{deploy, run};
use support::within;

/// One step whose first attempt fails retryably.
fn retried() -> SagaDefinition {
    SagaDefinition::new("retried", 1, |ctx: SagaContext, (): ()| async move {
        ctx.step("call")
            .input(())
            .retry(RetryPolicy::attempts(3).initial_backoff(Duration::from_millis(1)))
            .run(|step, (): ()| async move {
                if step.attempt == 1 { Err(StepError::retryable("503")) } else { Ok(step.attempt) }
            })
            .await
    })
}

/// Sleeps an hour on a durable timer: in flight when scraped.
fn sleeper() -> SagaDefinition {
    SagaDefinition::new("sleeper", 1, |ctx: SagaContext, (): ()| async move {
        ctx.sleep(Duration::from_secs(3600)).await;
        Ok::<_, StepError>(())
    })
}

/// The samples of a text exposition, by series (`name{labels}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            (series.to_owned(), value.parse().unwrap_or_else(|_| panic!("not a value: {line}")))
        })
        .collect()
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn admin_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("api/admin-token")).unwrap().trim().to_owned()
}

async fn get(url: String, token: Option<&str>) -> (StatusCode, Option<String>, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    (response.status(), content_type, response.text().await.unwrap())
}

/// Runs `promtool check metrics` on `text` when promtool is installed (required with
/// `HODEI_REQUIRE_PROMTOOL=1`): no error and no lint warning.
fn promtool_accepts(text: &str) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("HODEI_REQUIRE_PROMTOOL").is_none_or(|v| v != "1"),
                "promtool is required (HODEI_REQUIRE_PROMTOOL=1) but not installed: apt-get install prometheus"
            );
            eprintln!("promtool not found: skipped `promtool check metrics` (apt-get install prometheus)");
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
}

/// Waits, on the scheduler's and the hub's own notifications, until every worker is gone.
async fn workers_gone(node: &Node) {
    let mut counts = node.control_plane().scheduler().watch_counts();
    within(counts.wait_for(|counts| counts.workers() == 0)).await.unwrap();
    let mut connected = node.control_plane().hub().watch_workers();
    within(connected.wait_for(|workers| workers.is_empty())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_completed_compensated_and_retried_runs_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let node = Node::builder(dir.path())
        .metrics(metrics)
        .register(deploy())
        .register(retried())
        .register(sleeper())
        .start()
        .await
        .unwrap();
    let server = ApiServer::for_node(&node).bind(loopback()).serve().await.unwrap();
    let url = |path: &str| format!("http://{}{path}", server.local_addr());
    let admin = admin_token(dir.path());
    let engine = node.engine();

    let completed: Outcome<JobOutcome> = run(engine, "deploy", "d-ok", &false).await;
    assert!(matches!(completed, Outcome::Completed(_)), "{completed:?}");
    let compensated: Outcome<JobOutcome> = run(engine, "deploy", "d-undo", &true).await;
    assert_eq!(compensated, Outcome::Compensated { cause: "verification failed".into() });
    assert_eq!(run::<u32>(engine, "retried", "r-1", &()).await, Outcome::Completed(2));
    // In flight when scraped: its timer is counted before its start is journaled.
    let mut events = engine.subscribe();
    engine.start(SagaRun::new("sleeper", "s-1", &()).unwrap()).await.unwrap();
    within(async {
        while !matches!(events.recv().await.unwrap().kind,
            EngineEventKind::Journaled(ref r) if matches!(r.event, Event::TimerStarted { .. }))
        {}
    })
    .await;
    workers_gone(&node).await;

    // Requests the API counts by route template.
    assert_eq!(get(url("/api/v1/runs/d-ok"), Some(&admin)).await.0, StatusCode::OK);
    assert_eq!(get(url("/api/v1/runs/missing"), Some(&admin)).await.0, StatusCode::NOT_FOUND);
    let (status, _, body) = get(url("/metrics"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");

    let (status, content_type, text) = get(url("/metrics"), Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(content_type.as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
    let s = samples(&text);
    let value = |series: &str| s.get(series).copied().unwrap_or_else(|| panic!("no {series} in\n{text}"));
    let expected = [
        (r#"hodei_sagas_started_total{definition="deploy"}"#, 2.0),
        (r#"hodei_sagas_started_total{definition="retried"}"#, 1.0),
        (r#"hodei_sagas_started_total{definition="sleeper"}"#, 1.0),
        (r#"hodei_sagas_finished_total{definition="deploy",outcome="completed"}"#, 1.0),
        (r#"hodei_sagas_finished_total{definition="deploy",outcome="compensated"}"#, 1.0),
        (r#"hodei_sagas_finished_total{definition="retried",outcome="completed"}"#, 1.0),
        (r#"hodei_saga_duration_seconds_count{definition="deploy",outcome="compensated"}"#, 1.0),
        // Two runs of `deploy`, `verify`; the rollback is a compensation, not a step.
        (r#"hodei_step_attempts_total{definition="deploy"}"#, 4.0),
        (r#"hodei_step_attempts_total{definition="retried"}"#, 2.0),
        (r#"hodei_step_retries_total{definition="retried"}"#, 1.0),
        (r#"hodei_step_duration_seconds_count{definition="deploy",outcome="completed"}"#, 3.0),
        (r#"hodei_step_duration_seconds_count{definition="deploy",outcome="failed"}"#, 1.0),
        (r#"hodei_step_duration_seconds_count{definition="retried",outcome="completed"}"#, 1.0),
        (r#"hodei_compensations_total{definition="deploy",outcome="completed"}"#, 1.0),
        (r#"hodei_timers_started_total{definition="sleeper"}"#, 1.0),
        (r#"hodei_runs_in_flight{definition="sleeper",status="running"}"#, 1.0),
        ("hodei_timers_pending", 1.0),
        ("hodei_signal_waits_pending", 0.0),
        ("hodei_retry_backoffs_pending", 0.0),
        // Three jobs (two deploys, one rollback), each on a new ephemeral worker.
        (r#"hodei_job_queue_wait_seconds_count{provider="local"}"#, 3.0),
        (r#"hodei_worker_provisioning_seconds_count{provider="local",outcome="registered"}"#, 3.0),
        (r#"hodei_workers{provider="local",state="leased"}"#, 0.0),
        (r#"hodei_workers{provider="local",state="idle"}"#, 0.0),
        ("hodei_jobs_queued", 0.0),
        ("hodei_jobs_running", 0.0),
        // "deployed\n" twice and "rolled back\n"; "undo log\n".
        (r#"hodei_log_received_bytes_total{stream="stdout"}"#, 30.0),
        (r#"hodei_log_received_bytes_total{stream="stderr"}"#, 9.0),
        (r#"hodei_api_requests_total{method="GET",route="/api/v1/runs/{id}",status="200"}"#, 1.0),
        (r#"hodei_api_requests_total{method="GET",route="/api/v1/runs/{id}",status="404"}"#, 1.0),
        (r#"hodei_api_requests_total{method="GET",route="/metrics",status="401"}"#, 1.0),
    ];
    for (series, expected) in expected {
        assert_eq!(value(series), expected, "{series}");
    }
    for absent in
        [r#"hodei_step_retries_total{definition="deploy"}"#, r#"hodei_workers_lost_total{provider="local"}"#]
    {
        assert!(!s.contains_key(absent), "{absent} in\n{text}");
    }
    assert!(value("hodei_journal_flush_duration_seconds_count") > 0.0);
    assert!(value("hodei_journal_flush_writers_sum") >= value("hodei_journal_flush_writers_count"));
    assert!(value("hodei_log_fsync_duration_seconds_count") > 0.0);
    assert!(!text.contains("d-ok") && !text.contains("s-1"), "a run id in a label:\n{text}");
    promtool_accepts(&text);

    server.shutdown().await;
    within(node.shutdown(Duration::from_secs(5))).await.unwrap();
}

async fn engine() -> Engine {
    Engine::builder().store(MemoryStore::new()).start().await.unwrap()
}

fn api(engine: Engine, dir: &Path) -> ApiServerBuilder {
    ApiServer::builder(engine, dir).bind(loopback()).metrics(Metrics::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_token_reads_metrics_alone_and_open_metrics_stay_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let server = api(engine().await, dir.path())
        .metrics_access(MetricsAccess::ScrapeToken("scrape-secret".into()))
        .serve()
        .await
        .unwrap();
    let url = |path: &str| format!("http://{}{path}", server.local_addr());
    assert_eq!(get(url("/metrics"), Some("scrape-secret")).await.0, StatusCode::OK);
    assert_eq!(get(url("/metrics"), Some(&admin_token(dir.path()))).await.0, StatusCode::OK);
    assert_eq!(get(url("/metrics"), Some("not-it")).await.0, StatusCode::UNAUTHORIZED);
    // The scrape token opens nothing else.
    assert_eq!(get(url("/api/v1/runs"), Some("scrape-secret")).await.0, StatusCode::UNAUTHORIZED);
    server.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let server = api(engine().await, dir.path()).metrics_access(MetricsAccess::Open).serve().await.unwrap();
    let (status, _, text) = get(format!("http://{}/metrics", server.local_addr()), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("\nhodei_timers_pending 0\n"), "{text}");
    server.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let everywhere = SocketAddr::from(([0, 0, 0, 0], 0));
    // With TLS a wildcard address is allowed; open metrics on it are not.
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let tls =
        hodei_server::api::tls_config(&certified.cert.pem(), &certified.signing_key.serialize_pem()).unwrap();
    let refused = api(engine().await, dir.path())
        .bind(everywhere)
        .tls(tls)
        .metrics_access(MetricsAccess::Open)
        .serve()
        .await;
    assert!(matches!(refused, Err(ApiServeError::OpenMetrics(addr)) if addr == everywhere), "{refused:?}");

    // A server given no metrics answers 404 with the stable code.
    let dir = tempfile::tempdir().unwrap();
    let server = ApiServer::builder(engine().await, dir.path()).bind(loopback()).serve().await.unwrap();
    let (status, _, body) =
        get(format!("http://{}/metrics", server.local_addr()), Some(&admin_token(dir.path()))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["code"], "not_found");
    server.shutdown().await;
}

/// Kills the Prometheus server however the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value of the first sample of an instant query's answer, if it has one.
async fn query(http: &reqwest::Client, prometheus: SocketAddr, query: &str) -> Option<String> {
    let url = format!("http://{prometheus}/api/v1/query");
    let answer = http.get(url).query(&[("query", query)]).send().await.ok()?;
    let body: serde_json::Value = answer.json().await.ok()?;
    body["data"]["result"][0]["value"][1].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Prometheus server (Debian: apt-get install prometheus); run with: cargo test -p hodei-server --test metrics -- --ignored"]
async fn a_real_prometheus_server_scrapes_the_endpoint_with_its_scrape_token() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let engine = Engine::builder()
        .store(MemoryStore::new())
        .observer(std::sync::Arc::new(metrics.clone()))
        .register(retried())
        .start()
        .await
        .unwrap();
    assert_eq!(run::<u32>(&engine, "retried", "r-1", &()).await, Outcome::Completed(2));
    let server = ApiServer::builder(engine, dir.path())
        .bind(loopback())
        .metrics(metrics)
        .metrics_access(MetricsAccess::ScrapeToken("scrape-secret".into()))
        .serve()
        .await
        .unwrap();
    // A port that was free a moment ago: Prometheus binds it itself.
    let prometheus = std::net::TcpListener::bind(loopback()).unwrap().local_addr().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hodei\n    authorization:\n      credentials: scrape-secret\n    static_configs:\n      - targets: ['{}']\n",
            server.local_addr()
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address={prometheus}"))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the prometheus server (apt-get install prometheus)");
    let _prometheus = Killed(child);
    let http = reqwest::Client::new();
    // Prometheus scrapes on its own schedule: its query API is asked until the target is up
    // and the run is there, within a generous bound that fails the test.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let scraped = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            tick.tick().await;
            let up = query(&http, prometheus, r#"up{job="hodei"}"#).await;
            let started =
                query(&http, prometheus, r#"hodei_sagas_started_total{definition="retried"}"#).await;
            if up.as_deref() == Some("1") && started.is_some() {
                return started;
            }
        }
    })
    .await
    .expect("Prometheus never scraped the endpoint within 120 s");
    assert_eq!(scraped.as_deref(), Some("1"));
    server.shutdown().await;
}
