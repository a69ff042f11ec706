//! Engines on one PostgreSQL, each in a process of its own, one of them killed: shared by
//! `examples/cluster.rs` and `hodei-core/tests/postgres_failover.rs`.
//!
//! An engine process ([`engine_process`]) starts its own runs of a four-step pipeline, prints
//! [`READY`], then a line for each step it runs ([`EFFECT`]) and for each run that finishes on
//! it ([`FINISHED`]), whoever started the run: after a takeover, the heir prints the dead
//! engine's runs. It stops when its standard input closes. The parent ([`Cluster`]) starts the
//! processes, reads what they print, and kills one.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use hodei_core::{
    Engine, EngineEventKind, PostgresOptions, PostgresStore, RetryPolicy, SagaDefinition, SagaRun, StepError,
};

pub const READY: &str = "cluster: ready";
pub const EFFECT: &str = "cluster: effect";
pub const FINISHED: &str = "cluster: finished";
/// A step's body returned (its side effect and its work done); its end is written next.
pub const RETURNED: &str = "cluster: returned";
/// A step found its job held by a worker and waits for that run's result (remote jobs).
pub const HELD: &str = "cluster: held";

/// The pipeline's steps, in order.
pub const STEPS: [&str; 4] = ["build", "test", "package", "deploy"];

/// Attempts of each step: enough for the faults of a chaos run to land on one step again and
/// again (three by default).
pub const ATTEMPTS: u32 = 10;

/// Each engine's lease: how long a dead engine's runs wait before another takes them.
pub const LEASE: Duration = Duration::from_secs(1);

/// The pipeline: each step appends `run step` to the engine's `effects` file (its side effect,
/// which outlives a SIGKILL in the page cache), says so, and takes `step_time`.
pub fn pipeline(effects: &Path, step_time: Duration) -> SagaDefinition {
    let effects = Arc::new(effects.to_path_buf());
    SagaDefinition::new("pipeline", 1, move |ctx, (): ()| {
        let (effects, run) = (effects.clone(), ctx.id().to_string());
        async move {
            for step in STEPS {
                let (effects, run) = (effects.clone(), run.clone());
                ctx.step(step)
                    // An interruption (its engine killed, frozen or cut off, the database
                    // restarted) uses up an attempt of the step that was running, as a crash
                    // does: under chaos a step may be interrupted several times.
                    .retry(RetryPolicy::attempts(ATTEMPTS))
                    .run(move |_, (): ()| {
                        let (effects, run) = (effects.clone(), run.clone());
                        async move {
                            let mut file = std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(&*effects)
                                .map_err(|e| {
                                    StepError::retryable(format!("opening the effects file: {e}"))
                                })?;
                            // One write: `writeln!` writes each piece on its own, and a kill
                            // between two would leave half a line.
                            file.write_all(format!("{run} {step}\n").as_bytes())
                                .map_err(|e| StepError::retryable(format!("recording the effect: {e}")))?;
                            println!("{EFFECT} {run} {step}");
                            tokio::time::sleep(step_time).await;
                            println!("{RETURNED} {run} {step}");
                            Ok::<_, StepError>(())
                        }
                    })
                    .await?;
            }
            Ok(())
        }
    })
}

/// One engine process: named `name`, on `schema` of the database at `url`, starting `runs`
/// runs named `{name}-{k}`, until its standard input closes.
pub async fn engine_process(
    url: &str,
    schema: &str,
    name: &str,
    runs: usize,
    effects: &Path,
    step_time: Duration,
) -> Result<(), hodei_core::Error> {
    let options = PostgresOptions::default().schema(schema).lease(LEASE).engine_id(name);
    let store = PostgresStore::connect_with(url, options).await?;
    let engine = Engine::builder().store(store).register(pipeline(effects, step_time)).start().await?;
    let mut events = engine.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let EngineEventKind::Journaled(recorded) = &event.kind
                && recorded.event.is_final()
            {
                println!("{FINISHED} {}", event.saga_id);
            }
        }
    });
    // All at once: one after the other, each waiting for its own commit, the last would start
    // long after the first on a busy machine.
    let mut starts = tokio::task::JoinSet::new();
    for k in 0..runs {
        let (engine, run) = (engine.clone(), SagaRun::new("pipeline", format!("{name}-{k}"), &())?);
        starts.spawn(async move { engine.start(run).await.map(drop) });
    }
    while let Some(started) = starts.join_next().await {
        started.expect("a start does not panic")?;
    }
    println!("{READY} {name}");
    // Until the parent closes our standard input (or kills us).
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stdin, &mut sink).await;
    engine.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}

/// Engine processes started by this one, and what they print.
pub struct Cluster {
    children: Vec<Child>,
    lines: mpsc::UnboundedReceiver<(usize, String)>,
    tx: mpsc::UnboundedSender<(usize, String)>,
}

/// Starts engine `n`'s process, its lines sent on `tx`.
fn spawn(n: usize, mut command: Command, tx: &mpsc::UnboundedSender<(usize, String)>) -> Child {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting an engine process");
    let mut stdout = BufReader::new(child.stdout.take().expect("a piped stdout")).lines();
    let tx = tx.clone();
    tokio::spawn(async move {
        while let Ok(Some(text)) = stdout.next_line().await {
            if tx.send((n, text)).is_err() {
                return;
            }
        }
    });
    child
}

/// How the runs of a killed engine went on: see [`Cluster::kill_and_finish`].
#[derive(Debug)]
pub struct Failover {
    /// From the SIGKILL to the first step of one of its runs on another engine.
    pub after: Duration,
    /// Where each of its runs went on.
    pub heirs: BTreeMap<String, usize>,
}

impl Cluster {
    /// Starts one process per `commands` entry (the engine's name, and the command that runs
    /// [`engine_process`] under it).
    pub fn start(commands: impl IntoIterator<Item = Command>) -> Cluster {
        let (tx, lines) = mpsc::unbounded_channel();
        let children = commands.into_iter().enumerate().map(|(n, command)| spawn(n, command, &tx)).collect();
        Cluster { children, lines, tx }
    }

    /// Starts engine `n` again with `command`, once its last process has exited.
    pub fn restart(&mut self, n: usize, command: Command) {
        self.children[n] = spawn(n, command, &self.tx);
    }

    /// Sends engine `n`, which runs, the signal `name` (`-STOP`, `-CONT`).
    pub fn signal(&self, n: usize, name: &str) {
        let pid = self.children[n].id().expect("the engine is running").to_string();
        let sent = std::process::Command::new("kill").args([name, &pid]).status();
        assert!(sent.is_ok_and(|status| status.success()), "kill {name} {pid}");
    }

    /// Kills engine `n` with SIGKILL and waits for it to exit.
    pub async fn kill(&mut self, n: usize) {
        self.children[n].start_kill().expect("killing the engine");
        self.children[n].wait().await.expect("waiting for the killed engine");
    }

    /// The next line an engine printed, and which engine printed it.
    pub async fn heard(&mut self) -> (usize, Heard) {
        let (engine, text) = self.lines.recv().await.expect("the engines print until they stop");
        (engine, said(&text))
    }

    /// Waits until every engine is up and engine `victim` has begun its `runs` runs; returns
    /// those runs, and notes in `finished` the runs that finished meanwhile.
    async fn until_begun(
        &mut self,
        victim: usize,
        runs: usize,
        finished: &mut BTreeSet<String>,
    ) -> BTreeSet<String> {
        let (mut ready, mut begun) = (0, BTreeSet::new());
        while ready < self.children.len() || begun.len() < runs {
            let (engine, heard) = self.heard().await;
            match heard {
                Heard::Ready => ready += 1,
                Heard::Effect(run) if engine == victim => drop(begun.insert(run)),
                Heard::Finished(run) => drop(finished.insert(run)),
                _ => {}
            }
        }
        begun
    }

    /// The zombie: waits until engine `victim` has begun its `runs` runs, stops it with
    /// SIGSTOP until another engine has stepped one of them (its lease lapsed and the run was
    /// taken over), resumes it with SIGCONT, and returns once all `total` runs have finished.
    pub async fn freeze_until_taken_over(&mut self, victim: usize, runs: usize, total: usize) -> Zombie {
        let mut finished = BTreeSet::new();
        let victim_runs = self.until_begun(victim, runs, &mut finished).await;
        self.signal(victim, "-STOP");
        let (mut resumed, mut zombie) = (false, Zombie::default());
        while finished.len() < total {
            let (engine, heard) = self.heard().await;
            match heard {
                Heard::Effect(run) if engine != victim && victim_runs.contains(&run) => {
                    zombie.taken.entry(run).or_insert(engine);
                    if !resumed {
                        self.signal(victim, "-CONT");
                        resumed = true;
                    }
                }
                Heard::Returned(run) if engine == victim && zombie.taken.contains_key(&run) => {
                    zombie.returned_late.insert(run);
                }
                Heard::Finished(run) => drop(finished.insert(run)),
                _ => {}
            }
        }
        zombie
    }

    /// Waits until every engine is up and engine `victim` has begun its `runs` runs, kills it
    /// with SIGKILL, and returns once all `total` runs have finished on the others.
    pub async fn kill_and_finish(&mut self, victim: usize, runs: usize, total: usize) -> Failover {
        let mut finished = BTreeSet::new();
        let victim_runs = self.until_begun(victim, runs, &mut finished).await;
        let killed = Instant::now();
        self.kill(victim).await;
        let (mut after, mut heirs) = (None, BTreeMap::new());
        while finished.len() < total {
            let (engine, heard) = self.heard().await;
            match heard {
                Heard::Effect(run) if victim_runs.contains(&run) => {
                    assert_ne!(engine, victim, "the killed engine printed after its death");
                    after.get_or_insert_with(|| killed.elapsed());
                    heirs.insert(run, engine);
                }
                Heard::Finished(run) => drop(finished.insert(run)),
                _ => {}
            }
        }
        Failover { after: after.expect("the killed engine's runs went on elsewhere"), heirs }
    }

    /// Closes the live engines' standard input and waits for each to stop; true if all
    /// stopped cleanly.
    pub async fn stop(mut self) -> bool {
        let mut clean = true;
        for child in &mut self.children {
            if child.id().is_none() {
                continue;
            }
            drop(child.stdin.take());
            clean &= child.wait().await.is_ok_and(|status| status.success());
        }
        clean
    }
}

/// How the runs of a frozen engine went on: see [`Cluster::freeze_until_taken_over`].
#[derive(Debug, Default)]
pub struct Zombie {
    /// Its runs that another engine stepped, and the first such engine.
    pub taken: BTreeMap<String, usize>,
    /// Those of them in which a step of the zombie returned after it was resumed: it went on
    /// to write that step's end, which must have been refused.
    pub returned_late: BTreeSet<String>,
}

/// What a line of an engine process says.
#[derive(Debug)]
pub enum Heard {
    Ready,
    /// A step of this run ran.
    Effect(String),
    /// A step of this run returned.
    Returned(String),
    Finished(String),
    /// A step waits for a job a worker already holds.
    Held,
    Other,
}

fn said(text: &str) -> Heard {
    let after = |marker: &str| text.find(marker).map(|at| text[at + marker.len()..].trim().to_owned());
    if text.contains(READY) {
        Heard::Ready
    } else if text.contains(HELD) {
        Heard::Held
    } else if let Some(rest) = after(EFFECT) {
        match rest.split_once(' ') {
            Some((run, _step)) => Heard::Effect(run.to_owned()),
            None => Heard::Other,
        }
    } else if let Some(rest) = after(RETURNED) {
        match rest.split_once(' ') {
            Some((run, _step)) => Heard::Returned(run.to_owned()),
            None => Heard::Other,
        }
    } else if let Some(run) = after(FINISHED) {
        Heard::Finished(run)
    } else {
        Heard::Other
    }
}
