//! Remote jobs under chaos on one PostgreSQL: three engine processes, each with its control
//! plane sharing the database and workers that are `hodei-agent` processes of their own (so
//! they outlive their engine), run pipelines of two jobs each, while engines are killed with
//! SIGKILL and restarted, one is frozen with SIGSTOP past its lease and the agents' heartbeat
//! timeout, one is cut off from the database (through a TCP proxy the test holds) for longer
//! than its lease, and PostgreSQL itself is restarted (`pg_ctl -m immediate`) while jobs write
//! to it. A job's agent then goes on with another control plane, and its saga is taken over by
//! another engine, whose step waits for that job rather than running it again.
//!
//! At the end every run completed; the log of every job whose result a step journaled is
//! complete and in order, read back from the database; no job ran twice at once (each run of a
//! job holds an `flock` on a file of its own and records a conflict if it cannot take it), nor
//! twice at all, since no worker is lost. It prints how many jobs each fault caught running on
//! the workers of the engine it hit, and how many steps waited for a held job, and requires
//! both to be above zero. Skipped (with a line saying so) without `HODEI_TEST_POSTGRES_URL`,
//! `HODEI_TEST_POSTGRES_DIR` and `HODEI_TEST_POSTGRES_BIN` (the server to restart), which
//! `.ci/postgres` exports.
#![cfg(unix)]

#[path = "support/agent_binary.rs"]
mod agent_binary;
#[path = "../../examples/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "support/on_message.rs"]
mod on_message;
#[path = "../../hodei-core/tests/cluster/server.rs"]
mod server;
#[path = "../../hodei-core/tests/cluster/tcp_proxy.rs"]
mod tcp_proxy;
#[path = "../../hodei-core/src/store/postgres/test_database.rs"]
mod test_database;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{Cluster, Heard};
use hodei_core::{
    Engine, EngineEventKind, Event, PostgresOptions, PostgresStore, RetryPolicy, SagaContext, SagaDefinition,
    SagaId, SagaRun, SagaStatus,
};
use hodei_providers::LocalProvider;
use hodei_server::ControlPlane;
use hodei_server::hub::HubConfig;
use hodei_server::jobs::{Job, JobOutcome, MemorySecrets, RemoteJobs};
use hodei_server::logstore::{LogStore, LogStoreConfig, LogStream};
use hodei_server::scheduler::ProviderPolicy;
use tcp_proxy::TcpProxy;
use test_database::TestDatabase;
use tokio::process::Command;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

const TEST: &str = "jobs_survive_their_engines_being_killed";
const ENGINES: [&str; 3] = ["engine-a", "engine-b", "engine-c"];
const RUNS: usize = 8;
const STEPS: [&str; 2] = ["build", "test"];
/// Lines each job prints, one every 50 ms: a job takes a second and a half, so kills land
/// while jobs run.
const LINES: usize = 30;
/// A fault, at a time after every engine is up.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL of the engine, restarted a second later.
    Kill(usize),
    /// SIGSTOP of the engine for longer than its lease and the agents' heartbeat timeout
    /// (they leave it for another control plane), then SIGCONT: a zombie whose jobs went on
    /// elsewhere.
    Freeze(usize),
    /// PostgreSQL stopped at once (`pg_ctl restart -m immediate`) and started again, while
    /// jobs write their logs to it.
    RestartDatabase,
    /// The engine (engine-c, the one behind the proxy) cut off from the database for longer
    /// than its lease and the agents' heartbeat timeout, connections dropped, then restored:
    /// its engine loses its runs, its control plane its sessions.
    Cut,
}

const SCHEDULE: [(Duration, Fault); 6] = [
    (Duration::from_millis(2_500), Fault::Kill(0)),
    (Duration::from_millis(5_000), Fault::Freeze(1)),
    (Duration::from_millis(7_500), Fault::Kill(2)),
    (Duration::from_millis(9_000), Fault::RestartDatabase),
    (Duration::from_millis(11_000), Fault::Kill(1)),
    (Duration::from_millis(13_000), Fault::Cut),
];
/// The engine that reaches the database through the proxy.
const BEHIND_PROXY: usize = 2;

const RESTART_AFTER: Duration = Duration::from_secs(1);
const FROZEN_FOR: Duration = Duration::from_secs(3);
const CUT_FOR: Duration = Duration::from_secs(3);
/// How often agents and control planes say they are alive, and how long before a silent
/// session is closed; a job's worker has [`WORKER_WAIT`], longer, to come back with another.
const HEARTBEAT: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(2));
const WORKER_WAIT: Duration = Duration::from_secs(10);
/// How long the runs may stay unfinished with nothing heard before the test gives up.
const STUCK: Duration = Duration::from_secs(90);

/// One job of a run: its lines on stdout, its start and end in the effects file, and the lock
/// that tells a second concurrent run of it.
fn job(run: &str, step: &str, effects: &Path, locks: &Path) -> Job {
    let script = format!(
        "exec 9>>\"$LOCKS/$RUN.$STEP\"
flock -n 9 || {{ echo \"concurrent $RUN $STEP\" >> \"$EFFECTS\"; exit 99; }}
echo \"start $RUN $STEP $(date +%s%N) $PWD\" >> \"$EFFECTS\"
i=1
while [ $i -le {LINES} ]; do echo \"$RUN $STEP line $i\"; i=$((i+1)); sleep 0.05; done
echo \"end $RUN $STEP $(date +%s%N)\" >> \"$EFFECTS\"
"
    );
    Job::pooled_command(["/bin/sh", "-c", &script])
        .env("PATH", "/usr/bin:/bin")
        .env("RUN", run)
        .env("STEP", step)
        .env("EFFECTS", effects.display().to_string())
        .env("LOCKS", locks.display().to_string())
}

fn expected_log(run: &str, step: &str) -> Vec<u8> {
    (1..=LINES).map(|i| format!("{run} {step} line {i}\n")).collect::<String>().into_bytes()
}

/// The pipeline: its two jobs in order; its output, their job ids.
fn pipeline(
    dispatcher: hodei_server::jobs::JobDispatcher,
    effects: PathBuf,
    locks: PathBuf,
) -> SagaDefinition {
    SagaDefinition::new("jobs", 1, move |ctx: SagaContext, (): ()| {
        let (dispatcher, effects, locks) = (dispatcher.clone(), effects.clone(), locks.clone());
        async move {
            let run = ctx.id().to_string();
            let mut ids = Vec::new();
            for step in STEPS {
                let outcome: JobOutcome =
                    ctx.run_job_on(&dispatcher, step, job(&run, step, &effects, &locks)).await?;
                ids.push(outcome.job_id);
            }
            Ok(ids)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_their_engines_being_killed() {
    if let Ok(name) = std::env::var("HODEI_JOBS_ENGINE") {
        return child(&name).await;
    }
    let Some(db) = TestDatabase::new("jobs chaos") else { return };
    let Some(server) = server::Server::from_env() else { return };
    // With `HODEI_JOBS_CHAOS_LOGS=<dir>`, everything is kept there (the engines' logs, the
    // workers' directories with the agents' output) to find out afterwards why a run stalled.
    let work = match std::env::var_os("HODEI_JOBS_CHAOS_LOGS") {
        Some(dir) => tempfile::Builder::new().disable_cleanup(true).tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    std::fs::create_dir_all(work.path().join("locks")).unwrap();
    // Built before the engines need it, so that no engine waits on cargo.
    agent_binary::agent_binary();
    let (proxy, proxied) = TcpProxy::in_front_of(&db.url).await;
    let command = |n: usize, runs: usize| {
        let url = if n == BEHIND_PROXY { proxied.as_str() } else { db.url.as_str() };
        engine_command(ENGINES[n], runs, url, &db, work.path())
    };
    let mut cluster = Cluster::start((0..ENGINES.len()).map(|n| command(n, RUNS)));
    let total = ENGINES.len() * RUNS;
    let mut ready = 0;
    let mut finished = BTreeSet::new();
    while ready < ENGINES.len() {
        match cluster.heard().await {
            (_, Heard::Ready) => ready += 1,
            (_, Heard::Finished(run)) => drop(finished.insert(run)),
            _ => {}
        }
    }
    let began = Instant::now();
    let mut faults = SCHEDULE.iter().peekable();
    // Engines killed or frozen, and when each is restarted or thawed.
    let mut restarts: Vec<(Instant, usize)> = Vec::new();
    let mut thaws: Vec<(Instant, usize)> = Vec::new();
    let mut restore_at: Option<Instant> = None;
    let mut log = Vec::new();
    let mut last_progress = Instant::now();
    let mut held_waits = 0;
    // Each kill or freeze: the engine, and when by the clock the jobs read (`date +%s%N`).
    let mut killed_at: Vec<(usize, u128)> = Vec::new();
    let mut restarted_at = None;
    while finished.len() < total
        || !restarts.is_empty()
        || !thaws.is_empty()
        || restore_at.is_some()
        || faults.peek().is_some()
    {
        let next_fault = faults.peek().map(|(at, _)| began + *at);
        let next_restart = restarts.iter().chain(&thaws).map(|(at, _)| *at).min();
        let wake = [next_fault, next_restart, restore_at].into_iter().flatten().min();
        if last_progress.elapsed() >= STUCK {
            panic!(
                "no run finished for {STUCK:?}: {} of {total} finished; faults: {log:?}\n{}\neffects:\n{}",
                finished.len(),
                shared_state(&db).await,
                std::fs::read_to_string(work.path().join("effects")).unwrap_or_default()
            );
        }
        let heard = match wake {
            Some(at) => tokio::time::timeout_at(at.into(), cluster.heard()).await.ok(),
            None => tokio::time::timeout(STUCK, cluster.heard()).await.ok(),
        };
        match heard {
            Some((_, Heard::Finished(run))) => {
                finished.insert(run);
                last_progress = Instant::now();
                continue;
            }
            Some((_, Heard::Held)) => held_waits += 1,
            _ => {}
        }
        if heard.is_some() {
            continue;
        }
        let now = Instant::now();
        if let Some(&&(at, fault)) = faults.peek()
            && now >= began + at
        {
            faults.next();
            match fault {
                Fault::Kill(victim) => {
                    cluster.kill(victim).await;
                    killed_at.push((victim, unix_nanos()));
                    log.push(format!("{:>6.1?} SIGKILL {}", began.elapsed(), ENGINES[victim]));
                    restarts.push((Instant::now() + RESTART_AFTER, victim));
                }
                Fault::Freeze(victim) => {
                    cluster.signal(victim, "-STOP");
                    killed_at.push((victim, unix_nanos()));
                    log.push(format!("{:>6.1?} SIGSTOP {}", began.elapsed(), ENGINES[victim]));
                    thaws.push((Instant::now() + FROZEN_FOR, victim));
                }
                Fault::RestartDatabase => {
                    // Blocking: the engines' lines wait in their pipes meanwhile.
                    let at = began.elapsed();
                    restarted_at = Some(unix_nanos());
                    tokio::task::block_in_place(|| server.restart());
                    log.push(format!("{at:>6.1?} PostgreSQL restarted ({:.1?})", began.elapsed() - at));
                }
                Fault::Cut => {
                    proxy.cut();
                    killed_at.push((BEHIND_PROXY, unix_nanos()));
                    log.push(format!(
                        "{:>6.1?} cut {} from the database",
                        began.elapsed(),
                        ENGINES[BEHIND_PROXY]
                    ));
                    restore_at = Some(Instant::now() + CUT_FOR);
                }
            }
        }
        if restore_at.is_some_and(|at| at <= now) {
            proxy.restore();
            restore_at = None;
            log.push(format!("{:>6.1?} restored {}'s connection", began.elapsed(), ENGINES[BEHIND_PROXY]));
        }
        let thawed: Vec<usize> = thaws.iter().filter(|(at, _)| *at <= now).map(|(_, n)| *n).collect();
        thaws.retain(|(at, _)| *at > now);
        for victim in thawed {
            cluster.signal(victim, "-CONT");
            log.push(format!("{:>6.1?} SIGCONT {}", began.elapsed(), ENGINES[victim]));
        }
        let due: Vec<usize> = restarts.iter().filter(|(at, _)| *at <= now).map(|(_, n)| *n).collect();
        restarts.retain(|(at, _)| *at > now);
        for victim in due {
            cluster.restart(victim, command(victim, 0));
            log.push(format!("{:>6.1?} restarted {}", began.elapsed(), ENGINES[victim]));
        }
    }
    assert!(cluster.stop().await, "an engine did not stop cleanly");
    for line in &log {
        println!("fault: {line}");
    }

    // Read back from the database.
    let store = Arc::new(PostgresStore::connect_with(&db.url, db.options()).await.unwrap());
    let logs = LogStore::open_shared(work.path().join("reader"), LogStoreConfig::default(), store.clone())
        .await
        .unwrap();
    let effects = std::fs::read_to_string(work.path().join("effects")).unwrap_or_default();
    assert!(!effects.contains("concurrent"), "a job ran twice at once:\n{effects}");
    // Each run of each job: when it started, in which directory (its worker's), and when it
    // ended (runs of one job never overlap: the lock).
    let mut runs_of: BTreeMap<(String, String), Vec<JobRun>> = BTreeMap::new();
    for line in effects.lines() {
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            ["start", run, step, at, dir] => runs_of
                .entry(((*run).to_owned(), (*step).to_owned()))
                .or_default()
                .push(JobRun { start: at.parse().unwrap(), end: None, dir: (*dir).to_owned() }),
            ["end", run, step, at] => {
                let runs = runs_of
                    .get_mut(&((*run).to_owned(), (*step).to_owned()))
                    .expect("ended after it started");
                runs.last_mut().expect("a run").end = Some(at.parse().unwrap());
            }
            _ => panic!("unexpected effect line {line:?}"),
        }
    }
    let first_start = runs_of.values().flatten().map(|r| r.start).min().unwrap_or(0);
    // The kill windows hit: jobs running on a worker of the engine that was killed.
    let mut hit = 0;
    for (victim, at) in &killed_at {
        let on_victim = format!("/{}/", ENGINES[*victim]);
        let running = runs_of
            .values()
            .flatten()
            .filter(|r| r.start < *at && r.end.is_none_or(|end| end > *at) && r.dir.contains(&on_victim))
            .count();
        println!("a fault hit {}: {running} jobs running on its workers", ENGINES[*victim]);
        hit += running;
    }
    assert!(hit > 0, "no fault landed while a job of the engine it hit ran");
    if let Some(at) = restarted_at {
        let running =
            runs_of.values().flatten().filter(|r| r.start < at && r.end.is_none_or(|end| end > at)).count();
        println!("PostgreSQL restarted: {running} jobs running");
    }
    println!("{held_waits} steps waited for a job a worker already held");
    assert!(held_waits > 0, "no step waited for a held job");
    let mut checked_logs = 0;
    for engine in ENGINES {
        for k in 0..RUNS {
            let run = format!("{engine}-{k}");
            let id = SagaId::new(run.clone()).unwrap();
            let record = {
                let (store, id) = (store.clone(), id.clone());
                tokio::task::spawn_blocking(move || {
                    (
                        hodei_core::EventStore::record(&*store, &id),
                        hodei_core::EventStore::history(&*store, &id),
                    )
                })
                .await
                .unwrap()
            };
            let (record, history) = (record.0.unwrap().expect("the run exists"), record.1.unwrap());
            assert_eq!(record.status, SagaStatus::Completed, "{run}: {record:?}");
            let outputs: Vec<JobOutcome> = history
                .iter()
                .filter_map(|e| match &e.event {
                    Event::StepCompleted { output, .. } => Some(hodei_core::payload_to_json(output).unwrap()),
                    _ => None,
                })
                .map(|json| serde_json::from_value(json).unwrap())
                .collect();
            assert_eq!(outputs.len(), STEPS.len(), "{run}: every job's step completed once");
            for (outcome, step) in outputs.iter().zip(STEPS) {
                let stored = logs.read(&outcome.job_id, LogStream::Stdout, 0, 1 << 20).await.unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&stored.bytes),
                    String::from_utf8_lossy(&expected_log(&run, step)),
                    "the log of {} is whole and in order",
                    outcome.job_id
                );
                checked_logs += 1;
                let runs = &runs_of[&(run.clone(), step.to_owned())];
                assert!(runs.last().is_some_and(|r| r.end.is_some()), "{run} {step}: its last run ended");
            }
        }
    }
    println!("{total} runs completed, {checked_logs} job logs whole, {} jobs", runs_of.len());
    // No worker is lost here (agents are processes of their own, and none is destroyed while
    // the test runs): a job that ran twice was started again instead of waited for.
    let ran_again: Vec<_> = runs_of
        .iter()
        .filter(|(_, runs)| runs.len() > 1)
        .map(|(job, runs)| {
            let when = |at: u128| format!("{:.1}s", (at.saturating_sub(first_start) as f64) / 1e9);
            let runs: Vec<_> = runs
                .iter()
                .map(|r| (when(r.start), r.end.map(when), r.dir.rsplit('/').nth(2).map(str::to_owned)))
                .collect();
            (job, runs)
        })
        .collect();
    assert!(
        ran_again.is_empty(),
        "jobs run again although their worker held them (from the first job's start, by engine; faults at {:?}): {ran_again:?}",
        killed_at
            .iter()
            .map(|(n, at)| (ENGINES[*n], format!("{:.1}s", (at.saturating_sub(first_start) as f64) / 1e9)))
            .collect::<Vec<_>>()
    );
}

/// What the database says of the runs in flight, their jobs, and the engines: for a test that
/// is stuck, which runs and why.
async fn shared_state(db: &TestDatabase) -> String {
    let admin = db.admin().await;
    let rows = |sql: &'static str| {
        let admin = &admin;
        async move {
            admin
                .simple_query(sql)
                .await
                .map(|messages| {
                    messages
                        .iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                                (0..row.len())
                                    .map(|i| row.get(i).unwrap_or("NULL"))
                                    .collect::<Vec<_>>()
                                    .join(" | "),
                            ),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                        .join("\n  ")
                })
                .unwrap_or_else(|e| e.to_string())
        }
    };
    format!(
        "engines (id, live):\n  {}\nruns in flight (id, owner, epoch):\n  {}\njobs without a result (job, worker, member, detached_at, closed):\n  {}",
        rows("SELECT id, lease_until > now() FROM hodei_engines ORDER BY id").await,
        rows("SELECT id, owner, epoch FROM hodei_sagas WHERE in_flight ORDER BY id").await,
        rows("SELECT job, worker, member, detached_at, closed FROM hodei_job_logs WHERE result IS NULL ORDER BY job").await,
    )
}

/// One run of a job, from the effects file.
struct JobRun {
    start: u128,
    end: Option<u128>,
    dir: String,
}

/// The agent the workers run; with `HODEI_JOBS_CHAOS_LOGS`, a wrapper that also keeps each
/// agent's status lines in `agents/<worker>.log` of that directory (a worker's own directory
/// is removed with it).
fn agent_program(dir: &Path) -> PathBuf {
    let agent = agent_binary::agent_binary().to_path_buf();
    let Some(logs) = std::env::var_os("HODEI_JOBS_CHAOS_LOGS") else { return agent };
    let kept = Path::new(&logs).join("agents");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let wrapper = dir.join("agent-wrapper.sh");
    std::fs::write(
        &wrapper,
        // `exec -a`: the agent keeps the wrapper's name as its argv[0], which is how a later
        // control plane recognises the process as this worker's agent (and adopts or stops it).
        format!(
            "#!/bin/bash\nHODEI_AGENT_LOG=debug exec -a {} {} \"$@\" 2>>{}/\"$HODEI_WORKER_ID\".log\n",
            wrapper.display(),
            agent.display(),
            kept.display()
        ),
    )
    .unwrap();
    let mut permissions = std::fs::metadata(&wrapper).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&wrapper, permissions).unwrap();
    wrapper
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn engine_command(name: &str, runs: usize, url: &str, db: &TestDatabase, work: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", TEST, "--nocapture"])
        .env("HODEI_JOBS_ENGINE", name)
        .env("HODEI_JOBS_RUNS", runs.to_string())
        .env("HODEI_JOBS_URL", url)
        .env("HODEI_JOBS_SCHEMA", &db.schema)
        .env("HODEI_JOBS_WORK", work);
    command
}

/// The child's side: one engine process with its control plane, which starts
/// `HODEI_JOBS_RUNS` runs (none when it is restarted), prints each run that finishes on it, and
/// stops when its standard input closes.
async fn child(name: &str) {
    // The parent counts the steps that found their job held by a worker.
    let held = on_message::OnMessage {
        message: "waiting for the run a worker already holds",
        then: || println!("{}", cluster::HELD),
    };
    // With `HODEI_JOBS_CHAOS_LOGS=<dir>`, each engine process appends its log to
    // `<dir>/<name>.log` (restarts included), to find out afterwards why a run stalled.
    let logs = std::env::var_os("HODEI_JOBS_CHAOS_LOGS").map(|dir| {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&dir).join(format!("{name}.log")))
            .expect("opening the engine's log file");
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .with_filter(tracing_subscriber::EnvFilter::new("info,hodei_core=debug,hodei_server=debug"))
    });
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(held).with(logs)).unwrap();
    // As a supervisor would: an engine that fails while the database is down (at its start,
    // or as it stops) starts again until it can connect.
    let mut tries = 0;
    while let Err(e) = engine_process(name).await {
        tries += 1;
        assert!(tries < 100, "{name} could not start: {e}");
        eprintln!("{name}: stopped ({e}); again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn engine_process(name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let var = |key: &str| std::env::var(key).unwrap();
    let runs: usize = var("HODEI_JOBS_RUNS").parse().unwrap();
    let work = PathBuf::from(var("HODEI_JOBS_WORK"));
    let options =
        PostgresOptions::default().schema(var("HODEI_JOBS_SCHEMA")).lease(cluster::LEASE).engine_id(name);
    let store = Arc::new(PostgresStore::connect_with(&var("HODEI_JOBS_URL"), options).await?);
    let dir = work.join(name);
    let provider = LocalProvider::child_process(dir.join("workers"), agent_program(&dir));
    let plane = ControlPlane::builder(&dir)
        .shared(store.clone())
        // A worker whose engine died is back with another within this, or its job is lost.
        .hub_config(HubConfig::default().heartbeat(HEARTBEAT.0, HEARTBEAT.1).worker_wait(WORKER_WAIT))
        .provider(Arc::new(provider), ProviderPolicy::default().max_workers(4))
        .start()
        .await?;
    plane.reap_orphans(store.as_ref()).await?;
    let dispatcher = plane.dispatcher(Arc::new(MemorySecrets::new())).retry(
        RetryPolicy::attempts(cluster::ATTEMPTS)
            .initial_backoff(Duration::from_millis(200))
            .max_backoff(Duration::from_secs(1)),
    );
    let engine = Engine::builder()
        .store(store.clone())
        .resource(dispatcher.clone())
        .resource_arc(plane.logs().clone())
        .register(pipeline(dispatcher, work.join("effects"), work.join("locks")))
        .start()
        .await?;
    let mut events = engine.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let EngineEventKind::Journaled(recorded) = &event.kind
                && recorded.event.is_final()
            {
                println!("{} {}", cluster::FINISHED, event.saga_id);
            }
        }
    });
    for k in 0..runs {
        engine.start(SagaRun::new("jobs", format!("{name}-{k}"), &())?).await?;
    }
    println!("{} {name}", cluster::READY);
    let mut sink = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
    engine.shutdown(Duration::from_secs(5)).await?;
    plane.shutdown().await?;
    Ok(())
}
