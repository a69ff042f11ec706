//! The soak mode of the restart crash test: `HODEI_SOAK=<duration>` runs rounds until the time
//! is up, each killing, at random by the seed, the control plane (engine and hub), agents and
//! jobs.
//!
//! A round starts lint and, drawn by the seed, the matrix and a deploy saga whose smoke test
//! fails, so that its deploy step's rollback job runs. It kills 1 to 7 runs of the control
//! plane as the suite does, and in some of those runs, at a kill point in the hub (at the latest
//! once only lint is left), before the control plane goes on, it kills one of:
//!
//! - **an agent** holding a running job (`SIGKILL` to the process that is the job's parent):
//!   the job dies with it and its step, whose worker is lost, runs it again on a new worker
//!   (the dispatcher's documented retry); never beside the copy that was cut off;
//! - **lint's own process group** (`SIGKILL`): the job was killed by a signal, which fails its
//!   step for good, and so its saga, with that cause.
//!
//! After each round it checks what the suite checks (each job's command never ran twice at
//! once, and ran once, or once more per agent kill in all; every log complete and closed with
//! its result; each saga's outcome that of a run without kills, lint's the failure its kill
//! implies; no process left), prints a line, and fails at the first loss, printing the seed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hodei_core::{Outcome, SagaContext, SagaDefinition, StepError};
use hodei_server::jobs::{Job, JobDispatcher, JobOutcome, RemoteJobs};

use super::{
    KILLS_PER_ROUND, Kills, Round, SEED_ENV, Window, aim_spread, counts, play_round, reference, round_dir,
};

/// Turns the suite into a soak of this duration: `30m`, `90s`, `1h`, or seconds.
const SOAK_ENV: &str = "HODEI_SOAK";
/// Agents killed in a round at the most: each lost job uses one of its step's five attempts.
const MAX_AGENT_KILLS: u32 = 2;

/// The soak's duration, if `HODEI_SOAK` asks for one.
pub fn limit() -> Option<Duration> {
    let value = std::env::var(SOAK_ENV).ok()?;
    let value = value.trim();
    let (number, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len()));
    let bad = || panic!("{SOAK_ENV}={value} is not a duration such as 30m, 90s or 1h");
    let number: u64 = number.parse().unwrap_or_else(|_| bad());
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => bad(),
    };
    Some(Duration::from_secs(number * unit))
}

/// What a kill hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// The child: engine, hub and control plane.
    ControlPlane,
    /// The agent process that runs a job.
    Agent,
    /// Lint's own process group.
    Job,
}

impl Target {
    pub fn tag(self) -> &'static str {
        match self {
            Target::ControlPlane => "control-plane",
            Target::Agent => "agent",
            Target::Job => "job",
        }
    }
}

/// An agent or job killed while a run goes on: at the run's `k`-th kill point of `window`, or
/// the first point after it where there is one to kill; `pick` chooses among the agents.
#[derive(Clone, Copy, Debug)]
pub struct Extra {
    pub target: Target,
    pub window: Window,
    pub k: u32,
    pub pick: u64,
}

/// `deploy`: a deploy job whose rollback job undoes it, then a smoke test, which fails: the
/// saga is compensated, the rollback job run.
pub fn deploy(dispatcher: JobDispatcher) -> SagaDefinition {
    SagaDefinition::new("deploy", 1, move |ctx: SagaContext, (deploy, undeploy, smoke): (Job, Job, Job)| {
        let dispatcher = dispatcher.clone();
        async move {
            let deployed = ctx.job("deploy", deploy).on(&dispatcher).rollback(undeploy).run().await?;
            let smoke = ctx.run_job_on(&dispatcher, "smoke", smoke).await?;
            Ok::<Vec<JobOutcome>, StepError>(vec![deployed, smoke])
        }
    })
}

/// `text` with each job id's attempt (`#2`) as `#N`: which attempt ran depends on the kills.
pub fn without_attempts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '#' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.next_if(char::is_ascii_digit).is_some() {}
            out.push('N');
        }
    }
    out
}

/// The jobs whose commands marked their start in `root` and not their end, with their pids.
fn running(root: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root.join("markers")).unwrap_or_default();
    let mut running: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("start"), Some(name), Some(pid)) => {
                running.insert(name.to_owned(), pid.to_owned());
            }
            (Some("end"), Some(name), Some(_)) => {
                running.remove(name);
            }
            _ => {}
        }
    }
    running.into_iter().collect()
}

/// The agent of the round in `root` whose job is the live process `pid`: its parent, if that
/// is an agent of the round's workers.
fn agent_of(root: &Path, pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.to_owned();
    let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).ok()?;
    let workers = root.join("workers").to_string_lossy().into_owned();
    String::from_utf8_lossy(&cmdline).contains(&workers).then_some(parent)
}

/// Kills what `extra` aims at, if there is one now: an agent that runs a job, or lint's process
/// group while its agent runs it. Says what it killed.
pub fn strike(root: &Path, extra: &Extra) -> Option<String> {
    let candidates: Vec<(String, String, String)> = running(root)
        .into_iter()
        .filter(|(name, _)| extra.target == Target::Agent || name == "lint")
        .filter_map(|(name, pid)| agent_of(root, &pid).map(|agent| (name, pid, agent)))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let (name, pid, agent) = &candidates[(extra.pick % candidates.len() as u64) as usize];
    let (victim, what) = match extra.target {
        Target::Agent => (agent.clone(), format!("the agent {agent} running {name}")),
        _ => (format!("-{pid}"), format!("{name}'s process group {pid}")),
    };
    let status = Command::new("kill").args(["-KILL", "--", &victim]).status().unwrap();
    assert!(status.success(), "kill {victim} ({what}): {status}");
    Some(what)
}

/// The soak's figures.
#[derive(Debug, Default)]
struct Tally {
    rounds: u32,
    /// Agents and jobs killed, by window.
    struck: BTreeMap<(Target, Window), u32>,
    sagas: u32,
    completed: u32,
    compensated: u32,
    failed: u32,
    /// Job steps (rollback jobs included), and the commands they ran: once each, and once
    /// more for each job an agent kill lost.
    jobs: u32,
    commands: u32,
    reruns: u32,
    /// Output bytes compared with what the jobs printed.
    verified: u64,
}

impl Tally {
    fn struck(&self, target: Target) -> String {
        let by_window: Vec<String> = self
            .struck
            .iter()
            .filter(|((t, _), _)| *t == target)
            .map(|((_, window), n)| format!("{} {n}", window.tag()))
            .collect();
        let total: u32 = self.struck.iter().filter(|((t, _), _)| *t == target).map(|(_, n)| n).sum();
        format!("{} {total} ({})", target.tag(), by_window.join(", "))
    }

    fn line(&self, kills: &Kills) -> String {
        format!(
            "{} rounds; kills: {} {} ({}), {}, {}; sagas {} (completed {}, compensated {}, failed {}); \
             jobs {} ({} commands, {} run again after agent kills); {} log bytes verified; lost or duplicated 0",
            self.rounds,
            Target::ControlPlane.tag(),
            kills.total(),
            counts(&kills.by_window),
            self.struck(Target::Agent),
            self.struck(Target::Job),
            self.sagas,
            self.completed,
            self.compensated,
            self.failed,
            self.jobs,
            self.commands,
            self.reruns,
            self.verified
        )
    }
}

/// The agents and lint killed in a round's runs: in about half of the runs it kills, at most
/// one lint and [`MAX_AGENT_KILLS`] agents.
fn extras(kills: &mut Kills, killed_runs: u32) -> BTreeMap<u32, Extra> {
    let (mut agents, mut lint) = (0, false);
    let mut extras = BTreeMap::new();
    for run in 0..killed_runs {
        if kills.rng.below(2) == 0 {
            continue;
        }
        let target = match kills.rng.below(3) {
            0 if !lint => Target::Job,
            _ if agents < MAX_AGENT_KILLS => Target::Agent,
            _ => continue,
        };
        lint |= target == Target::Job;
        agents += u32::from(target == Target::Agent);
        let window = Window::NAMED[kills.rng.below(Window::NAMED.len() as u64) as usize];
        let k = 1 + kills.rng.below(aim_spread(window)) as u32;
        extras.insert(run, Extra { target, window, k, pick: kills.rng.below(u64::MAX) });
    }
    extras
}

/// Rounds until `limit` has passed; fails at the first loss, with the seed to replay.
pub async fn soak(seed: u64, limit: Duration) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("the soak failed: replay with {SEED_ENV}={seed} {SOAK_ENV}=<duration>");
    }));
    let started = Instant::now();
    let every = Round {
        sagas: vec!["tests".into(), "deploy".into(), "lint".into()],
        agent_kills: 0,
        lint_killed: false,
    };
    let reference = reference(every).await.unwrap();
    let mut expected: BTreeMap<String, String> = reference
        .outcomes
        .iter()
        .map(|line| (line.split_once(": ").unwrap().0.to_owned(), line.clone()))
        .collect();
    assert_eq!(expected.len(), 3, "{reference:?}");
    let cause = "job `lint` (lint/0#1) was killed by signal 9\nlast lines of stdout:\n  started".to_owned();
    let killed = without_attempts(&format!("lint: {:?}", Outcome::<Vec<JobOutcome>>::Failed { cause }));
    expected.insert("killed lint".to_owned(), killed);
    let mut kills = Kills::new(seed);
    let mut tally = Tally::default();
    while started.elapsed() < limit {
        let number = tally.rounds;
        let mut sagas = Vec::new();
        if kills.rng.below(4) != 0 {
            sagas.push("tests".to_owned());
        }
        if kills.rng.below(2) == 0 {
            sagas.push("deploy".to_owned());
        }
        sagas.push("lint".to_owned());
        let mut round = Round { sagas, agent_kills: 0, lint_killed: false };
        let killed_runs = 1 + kills.rng.below(u64::from(KILLS_PER_ROUND)) as u32;
        let extras = extras(&mut kills, killed_runs);
        let dir = round_dir();
        let (end, commands) =
            play_round(dir.path(), number, &mut round, killed_runs, &extras, &mut kills).await;
        let outcomes = &end.last.outcomes;
        assert_eq!(outcomes.len(), round.sagas.len(), "round {number}: {outcomes:?}");
        for (id, outcome) in round.sagas.iter().zip(outcomes) {
            let key = if id == "lint" && round.lint_killed { "killed lint" } else { id.as_str() };
            assert_eq!(
                outcome, &expected[key],
                "round {number}: saga {id}'s outcome is not the one its kills imply"
            );
            match round.completes(id) {
                true => tally.completed += 1,
                false if id == "deploy" => tally.compensated += 1,
                false => tally.failed += 1,
            }
        }
        for (target, window, _) in &end.struck {
            *tally.struck.entry((*target, *window)).or_default() += 1;
        }
        tally.rounds += 1;
        tally.sagas += round.sagas.len() as u32;
        tally.jobs += round.sagas.iter().map(|id| Round::jobs(id).len() as u32).sum::<u32>();
        tally.commands += commands.started;
        tally.reruns += commands.reruns;
        tally.verified += end.last.verified;
        println!(
            "soak round {number} ({:.0?} of {limit:?}): sagas {:?}, {killed_runs} control plane kills, {} agent kills, lint killed: {}; totals: {}",
            started.elapsed(),
            round.sagas,
            round.agent_kills,
            round.lint_killed,
            tally.line(&kills)
        );
    }
    println!("soak (seed {seed}) ran {:.0?}: {}", started.elapsed(), tally.line(&kills));
}
