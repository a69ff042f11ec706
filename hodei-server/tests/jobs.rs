//! Jobs end to end: a real hub with a log store, the agent's run loop in-process, real child
//! processes, over mutual TLS on loopback.

mod support;

use std::sync::Arc;

use hodei_agent::protocol::v1::{self, job_result::Outcome};
use hodei_agent::runner::CgroupMode;
use hodei_server::hub::{Hub, HubConfig, HubError};
use hodei_server::logstore::LogStream;
use hodei_server::pki::{HubPki, PkiConfig};
use support::{Setup, WORKER, shell, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_and_its_whole_output_and_exit_code_are_stored() {
    let mut setup = Setup::new().await;
    let spec = shell("saga-1/build", "for i in $(seq 1 2000); do echo line $i; done; echo oops >&2; exit 3");
    let result = within(setup.hub.run_job(WORKER, spec)).await.unwrap();

    let expected: String = (1..=2000).map(|i| format!("line {i}\n")).collect();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(3)), "{result:?}");
    assert_eq!(result.stdout_bytes, expected.len() as u64);
    assert_eq!(result.stderr_bytes, "oops\n".len() as u64);
    // The agent runs with the default `CgroupMode::Auto`: a cgroup of the job's own where this
    // machine delegates one (cgroup v2 with the memory controller), else `/proc`.
    let source = if CgroupMode::Auto.usable_parent().is_some() { "cgroup" } else { "proc" };
    assert_eq!(result.metrics_source, source, "{result:?}");
    assert_eq!(setup.stored("saga-1/build", LogStream::Stdout).await, expected.as_bytes());
    assert_eq!(setup.stored("saga-1/build", LogStream::Stderr).await, b"oops\n");
    assert!(setup.logs.status("saga-1/build").await.unwrap().closed, "closed once the result is in");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_sent_with_the_job_is_masked_in_the_stored_log() {
    let mut setup = Setup::new().await;
    let secret = "hunter2-very-secret";
    // The runner's stdin header sets `TOKEN=<base64>` for `sh -s`; the script prints it decoded.
    let spec = v1::JobSpec {
        job_id: "saga-2/deploy".to_owned(),
        interpreter: vec!["/bin/sh".to_owned()],
        script: "echo \"token: $TOKEN\"\n".to_owned(),
        env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
        secrets: [("TOKEN".to_owned(), secret.to_owned())].into(),
        ..v1::JobSpec::default()
    };
    let result = within(setup.hub.run_job(WORKER, spec)).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");

    let stored = setup.stored("saga-2/deploy", LogStream::Stdout).await;
    assert_eq!(String::from_utf8_lossy(&stored), "token: ***\n");
    assert!(!stored.windows(secret.len()).any(|w| w == secret.as_bytes()));
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_returns_a_cancelled_result() {
    let mut setup = Setup::new().await;
    let run = setup.start_waiting_job("saga-3/wait").await;

    within(setup.hub.cancel_job(WORKER, "saga-3/wait", "the saga was aborted")).await.unwrap();
    let result = within(run).await.unwrap().unwrap();
    assert_eq!(result.outcome, Some(Outcome::Cancelled("the saga was aborted".to_owned())), "{result:?}");
    assert_eq!(setup.stored("saga-3/wait", LogStream::Stdout).await, b"ready\n");
    setup.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_goes_away_fails_with_worker_lost() {
    let mut setup = Setup::new().await;
    let run = setup.start_waiting_job("saga-4/wait").await;

    setup.stop_agent().await;
    let error = within(run).await.unwrap().unwrap_err();
    assert!(matches!(&error, HubError::WorkerLost { job_id, .. } if job_id == "saga-4/wait"), "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_for_an_unknown_worker_are_refused() {
    let mut setup = Setup::new().await;
    let error = within(setup.hub.run_job("w-nobody", shell("saga-5/x", "true"))).await.unwrap_err();
    assert!(matches!(&error, HubError::UnknownWorker { worker_id } if worker_id == "w-nobody"), "{error:?}");
    setup.stop_agent().await;
}

#[tokio::test]
async fn a_hub_without_a_log_store_runs_no_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Arc::new(HubPki::open(dir.path(), PkiConfig::default()).unwrap());
    let hub = Hub::new(pki, HubConfig::default());
    let error = hub.run_job(WORKER, shell("saga-6/x", "true")).await.unwrap_err();
    assert!(matches!(error, HubError::NoLogStore), "{error:?}");
}
