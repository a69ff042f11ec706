//! The one-call `Node` and the job steps it serves: a real sled journal, the embedded control
//! plane with in-process local workers over mutual TLS on loopback, real shell jobs.

mod support;

use std::time::Duration;

use hodei_core::{Engine, MemoryStore, Outcome, SagaContext, SagaDefinition, SagaId};
use hodei_server::Node;
use hodei_server::jobs::{JobOutcome, RemoteJobs, saga_jobs};
use hodei_server::logstore::LogStream;
use support::node_sagas::{deploy, run, shell};
use support::within;

/// Runs one job, `build`, through the dispatcher the context holds.
fn build() -> SagaDefinition {
    SagaDefinition::new("build", 1, |ctx: SagaContext, (): ()| async move {
        ctx.run_job("build", shell("echo built")).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_s_sagas_run_jobs_through_the_dispatcher_in_their_context() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder(dir.path()).register(build()).start().await.unwrap();
    let outcome: Outcome<JobOutcome> = run(node.engine(), "build", "b-1", &()).await;
    let Outcome::Completed(job) = outcome else { panic!("{outcome:?}") };
    assert_eq!((job.job_id.as_str(), job.exit_code), ("b-1/0#1", 0));
    let stdout = node.control_plane().logs().read("b-1/0#1", LogStream::Stdout, 0, 1024).await.unwrap();
    assert_eq!(stdout.bytes, b"built\n");
    within(node.shutdown(Duration::from_secs(5))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_job_compensates_its_step_when_the_saga_fails() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder(dir.path()).register(deploy()).start().await.unwrap();
    let outcome: Outcome<JobOutcome> = run(node.engine(), "deploy", "d-1", &true).await;
    assert_eq!(outcome, Outcome::Compensated { cause: "verification failed".into() });
    let history = node.engine().history(&SagaId::new("d-1").unwrap()).unwrap();
    let jobs = saga_jobs(node.control_plane().hub(), &SagaId::new("d-1").unwrap(), &history).await.unwrap();
    let listed: Vec<_> = jobs.iter().map(|job| (job.name.as_str(), job.job_id.as_str())).collect();
    assert_eq!(listed, [("deploy", "d-1/0#1"), ("deploy rollback", "d-1/0/rollback#1")]);
    assert!(jobs.iter().all(|job| job.result.is_some()), "both jobs ended: {jobs:?}");
    let logs = node.control_plane().logs();
    let stdout = logs.read("d-1/0/rollback#1", LogStream::Stdout, 0, 1024).await.unwrap();
    let stderr = logs.read("d-1/0/rollback#1", LogStream::Stderr, 0, 1024).await.unwrap();
    assert_eq!((stdout.bytes, stderr.bytes), (b"rolled back\n".to_vec(), b"undo log\n".to_vec()));
    within(node.shutdown(Duration::from_secs(5))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_that_completes_runs_no_rollback_job() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder(dir.path()).register(deploy()).start().await.unwrap();
    let outcome: Outcome<JobOutcome> = run(node.engine(), "deploy", "d-2", &false).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    let stored = node.control_plane().logs().jobs().await.unwrap();
    assert_eq!(stored, ["d-2/0#1"]);
    within(node.shutdown(Duration::from_secs(5))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_step_without_a_dispatcher_fails_naming_the_missing_type() {
    let engine = Engine::builder().store(MemoryStore::new()).register(build()).start().await.unwrap();
    let outcome: Outcome<JobOutcome> = run(&engine, "build", "b-2", &()).await;
    let Outcome::Failed { cause } = outcome else { panic!("{outcome:?}") };
    assert!(cause.contains("hodei_server::jobs::JobDispatcher"), "{cause}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reopens_its_directory_with_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let first = Node::builder(dir.path()).register(build()).start().await.unwrap();
    let outcome: Outcome<JobOutcome> = run(first.engine(), "build", "b-3", &()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    within(first.shutdown(Duration::from_secs(5))).await.unwrap();

    let second = Node::builder(dir.path()).register(build()).start().await.unwrap();
    let record = second.engine().status(&SagaId::new("b-3").unwrap()).unwrap();
    assert_eq!(record.status, hodei_core::SagaStatus::Completed);
    let outcome: Outcome<JobOutcome> = run(second.engine(), "build", "b-4", &()).await;
    let Outcome::Completed(job) = outcome else { panic!("{outcome:?}") };
    assert_eq!(job.job_id, "b-4/0#1");
    within(second.shutdown(Duration::from_secs(5))).await.unwrap();
}

/// Prints `HOME` as the job sees it, inheriting it from its worker or not.
fn home(inherit: bool) -> SagaDefinition {
    SagaDefinition::new(
        if inherit { "home-inherited" } else { "home" },
        1,
        move |ctx: SagaContext, (): ()| async move {
            let job = shell(r#"printf '%s' "${HOME-unset}""#);
            let job = if inherit { job.inherit_env(["HOME"]) } else { job };
            ctx.run_job("home", job).await
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_inherits_only_the_variables_it_names_from_its_worker() {
    let home_here = std::env::var("HOME").expect("tests run with a HOME");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder(dir.path()).register(home(true)).register(home(false)).start().await.unwrap();
    let logs = node.control_plane().logs();
    // The local provider's workers run in this process: their environment is this one's.
    let outcome: Outcome<JobOutcome> = run(node.engine(), "home-inherited", "h-1", &()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    assert_eq!(logs.read("h-1/0#1", LogStream::Stdout, 0, 4096).await.unwrap().bytes, home_here.as_bytes());
    let outcome: Outcome<JobOutcome> = run(node.engine(), "home", "h-2", &()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    assert_eq!(logs.read("h-2/0#1", LogStream::Stdout, 0, 4096).await.unwrap().bytes, b"unset");
    within(node.shutdown(Duration::from_secs(5))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_api_over_a_node_shows_a_run_s_jobs_and_their_logs() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder(dir.path()).register(deploy()).start().await.unwrap();
    let api = hodei_server::api::ApiServer::for_node(&node)
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .serve()
        .await
        .unwrap();
    let token = std::fs::read_to_string(api.admin_token_file().unwrap()).unwrap().trim().to_owned();
    let outcome: Outcome<JobOutcome> = run(node.engine(), "deploy", "d-api", &true).await;
    assert!(matches!(outcome, Outcome::Compensated { .. }), "{outcome:?}");
    let http = reqwest::Client::new();
    let get = |path: String| {
        let request = http.get(format!("http://{}{path}", api.local_addr())).bearer_auth(&token);
        async move { within(request.send()).await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let run = get("/api/v1/runs/d-api".into()).await;
    assert_eq!(run["status"], "compensated");
    let jobs = &run["steps"][0]["jobs"];
    assert_eq!(jobs[0]["job_id"], "d-api/0#1");
    assert_eq!(jobs[0]["outcome"], "exit 0");
    assert_eq!(jobs[1]["job_id"], "d-api/0/rollback#1");
    assert_eq!(jobs[1]["name"], "deploy rollback");
    assert_eq!(run["steps"][0]["compensation"]["state"], "completed");
    let log = get("/api/v1/jobs/d-api%2F0%2Frollback%231/logs/stderr".into()).await;
    assert_eq!((log["text"].as_str(), log["closed"].as_bool()), (Some("undo log\n"), Some(true)));
    let workers = get("/api/v1/workers".into()).await;
    assert!(workers.as_array().is_some(), "{workers}");
    api.shutdown().await;
    within(node.shutdown(Duration::from_secs(5))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_api_serves_https_with_a_certificate_from_the_embedded_ca() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder(dir.path()).register(build()).start().await.unwrap();
    let api = hodei_server::api::ApiServer::for_node(&node)
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .tls_from_embedded_ca(&["127.0.0.1", "localhost"])
        .unwrap()
        .serve()
        .await
        .unwrap();
    // What a client (`hodei --ca-cert`) trusts: the CA the workers already trust.
    let ca = std::fs::read_to_string(dir.path().join("pki/ca.cert.pem")).unwrap();
    for name in ["localhost", "127.0.0.1"] {
        let response = support::https_get(api.local_addr(), &ca, name, "/api/v1/health").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{name}: {response}");
    }
    api.shutdown().await;
    within(node.shutdown(Duration::from_secs(5))).await.unwrap();
}
