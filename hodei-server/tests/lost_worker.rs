//! A worker that stops answering in the middle of a job: the real agent binary is frozen with
//! SIGSTOP, so its connection stays open and only the heartbeat timeout can tell. The hub marks
//! it lost, the job's attempt fails retryably, and the step runs it again once a worker with
//! that id is back (a new agent process reusing the stored certificate).

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hodei_core::{Engine, MemoryStore, Outcome, RetryPolicy, SagaContext, SagaDefinition, SagaRun};
use hodei_server::hub::HubConfig;
use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, MemorySecrets, RemoteJobs};
use hodei_server::logstore::LogStream;
use rustix::process::{Pid, Signal, kill_process, kill_process_group};
use support::{Setup, WORKER, within};

const TIMEOUT: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_millis(200);

struct Agent(Child);

impl Agent {
    fn spawn(setup: &Setup) -> Self {
        let child = Command::new(support::agent_binary::agent_binary())
            .env_clear()
            .envs(setup.binary_env().iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self(child)
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.0.id()).unwrap()).unwrap();
        kill_process(pid, signal).unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_marked_lost_by_the_heartbeat_timeout_and_its_job_retried() {
    let config = HubConfig::default()
        .heartbeat(INTERVAL, TIMEOUT)
        .log_batches(64 * 1024, Duration::from_millis(10))
        // Never reached: the retry waits for the new agent, however slowly it starts.
        .worker_wait(Duration::from_secs(3600));
    let setup = Setup::hub(config).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran-once").display().to_string();
    let gate = dir.path().join("gate");
    assert!(Command::new("mkfifo").arg(&gate).status().unwrap().success());
    let script = "echo \"pgid $$\"; if [ -e \"$MARKER\" ]; then echo second; exit 0; fi; touch \"$MARKER\"; \
                  read go < \"$GATE\"; echo released; exec sleep 1000";
    let job = Job::command(WORKER, ["/bin/sh", "-c", script])
        .env("PATH", "/usr/bin:/bin")
        .env("MARKER", marker)
        .env("GATE", gate.display().to_string());
    let jobs = JobDispatcher::new(setup.hub.clone(), Arc::new(MemorySecrets::new()))
        .retry(RetryPolicy::attempts(3).initial_backoff(Duration::from_millis(10)));
    let definition = SagaDefinition::new("pipeline", 1, move |ctx: SagaContext, (): ()| {
        let (jobs, job) = (jobs.clone(), job.clone());
        async move { ctx.run_job_on(&jobs, "wait", job).await }
    });
    let engine = Engine::builder().store(MemoryStore::new()).register(definition).start().await.unwrap();

    let mut workers = setup.hub.watch_workers();
    let first = Agent::spawn(&setup);
    within(workers.wait_for(|w| w.contains_key(WORKER))).await.unwrap();
    let handle = engine.start(SagaRun::new("pipeline", "saga-frozen", &()).unwrap()).await.unwrap();
    setup.wait_for_stdout("saga-frozen/0#1", b"pgid ").await;
    let stdout = String::from_utf8(setup.stored("saga-frozen/0#1", LogStream::Stdout).await).unwrap();
    let orphan: i32 = stdout.lines().next().unwrap().strip_prefix("pgid ").unwrap().parse().unwrap();

    // The hub cuts a worker off a heartbeat timeout after the last message it had from it. When
    // the agent's last heartbeat went out depends on the machine's load; a line of the job's
    // that only the gate lets out is a message known to come after this moment.
    let heard_after = Instant::now();
    tokio::task::spawn_blocking(move || std::fs::write(gate, "go\n").unwrap()).await.unwrap();
    setup.wait_for_stdout("saga-frozen/0#1", b"released").await;
    first.signal(Signal::STOP);
    within(workers.wait_for(|w| !w.contains_key(WORKER))).await.unwrap();
    let noticed = heard_after.elapsed();
    assert!(noticed >= TIMEOUT, "marked lost {noticed:?} after it was last heard, before the timeout");
    drop(first);
    // The frozen agent's job lives on in its own process group (SIGKILL gives the agent no
    // chance to stop it); end it, as a container's or VM's end would.
    let _ = kill_process_group(Pid::from_raw(orphan).unwrap(), Signal::KILL);

    let _second = Agent::spawn(&setup);
    let outcome = within(handle.outcome::<JobOutcome>()).await.unwrap();
    let Outcome::Completed(job) = outcome else { panic!("not completed: {outcome:?}") };
    assert_eq!(job.job_id, "saga-frozen/0#2", "retried as a new attempt");
    let rerun = String::from_utf8(setup.stored("saga-frozen/0#2", LogStream::Stdout).await).unwrap();
    assert!(rerun.ends_with("second\n"), "{rerun}");
}
