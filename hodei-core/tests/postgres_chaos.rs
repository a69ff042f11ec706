//! Chaos on one PostgreSQL: three engine processes (`examples/support/cluster.rs`), 170 runs
//! each of a four-step pipeline whose steps record their side effects, and while they run,
//! faults on a schedule: SIGKILL of an engine and its restart (three times), SIGSTOP of one
//! past its lease and SIGCONT (the zombie), a cut between one engine and the database longer
//! than its lease (through a TCP proxy the test holds), and an immediate restart of
//! PostgreSQL itself. At the end every run completed, each step's end is journaled once, each
//! side effect happened once or again only after an interruption, and along every journal the
//! epochs never go back. The failover times (a SIGKILL to the dead engine's runs stepping
//! again) are printed, with every fault and when it hit.
//! Skipped (with a line saying so) without `HODEI_TEST_POSTGRES_URL`; the restart of the
//! server needs `HODEI_TEST_POSTGRES_DIR` and `HODEI_TEST_POSTGRES_BIN`, which `.ci/postgres`
//! exports (skipped without them, unless `HODEI_REQUIRE_POSTGRES=1`).
#![cfg(all(feature = "postgres", unix))]

#[path = "cluster/checks.rs"]
mod checks;
#[path = "../../examples/support/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "cluster/server.rs"]
mod server;
#[path = "cluster/tcp_proxy.rs"]
mod tcp_proxy;
#[path = "../src/store/postgres/test_database.rs"]
mod test_database;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use cluster::{Cluster, Heard};
use hodei_core::PostgresOptions;
use server::Server;
use tcp_proxy::TcpProxy;
use test_database::TestDatabase;
use tokio::process::Command;

const TEST: &str = "runs_survive_kills_a_zombie_a_cut_and_a_database_restart";
const RUNS: usize = 170;
const ENGINES: [&str; 3] = ["engine-a", "engine-b", "engine-c"];
/// A run takes at least four of these: the faults all land while runs are in their steps.
const STEP_TIME: Duration = Duration::from_secs(2);

/// What the engines said of the runs so far.
#[derive(Default)]
struct Runs {
    /// Runs in flight, and the engine that last ran a step of each.
    owner: BTreeMap<String, usize>,
    finished: BTreeSet<String>,
    /// Which engine said each run finished.
    finished_by: BTreeMap<String, usize>,
}

impl Runs {
    fn note(&mut self, engine: usize, heard: Heard) {
        match heard {
            Heard::Effect(run) => drop(self.owner.insert(run, engine)),
            Heard::Finished(run) => {
                self.owner.remove(&run);
                self.finished_by.insert(run.clone(), engine);
                self.finished.insert(run);
            }
            _ => {}
        }
    }

    /// The runs engine `n` was last seen running.
    fn on(&self, n: usize) -> BTreeSet<String> {
        self.owner.iter().filter(|(_, e)| **e == n).map(|(run, _)| run.clone()).collect()
    }
}

/// How long the runs in flight may stay the same, with nothing heard, before the test gives
/// up and says which they are: far beyond any fault's effect (a lease, a restart).
const STUCK: Duration = Duration::from_secs(60);

/// A fault, at a time after every engine is up.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL of the engine with the most runs in flight, then its restart once one of them
    /// has gone on elsewhere.
    Kill,
    /// SIGSTOP for longer than the lease, then SIGCONT.
    Freeze(usize),
    /// The proxy in front of engine-c cut for longer than its lease, then restored.
    Cut,
    /// PostgreSQL stopped at once (`pg_ctl restart -m immediate`: no checkpoint, recovery on
    /// start) and started again.
    RestartDatabase,
}

const SCHEDULE: [(Duration, Fault); 6] = [
    (Duration::from_millis(1_000), Fault::Kill),
    (Duration::from_millis(2_000), Fault::Freeze(1)),
    (Duration::from_millis(4_000), Fault::Cut),
    (Duration::from_millis(5_000), Fault::Kill),
    (Duration::from_millis(6_500), Fault::RestartDatabase),
    (Duration::from_millis(8_000), Fault::Kill),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_kills_a_zombie_a_cut_and_a_database_restart() {
    if let Ok(name) = std::env::var("HODEI_CLUSTER_ENGINE") {
        return child(&name).await;
    }
    let Some(db) = TestDatabase::new("chaos") else { return };
    let Some(server) = Server::from_env() else { return };
    let effects = tempfile::tempdir().unwrap();
    let (proxy, proxied) = TcpProxy::in_front_of(&db.url).await;
    let command = |n: usize, runs: usize| {
        let url = if n == 2 { proxied.as_str() } else { db.url.as_str() };
        engine_command(ENGINES[n], runs, url, &db.schema, effects.path())
    };
    let mut cluster = Cluster::start((0..ENGINES.len()).map(|n| command(n, RUNS)));
    let total = ENGINES.len() * RUNS;
    let (mut ready, mut seen) = (0, Runs::default());
    while ready < ENGINES.len() {
        match cluster.heard().await {
            (_, Heard::Ready) => ready += 1,
            (engine, heard) => seen.note(engine, heard),
        }
    }
    let began = Instant::now();
    let mut faults = SCHEDULE.iter().peekable();
    let mut log = Vec::new();
    // After a kill: the engine, when, and its runs still to finish, until one steps again.
    let mut failing_over: Option<(usize, Instant, BTreeSet<String>)> = None;
    let mut failovers = Vec::new();
    let mut frozen: Option<(usize, Instant)> = None;
    // The frozen engine, its runs then, and those of them whose step it finished late.
    let (mut zombie_runs, mut returned_late) = (BTreeSet::new(), BTreeSet::new());
    let zombie = SCHEDULE.iter().find_map(|(_, fault)| match fault {
        Fault::Freeze(victim) => Some(*victim),
        _ => None,
    });
    let mut cut: Option<Instant> = None;
    let hold = cluster::LEASE * 2;
    let mut stuck: Option<(Vec<String>, Instant)> = None;
    while seen.finished.len() < total {
        let next_fault = faults.peek().map(|(at, _)| began + *at);
        let thaw = [frozen.map(|(_, at)| at + hold), cut.map(|at| at + hold)].into_iter().flatten().min();
        // A quiet spell: a killed engine may have journaled a run's end without living to say
        // so, so the database is asked what is still in flight.
        let quiet = Instant::now() + hold;
        let wake = [next_fault, thaw, Some(quiet)].into_iter().flatten().min().unwrap_or(quiet);
        let heard = tokio::select! {
            heard = cluster.heard() => Some(heard),
            () = tokio::time::sleep_until(wake.into()) => None,
        };
        let Some((engine, heard)) = heard else {
            let now = Instant::now();
            if now >= quiet {
                // Not answering (restarting): asked again at the next quiet spell.
                let Some(in_flight) = in_flight(&db).await else { continue };
                if in_flight.is_empty() {
                    log.push(format!(
                        "{:?} nothing in flight; {} runs finished as heard",
                        began.elapsed(),
                        seen.finished.len()
                    ));
                    break;
                }
                stuck = if stuck.as_ref().is_some_and(|(was, _)| *was == in_flight) {
                    stuck
                } else {
                    Some((in_flight, now))
                };
                if let Some((in_flight, since)) = &stuck
                    && now.duration_since(*since) > STUCK
                {
                    panic!(
                        "{} runs made no progress for {STUCK:?}: {in_flight:?}\n{log:#?}\n{}",
                        in_flight.len(),
                        ownership(&db).await
                    );
                }
            }
            if let Some((victim, at)) = frozen.filter(|(_, at)| now >= *at + hold) {
                cluster.signal(victim, "-CONT");
                log.push(format!("{:?} SIGCONT {}", at.duration_since(began) + hold, ENGINES[victim]));
                frozen = None;
            }
            if let Some(at) = cut.filter(|at| now >= *at + hold) {
                proxy.restore();
                log.push(format!("{:?} restored engine-c's link", at.duration_since(began) + hold));
                cut = None;
            }
            if let Some((when, fault)) = faults.peek().copied().filter(|(at, _)| now >= began + *at) {
                faults.next();
                match *fault {
                    Fault::Kill if failing_over.is_none() => {
                        // Not the zombie before its thaw: it is to be frozen (or is), and a
                        // killed engine waits for its failover before it is restarted.
                        let freezing = frozen.is_some()
                            || faults.clone().any(|(_, fault)| matches!(fault, Fault::Freeze(_)));
                        let victim = (0..ENGINES.len())
                            .filter(|n| !(freezing && zombie == Some(*n)))
                            .max_by_key(|n| seen.on(*n).len())
                            .unwrap_or(0);
                        let runs = seen.on(victim);
                        cluster.kill(victim).await;
                        log.push(format!(
                            "{when:?} SIGKILL {} with {} runs in flight",
                            ENGINES[victim],
                            runs.len()
                        ));
                        if runs.is_empty() {
                            cluster.restart(victim, command(victim, 0));
                        } else {
                            failing_over = Some((victim, Instant::now(), runs));
                        }
                    }
                    Fault::Kill => log.push(format!("{when:?} SIGKILL skipped: a failover is under way")),
                    Fault::Freeze(victim) => {
                        zombie_runs = seen.on(victim);
                        cluster.signal(victim, "-STOP");
                        log.push(format!("{when:?} SIGSTOP {}", ENGINES[victim]));
                        frozen = Some((victim, Instant::now()));
                    }
                    Fault::Cut => {
                        proxy.cut();
                        log.push(format!("{when:?} cut engine-c from the database"));
                        cut = Some(Instant::now());
                    }
                    Fault::RestartDatabase => {
                        server.restart();
                        log.push(format!("{when:?} PostgreSQL restarted (immediate)"));
                    }
                }
            }
            continue;
        };
        // The first sign of a killed engine's runs going on elsewhere: a step run again, or a
        // run finished (its step had returned and been journaled before the kill).
        let progressed = match &heard {
            Heard::Effect(run) | Heard::Finished(run) => Some(run.clone()),
            _ => None,
        };
        // Lines the killed engine printed before its death may still be in the pipe.
        if let Some(run) = progressed
            && let Some((victim, at, runs)) = &failing_over
            && engine != *victim
            && runs.contains(&run)
        {
            failovers.push(at.elapsed());
            log.push(format!(
                "{:?} after the kill, {}'s run {run} went on on {}",
                at.elapsed(),
                ENGINES[*victim],
                ENGINES[engine]
            ));
            let victim = *victim;
            cluster.restart(victim, command(victim, 0));
            failing_over = None;
        }
        match heard {
            // The zombie's step returned after another engine had run it again: it goes on to
            // write the step's end, which must be refused (each end is journaled once).
            Heard::Returned(run)
                if zombie.is_some_and(|z| z == engine)
                    && zombie_runs.contains(&run)
                    && seen.owner.get(&run).is_some_and(|now| *now != engine) =>
            {
                returned_late.insert(run);
            }
            heard => seen.note(engine, heard),
        }
    }
    let elapsed = began.elapsed();
    log.push(format!("the zombie's steps that returned after a takeover: {}", returned_late.len()));
    for line in &log {
        println!("chaos: {line}");
    }
    if let Some((victim, _, runs)) = &failing_over {
        let by: Vec<_> = runs.iter().map(|run| (run, seen.finished_by.get(run))).collect();
        println!("chaos: {}'s runs were not seen going on; finished by {by:?}", ENGINES[*victim]);
    }
    assert!(faults.next().is_none(), "every fault hit while runs were in flight: {log:?}");
    // A kill's runs may all have journaled their ends just before it, unheard: then there is no
    // failover to time, and the checks below still see every run completed.
    assert!(!failovers.is_empty(), "no kill's runs were seen going on elsewhere: {log:?}");
    failovers.sort();
    println!(
        "chaos: {total} runs in {elapsed:?}; failover (SIGKILL to a run going on) median {:?}, max {:?} over {} kills",
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1],
        failovers.len()
    );
    let runs: Vec<String> =
        ENGINES.iter().flat_map(|engine| (0..RUNS).map(move |k| format!("{engine}-{k}"))).collect();
    let again = checks::check_runs(&db, effects.path(), &runs).await;
    assert!(!returned_late.is_empty(), "the zombie went on after its SIGCONT: {log:?}");
    println!("chaos: {} steps run again after an interruption", again.len());
    assert!(cluster.stop().await, "the engines stopped cleanly");
}

/// The runs the database holds in flight, or `None` if it does not answer (a connection of its
/// own each time: the server is restarted under the test).
async fn in_flight(db: &TestDatabase) -> Option<Vec<String>> {
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(connection);
    let sql = format!("SELECT id FROM {}.hodei_sagas WHERE in_flight ORDER BY id", db.schema);
    let rows = client.query(&sql, &[]).await.ok()?;
    Some(rows.iter().map(|row| row.get(0)).collect())
}

/// Who owns the runs in flight, at which epoch, and which engines' leases are live: what a
/// stuck run is diagnosed from.
async fn ownership(db: &TestDatabase) -> String {
    let admin = db.admin().await;
    let sagas = admin
        .query("SELECT id, owner, epoch FROM hodei_sagas WHERE in_flight ORDER BY id", &[])
        .await
        .unwrap();
    let engines = admin
        .query("SELECT id, lease_until > now(), lease_until::text FROM hodei_engines", &[])
        .await
        .unwrap();
    let sagas: Vec<(String, Option<String>, i64)> =
        sagas.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let engines: Vec<(String, bool, String)> =
        engines.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    format!("in flight (id, owner, epoch): {sagas:?}\nengines (id, live, lease until): {engines:?}")
}

fn engine_command(name: &str, runs: usize, url: &str, schema: &str, effects: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", TEST, "--nocapture"])
        .env("HODEI_CLUSTER_ENGINE", name)
        .env("HODEI_CLUSTER_RUNS", runs.to_string())
        .env("HODEI_CLUSTER_URL", url)
        .env("HODEI_CLUSTER_SCHEMA", schema)
        .env("HODEI_CLUSTER_EFFECTS", effects);
    command
}

/// The child's side: one engine process, which starts `HODEI_CLUSTER_RUNS` runs (none when it
/// is restarted: it takes its own back, or others took them).
async fn child(name: &str) {
    let var = |key: &str| std::env::var(key).unwrap();
    let effects = std::path::PathBuf::from(var("HODEI_CLUSTER_EFFECTS")).join(format!("{name}.log"));
    let runs = var("HODEI_CLUSTER_RUNS").parse().unwrap();
    let (url, schema) = (var("HODEI_CLUSTER_URL"), var("HODEI_CLUSTER_SCHEMA"));
    // As a supervisor would: an engine that fails while the database is down or cut off (at
    // its start, or as it stops and lets go of its lease) starts again until it can connect.
    let mut tries = 0;
    while let Err(e) = cluster::engine_process(&url, &schema, name, runs, &effects, STEP_TIME).await {
        tries += 1;
        assert!(tries < 100, "{name} could not start: {e}");
        eprintln!("{name}: stopped ({e}); again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
