//! The dashboard in a real browser: headless Chromium driven through chromedriver (Debian's
//! `chromium` and `chromium-driver`), against a real operator API on loopback. Skipped, saying
//! so, when no chromedriver is found; `HODEI_REQUIRE_BROWSER=1` (set by `.ci/run`) makes that
//! a failure. Each scenario saves a screenshot under the test's output directory.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use fantoccini::{Client, Locator};
use hodei_core::{Engine, SledStore};
use hodei_server::api::ApiServer;
use serde_json::{Value, json};
use support::browser::{browser, start_driver};
use support::sagas::{flaky, gated, journaled, signal_wait};
use support::within;
use tempfile::TempDir;

/// What `#[saga]` would record of `gated`: its step calls in source order.
static GATED_SHAPE: hodei_core::SagaShape = hodei_core::SagaShape::new(
    "gated",
    1,
    &[hodei_core::StepShape::new("stage", Some("undo_stage")), hodei_core::StepShape::new("release", None)],
);

struct Served {
    _dir: TempDir,
    engine: Engine,
    server: ApiServer,
    admin: String,
    logs: std::sync::Arc<hodei_server::logstore::LogStore>,
}

impl Served {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder()
            .store(SledStore::open(dir.path().join("journal")).unwrap())
            .register(gated().with_shape(&GATED_SHAPE))
            .register(flaky())
            .start()
            .await
            .unwrap();
        let logs = std::sync::Arc::new(hodei_server::logstore::LogStore::open(dir.path()).await.unwrap());
        let server = ApiServer::builder(engine.clone(), dir.path())
            .logs(logs.clone())
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .serve()
            .await
            .unwrap();
        let admin = std::fs::read_to_string(dir.path().join("api/admin-token")).unwrap().trim().to_owned();
        Self { _dir: dir, engine, server, admin, logs }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.local_addr())
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = reqwest::Client::new()
            .post(self.url(path))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.unwrap_or(Value::Null)
    }

    async fn get(&self, path: &str) -> Value {
        let response =
            reqwest::Client::new().get(self.url(path)).bearer_auth(&self.admin).send().await.unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().await.unwrap()
    }

    async fn issue(&self, name: &str, role: &str) -> String {
        self.post("/api/v1/tokens", json!({"name": name, "role": role})).await["secret"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

async fn login(browser: &Client, served: &Served, token: &str) {
    browser.goto(&served.url("/#/login")).await.unwrap();
    let field = browser.wait().for_element(Locator::Css("#token")).await.unwrap();
    // The page may still hold the form (and the last attempt's token) from before.
    field.clear().await.unwrap();
    field.send_keys(token).await.unwrap();
    browser.find(Locator::Css("#login button[type=submit]")).await.unwrap().click().await.unwrap();
}

async fn text(browser: &Client, css: &str) -> String {
    browser.wait().for_element(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

/// Waits until an element that `xpath` selects holds `needle` in its text (the page updates
/// live; the browser's own element wait is the synchronisation).
async fn wait_for_text(browser: &Client, xpath: &str, needle: &str) {
    let locator = format!("{xpath}[contains(., '{needle}')]");
    browser.wait().for_element(Locator::XPath(&locator)).await.unwrap();
}

async fn screenshot(browser: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), browser.screenshot().await.unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_sees_runs_live_and_approves_a_gate() {
    let Some(driver) = start_driver() else { return };
    let served = Served::start().await;
    let alice = served.issue("alice", "operator").await;
    served
        .post("/api/v1/runs", json!({"definition": "gated", "id": "deploy-1", "input": {"service": "api"}}))
        .await;
    within(journaled(&served.engine, "deploy-1", signal_wait)).await;
    let browser = browser(&driver).await;

    within(async {
        // A wrong token is refused on the page.
        login(&browser, &served, "hodei_0011223344556677_0011").await;
        assert!(text(&browser, "#login-error").await.contains("Login failed"));
        login(&browser, &served, &alice).await;
        browser.wait().for_element(Locator::Css(r#"tr[data-run="deploy-1"]"#)).await.unwrap();
        assert_eq!(text(&browser, "#who").await, "alice (operator)");
        // A run started elsewhere appears without a reload.
        served.post("/api/v1/runs", json!({"definition": "flaky", "id": "flaky-1", "input": false})).await;
        browser.wait().for_element(Locator::Css(r#"tr[data-run="flaky-1"]"#)).await.unwrap();
        // The time filter: the page asks the API for runs started in the last hour (a time
        // the API must accept), both are, and the choice is in the shareable URL.
        let since = browser.find(Locator::Css("#since-filter")).await.unwrap();
        since.select_by_label("last hour").await.unwrap();
        // The list is drawn anew for the filter: wait until the old one is gone (a removed
        // element reads as stale).
        while let Ok(Some(connected)) = since.prop("isConnected").await
            && connected == "true"
        {}
        browser.wait().for_element(Locator::Css(r#"tr[data-run="flaky-1"]"#)).await.unwrap();
        browser.wait().for_element(Locator::Css(r#"tr[data-run="deploy-1"]"#)).await.unwrap();
        assert!(browser.current_url().await.unwrap().as_str().ends_with("#/?since=1h"));
        screenshot(&browser, "runs").await;

        browser.goto(&served.url("/#/runs/deploy-1")).await.unwrap();
        browser.wait().for_element(Locator::Css("#actions")).await.unwrap();
        // The static shape, coloured by where the run stands: staged, release not reached.
        browser.wait().for_element(Locator::Css("#shape .shape-node.status-completed")).await.unwrap();
        assert_eq!(text(&browser, "#shape .status-pending").await, "release pending");
        // The payload is a form built from the `Approval` type the saga waits for.
        let field = |name: &str| format!("#signal-form [name='{name}']");
        browser.find(Locator::Css(&field("comment"))).await.unwrap().send_keys("ship it").await.unwrap();
        browser.find(Locator::Css(&field("ticket?"))).await.unwrap().click().await.unwrap();
        browser.find(Locator::Css(&field("ticket"))).await.unwrap().send_keys("42").await.unwrap();
        browser.find(Locator::Css(&field("risk?"))).await.unwrap().click().await.unwrap();
        let risk = browser.find(Locator::Css(&field("risk"))).await.unwrap();
        let mut variants = Vec::new();
        for option in risk.find_all(Locator::Css("option")).await.unwrap() {
            variants.push(option.text().await.unwrap());
        }
        assert_eq!(variants, ["low", "high"]);
        risk.select_by_label("high").await.unwrap();
        let mitigation = browser.find(Locator::Css(&field("risk.high.mitigation"))).await.unwrap();
        mitigation.send_keys("canary first").await.unwrap();
        screenshot(&browser, "signal-form").await;
        let approve = browser.find(Locator::XPath("//button[text()='Approve']")).await.unwrap();
        approve.click().await.unwrap();
        // The first click only asks: nothing is sent yet.
        assert_eq!(approve.text().await.unwrap(), "Confirm: send it");
        approve.click().await.unwrap();
        // The page follows the run to its end and names the approver.
        wait_for_text(&browser, "//h1", "completed").await;
        wait_for_text(&browser, "//*[@id='signals']", "signal approval by alice").await;
        // The timeline: a row per step attempt and one for the wait, which ended with the signal.
        assert_eq!(browser.find_all(Locator::Css("#timeline .seg.attempt")).await.unwrap().len(), 2);
        browser.find(Locator::Css("#timeline .seg.wait.received")).await.unwrap();
        let nodes = browser.find_all(Locator::Css("#shape .shape-node.status-completed")).await.unwrap();
        assert_eq!(nodes.len(), 2, "both steps of the shape completed");
        screenshot(&browser, "run").await;
    })
    .await;
    let run = served.engine.status(&hodei_core::SagaId::new("deploy-1").unwrap()).unwrap();
    assert_eq!(run.status, hodei_core::SagaStatus::Completed);
    let detail = served.get("/api/v1/runs/deploy-1").await;
    assert_eq!(
        detail["signals"][0]["payload"],
        json!({"comment": "ship it", "ticket": 42, "risk": {"high": {"mitigation": "canary first"}}})
    );
    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_gets_no_actions_markup_stays_text_and_forged_requests_are_refused() {
    let Some(driver) = start_driver() else { return };
    let served = Served::start().await;
    let viewer = served.issue("val", "viewer").await;
    let hostile = r#"<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>"#;
    served
        .post("/api/v1/runs", json!({"definition": "gated", "id": "evil", "input": {"service": hostile}}))
        .await;
    within(journaled(&served.engine, "evil", signal_wait)).await;
    let browser = browser(&driver).await;

    within(async {
        login(&browser, &served, &viewer).await;
        browser.wait().for_element(Locator::Css(r#"tr[data-run="evil"]"#)).await.unwrap();
        browser.goto(&served.url("/#/runs/evil")).await.unwrap();
        browser.wait().for_element(Locator::Css("#steps")).await.unwrap();
        // A viewer's page has no action buttons.
        assert!(browser.find(Locator::Css("#actions")).await.is_err());
        // The markup in the run's input is on the page as text, and none of it ran.
        for details in browser.find_all(Locator::Css("details")).await.unwrap() {
            details.click().await.unwrap();
        }
        let page = browser.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
        assert!(page.contains("<img src=x onerror"), "{page}");
        let ran = browser.execute("return window.__xss === undefined", vec![]).await.unwrap();
        assert_eq!(ran, json!(true), "a payload's markup ran in the page");
        assert!(browser.find(Locator::Css("main img")).await.is_err(), "the payload became an element");
        screenshot(&browser, "text-not-markup").await;
        // A request with the session cookie but without the CSRF header, as another site could
        // make the browser send, is refused; so is the viewer's own attempt with it.
        let forged = browser
            .execute_async(
                r#"const done = arguments[0];
                   fetch("/api/v1/runs/evil/cancel", {method: "POST", credentials: "same-origin",
                     headers: {"Content-Type": "application/json"}, body: "{}"})
                   .then(r => done(r.status), e => done(String(e)));"#,
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(forged, json!(403));
        let as_viewer = browser
            .execute_async(
                r#"const done = arguments[0];
                   fetch("/api/v1/runs/evil/cancel", {method: "POST", credentials: "same-origin",
                     headers: {"Content-Type": "application/json", "X-Hodei-CSRF": "1"}, body: "{}"})
                   .then(r => r.json()).then(b => done(b.error.code), e => done(String(e)));"#,
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(as_viewer, json!("forbidden"));
    })
    .await;
    let run = served.engine.status(&hodei_core::SagaId::new("evil").unwrap()).unwrap();
    assert_eq!(run.status, hodei_core::SagaStatus::Running, "nothing was cancelled");
    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_view_follows_a_job_to_its_end_with_every_line_once_in_colour() {
    use hodei_server::logstore::LogStream;
    let Some(driver) = start_driver() else { return };
    let served = Served::start().await;
    let job = "build-1/1#1";
    served.logs.begin(job).await.unwrap();
    let line = |n: usize| format!("\x1b[32mok\x1b[0m line {n:04} <b>not bold</b>\n");
    let mut offset = 0u64;
    let mut write = |lines: std::ops::Range<usize>| {
        let batch: String = lines.map(line).collect();
        let at = offset;
        offset += batch.len() as u64;
        let logs = served.logs.clone();
        async move { logs.append(job, LogStream::Stdout, at, batch.as_bytes()).await.unwrap() }
    };
    write(0..500).await;
    let browser = browser(&driver).await;
    within(async {
        login(&browser, &served, &served.admin).await;
        browser.wait().for_element(Locator::Css("#who")).await.unwrap();
        browser.goto(&served.url("/#/jobs/build-1%2F1%231/stdout")).await.unwrap();
        // The first lines, then the rest written while the page follows, then the end.
        browser.wait().for_element(Locator::Css("#L500")).await.unwrap();
        for first in (500..2000).step_by(250) {
            write(first..first + 250).await;
        }
        served.logs.close(job).await.unwrap();
        wait_for_text(&browser, "//*[@id='log-status']", "ended").await;
        assert_eq!(text(&browser, "#log-status").await, "ended · 2000 lines");
        // Every line once, in order, as the job printed it: what the page offers to download.
        let saved = browser
            .execute_async(
                r#"const done = arguments[0];
                   fetch(document.getElementById("log-download").href).then(r => r.text()).then(done, e => done(String(e)));"#,
                vec![],
            )
            .await
            .unwrap();
        let printed: String = (0..2000).map(line).collect();
        let saved = saved.as_str().unwrap_or_default();
        let first_difference = saved.bytes().zip(printed.bytes()).position(|(a, b)| a != b);
        assert!(
            saved == printed,
            "the saved log ({} bytes) differs from what the job printed ({} bytes) at {first_difference:?}: {:?}",
            saved.len(),
            printed.len(),
            first_difference.map(|i| &saved[i.saturating_sub(20)..(i + 20).min(saved.len())])
        );
        // Only the lines in view are in the page, and it followed the log to its end.
        let rendered = browser.execute("return document.querySelectorAll('#log li').length", vec![]).await.unwrap();
        assert!(rendered.as_u64().is_some_and(|n| n > 0 && n < 200), "{rendered} rows in the page");
        assert_eq!(text(&browser, "#L2000 span.text").await, "ok line 1999 <b>not bold</b>");
        // The escape became a colour; the markup no element.
        assert!(browser.find(Locator::Css("#L2000 .ansi-32")).await.is_ok());
        assert!(browser.find(Locator::Css("#log b")).await.is_err());
        // Search: the matching line, far above the view, is drawn and marked.
        let search = browser.find(Locator::Css("#log-search")).await.unwrap();
        search.send_keys("line 0042 ").await.unwrap();
        search.send_keys("\u{E007}").await.unwrap(); // WebDriver's Enter key
        assert_eq!(text(&browser, "#log-hits").await, "1 matching lines");
        browser.wait().for_element(Locator::Css("#L43.hit")).await.unwrap();
        assert_eq!(text(&browser, "#L43 span.text").await, "ok line 0042 <b>not bold</b>");
        screenshot(&browser, "log").await;
    })
    .await;
    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_in_the_page_compensates_and_shows_who_and_in_what_order() {
    let Some(driver) = start_driver() else { return };
    let served = Served::start().await;
    let ops = served.issue("ops", "operator").await;
    served
        .post("/api/v1/runs", json!({"definition": "gated", "id": "doomed", "input": {"service": "api"}}))
        .await;
    within(journaled(&served.engine, "doomed", signal_wait)).await;
    let browser = browser(&driver).await;
    within(async {
        login(&browser, &served, &ops).await;
        browser.wait().for_element(Locator::Css(r#"tr[data-run="doomed"]"#)).await.unwrap();
        browser.goto(&served.url("/#/runs/doomed")).await.unwrap();
        let reason = browser.wait().for_element(Locator::Css("#cancel-reason")).await.unwrap();
        reason.send_keys("wrong branch").await.unwrap();
        let cancel = browser.find(Locator::XPath("//button[text()='Cancel run']")).await.unwrap();
        cancel.click().await.unwrap();
        cancel.click().await.unwrap();
        wait_for_text(&browser, "//h1", "compensated").await;
        wait_for_text(&browser, "//*[@id='requests']", "cancel by ops").await;
        assert!(text(&browser, "#requests").await.contains("wrong branch"));
        assert!(text(&browser, "#compensations").await.starts_with("stage: completed"));
    })
    .await;
    let record = served.engine.status(&hodei_core::SagaId::new("doomed").unwrap()).unwrap();
    assert_eq!(record.status, hodei_core::SagaStatus::Compensated);
    browser.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_page_draws_live_cpu_and_memory_sparklines_of_a_running_job() {
    use hodei_server::jobs::{Job, RemoteJobs};
    let Some(driver) = start_driver() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    assert!(Command::new("mkfifo").arg(&gate).status().unwrap().success());
    let script = format!("echo holding; read go < '{}'", gate.display());
    let holding = hodei_core::SagaDefinition::new("hold", 1, move |ctx: hodei_core::SagaContext, (): ()| {
        let job = Job::pooled_script(["/bin/sh"], script.clone()).env("PATH", "/usr/bin:/bin");
        async move { ctx.run_job("hold", job).await }
    });
    let node = hodei_server::Node::builder(dir.path().join("node")).register(holding).start().await.unwrap();
    let api = ApiServer::for_node(&node).bind(SocketAddr::from(([127, 0, 0, 1], 0))).serve().await.unwrap();
    let admin = std::fs::read_to_string(api.admin_token_file().unwrap()).unwrap().trim().to_owned();
    let handle = node.engine().start(hodei_core::SagaRun::new("hold", "hold-1", &()).unwrap()).await.unwrap();
    let browser = browser(&driver).await;
    within(async {
        browser.goto(&format!("http://{}/#/login", api.local_addr())).await.unwrap();
        let field = browser.wait().for_element(Locator::Css("#token")).await.unwrap();
        field.send_keys(&admin).await.unwrap();
        browser.find(Locator::Css("#login button[type=submit]")).await.unwrap().click().await.unwrap();
        browser.wait().for_element(Locator::Css("#who")).await.unwrap();
        browser.goto(&format!("http://{}/#/workers", api.local_addr())).await.unwrap();
        // Samples arrive about once a second per running job; two draw a CPU line.
        browser.wait().for_element(Locator::Css("tr[data-worker] .spark-mem svg polyline")).await.unwrap();
        browser.wait().for_element(Locator::Css("tr[data-worker] .spark-cpu svg polyline")).await.unwrap();
        let jobs = browser
            .find(Locator::Css("tr[data-worker] td:nth-child(6)"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(jobs, "hold-1/0#1");
        assert!(text(&browser, "tr[data-worker] .spark-mem").await.ends_with("MiB"));
        screenshot(&browser, "workers").await;
    })
    .await;
    tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    let outcome = within(handle.outcome::<serde_json::Value>()).await.unwrap();
    assert!(matches!(outcome, hodei_core::Outcome::Completed(_)), "{outcome:?}");
    browser.close().await.unwrap();
    api.shutdown().await;
    within(node.shutdown(std::time::Duration::from_secs(5))).await.unwrap();
}
