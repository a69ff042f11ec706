//! What a long-lived session carries besides jobs: certificate rotation, over the
//! authenticated stream, and live metrics of running jobs.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hodei_server::hub::HubConfig;
use hodei_server::pki::{PkiConfig, WorkerCertificate};
use support::{Setup, WORKER, within};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_agent(setup: &Setup) -> (Agent, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(support::agent_binary::agent_binary())
        .env_clear()
        .envs(setup.binary_env().iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    (Agent(child), stderr)
}

/// Reads the agent's status lines until one contains `needle`, on a thread (the pipe blocks).
async fn until_line(
    stderr: BufReader<std::process::ChildStderr>,
    needle: &'static str,
) -> BufReader<std::process::ChildStderr> {
    within(async move {
        tokio::task::spawn_blocking(move || {
            let mut stderr = stderr;
            let mut line = String::new();
            loop {
                line.clear();
                assert!(stderr.read_line(&mut line).unwrap() > 0, "the agent ended before `{needle}`");
                if line.contains(needle) {
                    return stderr;
                }
            }
        })
        .await
        .unwrap()
    })
    .await
}

fn stored_certificate(setup: &Setup) -> WorkerCertificate {
    let dir =
        setup.binary_env().iter().find(|(k, _)| *k == "HODEI_WORK_DIR").map(|(_, v)| v.clone()).unwrap();
    WorkerCertificate::from_pem(&std::fs::read_to_string(format!("{dir}/agent.crt")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rotates_its_certificate_over_the_session_and_reconnects_with_the_new_one() {
    // Certificates live a minute past the clock-skew allowance, so the agent is already past
    // two thirds of the first one's life when its session opens, and rotates at once.
    let config = HubConfig::default().heartbeat(Duration::from_secs(5), Duration::from_secs(15));
    let setup =
        Setup::hub_with_pki(config, PkiConfig::default().worker_cert_ttl(Duration::from_secs(60))).await;
    let mut workers = setup.hub.watch_workers();
    let (agent, stderr) = spawn_agent(&setup);
    let stderr = until_line(stderr, "registered; certificate stored").await;
    let first = stored_certificate(&setup);
    let _stderr = until_line(stderr, "certificate rotated").await;
    let rotated = stored_certificate(&setup);
    assert_eq!(rotated.worker_id, WORKER);
    assert_ne!(rotated.serial, first.serial, "a new certificate is stored");
    assert!(rotated.not_after >= first.not_after);

    // With the first certificate revoked, only the rotated one can open a session.
    setup.hub.pki().revoke_serial(&first.serial).unwrap();
    drop(agent);
    within(workers.wait_for(|w| !w.contains_key(WORKER))).await.unwrap();
    let (_agent, stderr) = spawn_agent(&setup);
    let _stderr = until_line(stderr, "reusing the stored certificate").await;
    within(workers.wait_for(|w| w.contains_key(WORKER))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_metrics_reach_the_hub() {
    let setup = Setup::new().await;
    let mut samples = setup.hub.subscribe_metrics();
    let run = setup.start_waiting_job("saga-metrics/0#1").await;
    let sample = within(async {
        loop {
            let sample = samples.recv().await.unwrap();
            if sample.job_id == "saga-metrics/0#1" {
                break sample;
            }
        }
    })
    .await;
    assert!(sample.at_unix_ms > 0);
    assert!(sample.memory_peak_bytes > 0, "{sample:?}");
    assert_eq!(setup.hub.job_metrics("saga-metrics/0#1").map(|s| s.job_id), Some(sample.job_id));
    setup.hub.cancel_job(WORKER, "saga-metrics/0#1", "done").await.unwrap();
    let result = within(run).await.unwrap().unwrap();
    assert!(!result.metrics_source.is_empty());
}
