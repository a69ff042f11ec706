//! The crash harness: a test binary re-runs itself as a child process, filtered to one child
//! test, and kills it with SIGKILL after it has reported a chosen number of kill points.
//!
//! The child prints [`READY`] once its engine has started, an [`EFFECT`] line at each kill
//! point ([`kill_point`]: after a side effect of a step body or a compensation, or at a point of
//! the saga body or of the child's own code, each tagged with its [`Window`]), and [`DONE`] when
//! it has finished its work. The lines are matched with `contains`, because libtest prints
//! `test <name> ...` without a newline right before the test's own output.
//!
//! A kill in the saga body right after a step returned is a promise kept or broken: once the
//! body has a step's result, that step never runs again. [`returned`] notes each such return in
//! a file; [`settle_returned`] turns the notes into the same "may not run again" entries that
//! [`settle`] makes of the journal, so that [`check_not_rerun`] catches both.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{LazyLock, Mutex};

use hodei_core::{Event, RecordedEvent, SagaId, StepContext};

use super::seed::XorShift;

pub const READY: &str = "hodei-crash: ready";
pub const EFFECT: &str = "hodei-crash: effect";
pub const DONE: &str = "hodei-crash: done";

/// How one run of the child ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Run {
    Killed,
    Finished,
}

/// Where a kill landed: what the child was doing when it printed the line it was killed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// At the ready line, before the child did anything.
    Start,
    /// In a step body or a compensation, right after its side effect.
    Step,
    /// In the child's own code, outside any saga (sending a signal, a cancel, forking).
    Outside,
    /// In the saga body after a step returned, before its next journaled operation began (or
    /// before it ended).
    BetweenSteps,
    /// In a branch of a group, after its last step returned: the branch is about to end.
    AfterBranch,
    /// In the saga body right after a group of branches returned.
    AfterGroup,
    /// In the saga body right after a timer fired.
    AfterTimer,
    /// In the saga body right after a signal wait returned the signal.
    AfterSignal,
    /// After a step returned, in something unjournaled the saga body awaits.
    Unjournaled,
    /// In the store, before a write reaches it ([`super::kill_point_store`]).
    StoreBeforeWrite,
    /// In the store, once a write is in but not yet durable.
    StoreWritten,
    /// In the store, once writes are durable and before the engine is told.
    StoreDurable,
}

impl Window {
    const ALL: [Window; 12] = [
        Window::Start,
        Window::Step,
        Window::Outside,
        Window::BetweenSteps,
        Window::AfterBranch,
        Window::AfterGroup,
        Window::AfterTimer,
        Window::AfterSignal,
        Window::Unjournaled,
        Window::StoreBeforeWrite,
        Window::StoreWritten,
        Window::StoreDurable,
    ];

    /// The tag of its kill-point lines.
    fn tag(self) -> &'static str {
        match self {
            Window::Start => "start",
            Window::Step => "step",
            Window::Outside => "outside",
            Window::BetweenSteps => "between-steps",
            Window::AfterBranch => "after-branch",
            Window::AfterGroup => "after-group",
            Window::AfterTimer => "after-timer",
            Window::AfterSignal => "after-signal",
            Window::Unjournaled => "unjournaled",
            Window::StoreBeforeWrite => "store-before-write",
            Window::StoreWritten => "store-written",
            Window::StoreDurable => "store-durable",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Window::Start => "at start",
            Window::Step => "in step body",
            Window::Outside => "outside the sagas",
            Window::BetweenSteps => "between steps",
            Window::AfterBranch => "after branch",
            Window::AfterGroup => "after group",
            Window::AfterTimer => "after timer",
            Window::AfterSignal => "after signal",
            Window::Unjournaled => "awaiting unjournaled",
            Window::StoreBeforeWrite => "before a store write",
            Window::StoreWritten => "between a store write and its durability",
            Window::StoreDurable => "after durability, before the engine knew",
        }
    }

    /// Whether the window is in the store ([`super::kill_point_store`]).
    pub fn in_store(self) -> bool {
        matches!(self, Window::StoreBeforeWrite | Window::StoreWritten | Window::StoreDurable)
    }

    /// Whether the window is in a saga body, past a journaled operation's return.
    pub fn in_body(self) -> bool {
        !self.in_store() && !matches!(self, Window::Start | Window::Step | Window::Outside)
    }

    /// The window of a counted line: the tag after [`EFFECT`], else a step's side effect.
    fn of_line(line: &str) -> Window {
        let Some((_, rest)) = line.split_once(EFFECT) else { return Window::Start };
        let tag = rest.trim_start().strip_prefix('[').and_then(|r| r.split_once(']')).map(|(tag, _)| tag);
        Window::ALL.into_iter().find(|w| Some(w.tag()) == tag).unwrap_or(Window::Step)
    }
}

/// In the child: prints a kill point of `window` and waits for the parent ([`wait_for_parent`]),
/// which may kill the process here.
pub fn kill_point(window: Window, what: &str) {
    println!("{EFFECT} [{}] {what}", window.tag());
    wait_for_parent();
}

/// The runs of the child in a crash test: where each is killed, and how many kills landed in
/// each window.
#[derive(Debug)]
pub struct Kills {
    counts: BTreeMap<Window, u32>,
    runs: u32,
    /// How the last two runs ended (`None`: finished), the last one first.
    last: [Option<Window>; 2],
    rng: XorShift,
    max_lines: u64,
    aims: Vec<Window>,
    max_runs: u32,
    /// An aimed kill lands at one of the first this many lines of its window.
    aim_spread: u64,
    /// Where the next run is killed, if not where `rng` says.
    next: Option<KillAt>,
}

impl Kills {
    /// Kills drawn from `seed`: every other run aims at one of `aims` in turn, at its first line
    /// (a window may be a few lines in a hundred: random kills would rarely land there; each
    /// run starts where the last one left off, so the aimed kills still move through the
    /// sagas); the others are killed after 0 to `max_lines` lines of any window. A round that
    /// needs `max_runs` runs makes no progress.
    pub fn new(seed: u64, max_lines: u64, aims: &[Window], max_runs: u32) -> Kills {
        Kills {
            counts: BTreeMap::new(),
            runs: 0,
            last: [None; 2],
            rng: XorShift(seed | 1),
            max_lines,
            aims: aims.to_vec(),
            max_runs,
            aim_spread: 1,
            next: None,
        }
    }

    /// Aimed kills land at one of the first `lines` lines of their window, drawn from the
    /// seed, instead of always the first: for windows a run passes many times (every store
    /// write), so that the aimed kills do not all fall on a run's first write.
    pub fn aim_spread(mut self, lines: u64) -> Kills {
        self.aim_spread = lines.max(1);
        self
    }

    /// Kills the next run at `kill`: a window the others might miss.
    pub fn next_at(&mut self, kill: KillAt) {
        self.next = Some(kill);
    }

    fn choose(&mut self) -> KillAt {
        if let Some(kill) = self.next.take() {
            return kill;
        }
        match self.runs % 2 {
            1 if !self.aims.is_empty() => KillAt {
                lines: 1 + self.rng.below(self.aim_spread),
                only: Some(self.aims[(self.runs as usize / 2) % self.aims.len()]),
            },
            _ => KillAt::after(self.rng.below(self.max_lines + 1)),
        }
    }

    /// Runs one round of a crash test to its end: the child again and again until a run
    /// finishes. Before each run, `settled` takes what may not run again (with no child
    /// running: the store is locked while open); `run` runs the child, killed where it is told;
    /// after it, `check` holds the effects against what was settled, with the run described
    /// for its message. Fails when the round makes no progress.
    pub fn run_round(
        &mut self,
        what: &str,
        mut settled: impl FnMut() -> HashMap<Key, usize>,
        mut run: impl FnMut(KillAt) -> Option<Window>,
        mut check: impl FnMut(&HashMap<Key, usize>, &str),
    ) {
        for round_run in 0.. {
            assert!(round_run < self.max_runs, "{what} makes no progress; {self}");
            let before = settled();
            let kill = self.choose();
            let killed = self.add(run(kill));
            check(&before, &format!("{what}, run {}: {}", self.runs, self.context()));
            if !killed {
                return;
            }
        }
    }

    /// Counts a run, killed in a window or finished (`None`); returns whether it was killed.
    fn add(&mut self, killed: Option<Window>) -> bool {
        self.runs += 1;
        if let Some(window) = killed {
            *self.counts.entry(window).or_default() += 1;
        }
        self.last = [killed, self.last[0]];
        killed.is_some()
    }

    /// For a failure found after the last run: where that run and the one before it were
    /// killed (a kill leaves its mark on the next run), and the counts so far.
    fn context(&self) -> String {
        let ended =
            |run: Option<Window>| run.map_or("finished".to_owned(), |w| format!("was killed {}", w.label()));
        format!("the last run {}, the one before it {}; {self}", ended(self.last[0]), ended(self.last[1]))
    }

    pub fn runs(&self) -> u32 {
        self.runs
    }

    pub fn total(&self) -> u32 {
        self.counts.values().sum()
    }

    /// The kills that landed in a saga body ([`Window::in_body`]).
    pub fn in_body(&self) -> u32 {
        self.counts.iter().filter(|(w, _)| w.in_body()).map(|(_, n)| n).sum()
    }

    pub fn of(&self, window: Window) -> u32 {
        self.counts.get(&window).copied().unwrap_or(0)
    }

    /// Whether every one of `windows` had a kill.
    pub fn hit_all(&self, windows: &[Window]) -> bool {
        windows.iter().all(|w| self.of(*w) > 0)
    }

    /// Fails unless every one of `windows` had a kill.
    pub fn assert_hit(&self, what: &str, windows: &[Window]) {
        let missed: Vec<&str> = windows.iter().filter(|w| self.of(**w) == 0).map(|w| w.label()).collect();
        assert!(missed.is_empty(), "{what}: no kill landed {missed:?}; {self}");
    }
}

impl std::fmt::Display for Kills {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kills:")?;
        for (i, (window, n)) in self.counts.iter().enumerate() {
            write!(f, "{} {} {n}", if i == 0 { "" } else { "," }, window.label())?;
        }
        write!(f, " ({} in all, {} in a saga body)", self.total(), self.in_body())
    }
}

/// In the child, after printing an [`EFFECT`] line: waits until the parent has read it and
/// decided not to kill here, so that a kill lands exactly after the chosen effect however busy
/// the machine is (a child racing ahead would make the kill points depend on the load).
pub fn wait_for_parent() {
    let mut line = String::new();
    // An error or EOF means the parent is gone; the child then simply goes on.
    let _ = std::io::stdin().read_line(&mut line);
}

/// Where a run of the child is killed: at its `lines`-th effect line (0: as soon as it is ready),
/// counting only the lines of one window if `only` says so.
#[derive(Clone, Copy, Debug)]
pub struct KillAt {
    lines: u64,
    only: Option<Window>,
}

impl KillAt {
    /// After `lines` effect lines of any window.
    pub fn after(lines: u64) -> KillAt {
        KillAt { lines, only: None }
    }

    /// The window this kill is aimed at, if any.
    pub fn aimed_at(&self) -> Option<Window> {
        self.only
    }

    fn counts(&self, window: Window) -> bool {
        self.only.is_none_or(|only| only == window)
    }
}

/// Runs the child test `test` once with `env`. It is killed when it has printed `kill_after`
/// effect lines (0: as soon as it is ready), unless it finishes first. After each effect line
/// it is not killed for, the child is told to go on ([`wait_for_parent`]).
pub fn run_child(test: &str, env: &[(&str, String)], kill_after: u64) -> Run {
    match run_child_at(test, env, KillAt::after(kill_after)) {
        Some(_) => Run::Killed,
        None => Run::Finished,
    }
}

/// [`run_child`], killed at the line `kill` says. Returns the window of the line it was killed
/// at, or `None` if it finished first.
pub fn run_child_at(test: &str, env: &[(&str, String)], kill: KillAt) -> Option<Window> {
    let mut child = Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut go_on = child.stdin.take();
    let (mut effects, mut killed_at, mut finished) = (0, None, false);
    // Read to the end even after the kill: a child that finished first must not die of a
    // closed pipe, and its done line decides how it ended.
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child stdout line");
        if line.contains(DONE) {
            finished = true;
        }
        let window = match (line.contains(EFFECT), line.contains(READY)) {
            (true, _) => Window::of_line(&line),
            (false, true) => Window::Start,
            (false, false) => continue,
        };
        let counted = kill.counts(window);
        if counted && window != Window::Start {
            effects += 1;
        }
        if counted && killed_at.is_none() && !finished && effects >= kill.lines {
            child.kill().expect("SIGKILL the child");
            killed_at = Some(window);
            go_on = None;
        } else if line.contains(EFFECT)
            && let Some(stdin) = go_on.as_mut()
        {
            // A child that has finished or died no longer reads; that is not an error here.
            let _ = stdin.write_all(b"\n").and_then(|()| stdin.flush());
        }
    }
    let status = child.wait().expect("wait for the child");
    match (status.signal(), status.success() && finished, killed_at) {
        (Some(9), _, Some(window)) => Some(window),
        (_, true, _) => None,
        _ => panic!("the child {test} exited with {status} (done: {finished})"),
    }
}

/// What an effect line reports: a step body or a compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Step,
    Comp,
}

/// An effect's identity: what ran, in which saga, for which step.
pub type Key = (Kind, String, u32);

/// How often each key ran.
pub fn count(keys: impl IntoIterator<Item = Key>) -> HashMap<Key, usize> {
    let mut counts = HashMap::new();
    for key in keys {
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Appends one line with a single O_APPEND write, so that lines of concurrent steps never
/// interleave.
pub fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    OpenOptions::new().create(true).append(true).open(path)?.write_all(format!("{line}\n").as_bytes())
}

/// The lines of a file written by [`append_line`]; none if it does not exist. A torn last line
/// fails the test: an effect must be written whole before it is reported.
pub fn read_lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            assert!(text.is_empty() || text.ends_with('\n'), "torn line in {}", path.display());
            text.lines().map(str::to_owned).collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

/// A journal, one event a line with its time, for failure messages.
pub fn format_journal(history: &[RecordedEvent]) -> String {
    history.iter().fold(String::new(), |mut out, r| {
        let _ = writeln!(out, "  {:>3} {:>13} {:?}", r.seq, r.at.0, r.event);
        out
    })
}

/// Nothing whose end a journal recorded, or whose result reached a saga body (`settled`, with
/// how often it had run then), ran again. `when` says which run this was, for the message.
pub fn check_not_rerun(
    counts: &HashMap<Key, usize>,
    settled: &HashMap<Key, usize>,
    when: &str,
    journal: impl Fn(&str) -> String,
) {
    for (key, before) in settled {
        let now = counts.get(key).copied().unwrap_or(0);
        assert_eq!(
            now,
            *before,
            "{key:?} ran again after its end was recorded, or after it returned to the saga body ({when}); journal:\n{}",
            journal(&key.1)
        );
    }
}

/// The attempts of one step or compensation that ran, in file order, against those the journal
/// started. An attempt is journaled before it runs, so none may run twice or unjournaled; once
/// the thing has `finished`, its recorded end belongs to the last attempt journaled, which ran.
pub fn check_attempts(what: &str, ran: &[u32], journaled: &[u32], finished: bool, journal: &str) {
    assert!(ran.windows(2).all(|w| w[0] < w[1]), "{what} ran attempts {ran:?}; journal:\n{journal}");
    assert!(
        ran.iter().all(|a| journaled.contains(a)),
        "{what} ran attempts {ran:?}, journaled {journaled:?}; journal:\n{journal}"
    );
    if finished {
        assert_eq!(ran.last(), journaled.iter().max(), "{what}: last attempt; journal:\n{journal}");
    }
}

/// Adds to `settled` each step and compensation of `saga` whose end `history` records, with how
/// often it has run so far (`counts`): none of them may run again. Each must have run at least
/// once; `silent` steps leave no effect lines and are skipped.
pub fn settle(
    saga: &str,
    history: &[RecordedEvent],
    counts: &HashMap<Key, usize>,
    silent: impl Fn(u32) -> bool,
    settled: &mut HashMap<Key, usize>,
) {
    for recorded in history {
        let key = match recorded.event {
            Event::StepCompleted { step, .. } | Event::StepFailed { step, .. } if !silent(step) => {
                (Kind::Step, saga.to_owned(), step)
            }
            Event::CompensationCompleted { step } if !silent(step) => (Kind::Comp, saga.to_owned(), step),
            _ => continue,
        };
        let ran = counts.get(&key).copied().unwrap_or(0);
        assert!(
            ran > 0,
            "{key:?} is recorded as finished but never ran; journal:\n{}",
            format_journal(history)
        );
        settled.insert(key, ran);
    }
}

/// Per saga and step name: the step number and the attempt that ran live in this process.
type LiveSteps = HashMap<(String, String), (u32, u32)>;

static LIVE: LazyLock<Mutex<LiveSteps>> = LazyLock::new(Mutex::default);

/// In a step body: notes that this attempt runs live in this process (see [`returned`]).
pub fn ran_live(ctx: &StepContext) {
    let mut live = LIVE.lock().expect("live steps");
    live.insert((ctx.saga_id.to_string(), ctx.name.clone()), (ctx.step, ctx.attempt));
}

/// The notes of [`returned`] in the child's directory `root`.
pub fn returns_log(root: &Path) -> PathBuf {
    root.join("returned.log")
}

/// In the saga body, right after the step `name` returned Ok: if it ran live in this process
/// ([`ran_live`]), notes that its attempt returned to the body (`saga step attempt` in
/// [`returns_log`]), then offers a kill in `window`. A step that only replayed offers none: the
/// body went past it in an earlier process already.
pub fn returned(root: &Path, window: Window, saga: &SagaId, name: &str) {
    let live = LIVE.lock().expect("live steps").remove(&(saga.to_string(), name.to_owned()));
    if let Some((step, attempt)) = live {
        append_line(&returns_log(root), &format!("{saga} {step} {attempt}")).expect("note the return");
        kill_point(window, &format!("{saga} {name} returned"));
    }
}

/// [`returned`] in [`Window::Unjournaled`], on a blocking thread the saga body awaits: the body
/// waits on something the journal knows nothing of.
pub async fn returned_while_awaiting(root: &Path, saga: &SagaId, name: &str) {
    let (root, saga, name) = (root.to_owned(), saga.clone(), name.to_owned());
    tokio::task::spawn_blocking(move || returned(&root, Window::Unjournaled, &saga, &name))
        .await
        .expect("the blocking kill point");
}

/// Adds to `settled` each step whose return to the saga body [`returned`] noted in `root`, with
/// how often it had run by then (its attempts up to the one that returned, from `ran`): none
/// may run again, whatever the journal holds. One the journal settled already must agree.
pub fn settle_returned(root: &Path, ran: &HashMap<Key, Vec<u32>>, settled: &mut HashMap<Key, usize>) {
    for line in read_lines(&returns_log(root)) {
        let fields: Vec<&str> = line.split(' ').collect();
        let [saga, step, attempt] = fields[..] else { panic!("malformed return note {line:?}") };
        let key = (Kind::Step, saga.to_owned(), step.parse().expect("a step number"));
        let attempt: u32 = attempt.parse().expect("an attempt");
        let attempts = ran.get(&key).map(Vec::as_slice).unwrap_or_default();
        let before = attempts.iter().filter(|a| **a <= attempt).count();
        assert!(before > 0, "{key:?} returned in attempt {attempt} but never ran");
        if let Some(recorded) = settled.insert(key.clone(), before) {
            assert_eq!(
                recorded, before,
                "{key:?} ran again (attempts {attempts:?}) after attempt {attempt} returned to the saga body"
            );
        }
    }
}

/// The attempts each step or compensation ran, in file order.
pub fn attempts(effects: impl IntoIterator<Item = (Key, u32)>) -> HashMap<Key, Vec<u32>> {
    let mut ran: HashMap<Key, Vec<u32>> = HashMap::new();
    for (key, attempt) in effects {
        ran.entry(key).or_default().push(attempt);
    }
    ran
}

/// One line of an effect log `step|comp <saga> <step number> <name> <attempt>`.
#[derive(Clone, Debug)]
pub struct Effect {
    pub kind: Kind,
    pub saga: String,
    pub step: u32,
    pub name: String,
    pub attempt: u32,
}

impl Effect {
    pub fn key(&self) -> Key {
        (self.kind, self.saga.clone(), self.step)
    }

    fn parse(line: &str) -> Option<Effect> {
        let fields: Vec<&str> = line.split(' ').collect();
        let [kind, saga, step, name, attempt] = fields[..] else { return None };
        let kind = match kind {
            "step" => Kind::Step,
            "comp" => Kind::Comp,
            _ => return None,
        };
        Some(Effect {
            kind,
            saga: saga.to_owned(),
            step: step.parse().ok()?,
            name: name.to_owned(),
            attempt: attempt.parse().ok()?,
        })
    }
}

/// The effects of a log of [`Effect`] lines, in file order.
pub fn read_effects(path: &Path) -> Vec<Effect> {
    read_lines(path)
        .iter()
        .map(|line| Effect::parse(line).unwrap_or_else(|| panic!("malformed effect line {line:?}")))
        .collect()
}

pub fn count_effects(effects: &[Effect]) -> HashMap<Key, usize> {
    count(effects.iter().map(Effect::key))
}

/// See [`attempts`].
pub fn effect_attempts(effects: &[Effect]) -> HashMap<Key, Vec<u32>> {
    attempts(effects.iter().map(|e| (e.key(), e.attempt)))
}
