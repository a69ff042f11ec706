//! Resource usage of a job: a cgroup v2 of its own where the agent may create one, else
//! `/proc/<pid>` of its main process.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Where the runner may put a job's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CgroupMode {
    /// Under the agent's own cgroup, as `/proc/self/cgroup` names it below `/sys/fs/cgroup`.
    ///
    /// cgroup v2 lets only a cgroup without processes of its own hand controllers to children,
    /// the root excepted, so this works where the agent sits at the root of its cgroup namespace
    /// (a container with a private cgroup namespace whose root enables `memory` for children).
    /// An agent run by systemd with `Delegate=yes` should move itself into a leaf and name the
    /// delegated parent with [`CgroupMode::Under`].
    #[default]
    Auto,
    /// Under this cgroup v2 directory (one delegated to the agent).
    Under(PathBuf),
    /// Never: always measure through `/proc`.
    Off,
}

/// Where a job's numbers come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MetricsSource {
    /// The job's own cgroup v2: counts every process of the job, grandchildren included.
    Cgroup {
        /// The cgroup directory (removed when the job ends).
        path: PathBuf,
    },
    /// `/proc/<pid>/stat` and `/proc/<pid>/status` of the job's main process. Its memory misses
    /// every other process of the job; its CPU time includes the children it waited for (the
    /// kernel adds those to `cutime`/`cstime`) but misses those it did not.
    Proc {
        /// The main process.
        pid: u32,
    },
}

/// One reading, sent to the metrics sink while the job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSample {
    /// Time since the job was spawned.
    pub elapsed: Duration,
    /// CPU time used so far (user + system).
    pub cpu: Duration,
    /// Memory in use now (cgroup `memory.current`, or `VmRSS`; 0 once the process has exited).
    pub memory_bytes: u64,
    /// The highest memory use seen so far: the largest of the source's own peak (`memory.peak`,
    /// `VmHWM`) and every earlier reading.
    pub peak_memory_bytes: u64,
}

/// A job's totals, in its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSummary {
    /// Where the numbers come from.
    pub source: MetricsSource,
    /// From spawn to the main process's exit.
    pub wall: Duration,
    /// CPU time (user + system) used by the job.
    pub cpu: Duration,
    /// The highest memory use seen, or `None` if the job ended before any reading of its memory
    /// (only possible with [`MetricsSource::Proc`]: a process that has exited has no memory
    /// figures left).
    pub peak_memory_bytes: Option<u64>,
}

/// How often a running job is sampled by default: cheap (three small pseudo-file reads) and
/// fine-grained enough for a job that runs for minutes.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl CgroupMode {
    /// The directory new job cgroups go under on this machine, if the mode allows one and it is
    /// usable (else jobs are measured through `/proc`): a cgroup v2 directory (only those have
    /// `cgroup.controllers`) whose `cgroup.subtree_control` enables the memory controller, so
    /// that a child gets `memory.current`. (`cpu.stat` with `usage_usec` is in every v2
    /// cgroup.) The runner never enables controllers itself: that changes the hierarchy for
    /// everything else under that parent.
    pub fn usable_parent(&self) -> Option<PathBuf> {
        let parent = match self {
            CgroupMode::Off => return None,
            CgroupMode::Under(dir) => dir.clone(),
            CgroupMode::Auto => {
                let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
                let relative = parse_own_cgroup(&own)?;
                Path::new(CGROUP_ROOT).join(relative.trim_start_matches('/'))
            }
        };
        let controllers = std::fs::read_to_string(parent.join("cgroup.subtree_control")).ok()?;
        let delegated = parent.join("cgroup.controllers").is_file()
            && controllers.split_whitespace().any(|c| c == "memory");
        delegated.then_some(parent)
    }
}

/// Creates the job's cgroup under `parent`, sets its memory limit, and moves `pid` into it.
///
/// Processes the job forks before the move stay in the agent's cgroup, and memory it touches
/// before the move stays charged there, outside the limit: the window is the few microseconds
/// between `spawn` returning and this write (closing it needs `clone3` with
/// `CLONE_INTO_CGROUP`, which the standard library does not offer). For a script job the window
/// is harmless, since the interpreter forks nothing before it has read its stdin, which the
/// runner writes only after the move.
pub(crate) fn create_job_cgroup(parent: &Path, pid: u32, memory_limit: Option<u64>) -> io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let path = parent.join(format!("hodei-job-{}-{seq}", std::process::id()));
    std::fs::create_dir(&path)?;
    // Checked before the move: a cgroup with a process in it cannot be removed again.
    let moved = if path.join("memory.current").is_file() {
        memory_limit
            .map_or(Ok(()), |limit| limit_memory(&path, limit))
            .and_then(|()| std::fs::write(path.join("cgroup.procs"), pid.to_string()))
    } else {
        Err(io::Error::new(io::ErrorKind::Unsupported, "no memory controller in the job cgroup"))
    };
    if let Err(e) = moved {
        let _ = std::fs::remove_dir(&path);
        return Err(e);
    }
    Ok(path)
}

/// The limit holds for the job as a whole: `memory.oom.group` makes the OOM killer take every
/// process of the job at once, so a job is never left running with one of its processes gone.
/// Swap would let the job go on past the limit at a crawl instead, so it gets none (the file
/// exists only where the kernel accounts swap).
fn limit_memory(path: &Path, limit: u64) -> io::Result<()> {
    std::fs::write(path.join("memory.max"), limit.to_string())?;
    std::fs::write(path.join("memory.oom.group"), "1")?;
    match std::fs::write(path.join("memory.swap.max"), "0") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Whether the OOM killer killed a process of the job, from its cgroup's `memory.events`.
pub(crate) async fn oom_killed(path: &Path) -> bool {
    let events = tokio::fs::read_to_string(path.join("memory.events")).await;
    events.ok().as_deref().and_then(|e| parse_event_count(e, "oom_kill")).is_some_and(|n| n > 0)
}

/// Kills whatever is in the job's cgroup, including processes that left its process group.
pub(crate) async fn kill_job_cgroup(path: &Path) {
    use tokio::io::AsyncWriteExt;
    // `cgroup.kill` exists from Linux 5.14; before that the process group kill is all there is.
    // Opened without `create`: a file that is not there is not made.
    if let Ok(mut kill) = tokio::fs::OpenOptions::new().write(true).open(path.join("cgroup.kill")).await {
        let _ = kill.write_all(b"1").await;
    }
}

/// Kills whatever is left in the job's cgroup and removes it.
///
/// `rmdir` fails with EBUSY until the killed processes are gone, which takes a moment after
/// SIGKILL; the kernel signals that only through inotify or poll on `cgroup.events`, neither
/// reachable with this crate's dependencies, so removal is retried a bounded number of times.
pub(crate) async fn remove_job_cgroup(path: &Path) {
    kill_job_cgroup(path).await;
    let mut delay = Duration::from_millis(5);
    for attempt in 0..10 {
        match tokio::fs::remove_dir(path).await {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if attempt == 9 => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the job's cgroup");
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// One reading from a source, before it is folded into the job's running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reading {
    cpu: Option<Duration>,
    memory: Option<u64>,
    peak: Option<u64>,
}

/// Takes readings of one job and keeps its running totals.
#[derive(Debug, Clone)]
pub(crate) struct Meter {
    source: MetricsSource,
    started: Instant,
    totals: Arc<Mutex<Totals>>,
    sink: Option<mpsc::Sender<MetricsSample>>,
}

#[derive(Debug, Default)]
struct Totals {
    cpu: Duration,
    peak: Option<u64>,
}

impl Meter {
    pub(crate) fn new(
        source: MetricsSource,
        started: Instant,
        sink: Option<mpsc::Sender<MetricsSample>>,
    ) -> Self {
        Self { source, started, totals: Arc::default(), sink }
    }

    pub(crate) fn source(&self) -> &MetricsSource {
        &self.source
    }

    /// Reads the source once, updates the totals and offers the sample to the sink.
    ///
    /// A full sink loses the sample rather than slowing anything: every sample carries the
    /// cumulative CPU time and the peak so far, so the next one makes up for it.
    pub(crate) async fn sample(&self) {
        let reading = match &self.source {
            MetricsSource::Cgroup { path } => read_cgroup(path).await,
            MetricsSource::Proc { pid } => read_proc(*pid).await,
        };
        if reading == Reading::default() {
            return;
        }
        let sample = {
            let mut totals = self.totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(cpu) = reading.cpu {
                totals.cpu = totals.cpu.max(cpu);
            }
            let seen = reading.peak.into_iter().chain(reading.memory).chain(totals.peak).max();
            totals.peak = seen;
            MetricsSample {
                elapsed: self.started.elapsed(),
                cpu: totals.cpu,
                memory_bytes: reading.memory.unwrap_or(0),
                peak_memory_bytes: seen.unwrap_or(0),
            }
        };
        if let Some(sink) = &self.sink {
            let _ = sink.try_send(sample);
        }
    }

    /// Samples every `interval` until the returned task is aborted.
    pub(crate) fn spawn_sampler(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let meter = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            // A slow read must not be followed by a burst of catch-up reads.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                meter.sample().await;
            }
        })
    }

    pub(crate) fn summary(&self, wall: Duration) -> MetricsSummary {
        let totals = self.totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        MetricsSummary { source: self.source.clone(), wall, cpu: totals.cpu, peak_memory_bytes: totals.peak }
    }
}

async fn read_cgroup(dir: &Path) -> Reading {
    let read = |name: &str| tokio::fs::read_to_string(dir.join(name));
    let (cpu, current, peak) = tokio::join!(read("cpu.stat"), read("memory.current"), read("memory.peak"));
    Reading {
        cpu: cpu.ok().as_deref().and_then(parse_cpu_stat_usage),
        memory: current.ok().as_deref().and_then(parse_single_u64),
        // `memory.peak` exists from Linux 5.19; before that the readings' maximum is the peak.
        peak: peak.ok().as_deref().and_then(parse_single_u64),
    }
}

async fn read_proc(pid: u32) -> Reading {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let (stat, status) = tokio::join!(
        tokio::fs::read_to_string(dir.join("stat")),
        tokio::fs::read_to_string(dir.join("status"))
    );
    let status = status.ok();
    let kib = |key| status.as_deref().and_then(|s| parse_status_kib(s, key)).map(|k| k * 1024);
    let ticks = clock_ticks_per_second();
    Reading {
        cpu: stat.ok().as_deref().and_then(parse_proc_stat_ticks).map(|t| {
            Duration::from_secs(t / ticks) + Duration::from_nanos((t % ticks) * 1_000_000_000 / ticks)
        }),
        memory: kib("VmRSS:"),
        peak: kib("VmHWM:"),
    }
}

/// `usage_usec` of a `cpu.stat`.
fn parse_cpu_stat_usage(text: &str) -> Option<Duration> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_micros)
}

/// A file holding one number, like `memory.current`.
fn parse_single_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// One counter of a flat keyed file such as `memory.events`.
fn parse_event_count(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// utime + stime + cutime + cstime of a `/proc/<pid>/stat`, in clock ticks.
fn parse_proc_stat_ticks(text: &str) -> Option<u64> {
    // The command name is in parentheses and may itself hold spaces and parentheses: fields are
    // counted from the last `)`. After it come field 3 (state) onwards; utime is field 14.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields.get(11..15)?.iter().try_fold(0u64, |sum, f| sum.checked_add(f.parse::<u64>().ok()?))
}

/// A `kB` line of `/proc/<pid>/status`, such as `VmHWM:`, in KiB.
fn parse_status_kib(text: &str, key: &str) -> Option<u64> {
    let value = text.lines().find_map(|l| l.strip_prefix(key))?;
    value.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// The agent's cgroup v2 path from `/proc/self/cgroup` (the `0::` line).
fn parse_own_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::trim).filter(|p| p.starts_with('/'))
}

/// `AT_CLKTCK` from the auxiliary vector, the unit of `/proc/<pid>/stat` times.
fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    // 100 is USER_HZ on every architecture this agent targets, should auxv be unreadable.
    *TICKS.get_or_init(|| {
        std::fs::read("/proc/self/auxv").ok().and_then(|a| parse_auxv_clock_ticks(&a)).unwrap_or(100)
    })
}

fn parse_auxv_clock_ticks(auxv: &[u8]) -> Option<u64> {
    const AT_CLKTCK: u64 = 17;
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> Option<u64> { Some(usize::from_ne_bytes(b.try_into().ok()?) as u64) };
    auxv.chunks_exact(2 * WORD)
        .find_map(|pair| (word(&pair[..WORD])? == AT_CLKTCK).then(|| word(&pair[WORD..])).flatten())
        .filter(|&t| t > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat() {
        let text = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\nnr_periods 0\n";
        assert_eq!(parse_cpu_stat_usage(text), Some(Duration::from_micros(1_234_567)));
        assert_eq!(parse_cpu_stat_usage("user_usec 5\n"), None);
        assert_eq!(parse_cpu_stat_usage("usage_usec lots\n"), None);
    }

    #[test]
    fn memory_events() {
        let text = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 1\noom_group_kill 1\n";
        assert_eq!(parse_event_count(text, "oom_kill"), Some(1));
        assert_eq!(parse_event_count(text, "max"), Some(17));
        assert_eq!(parse_event_count("oom_group_kill 1\n", "oom_kill"), None);
    }

    #[test]
    fn memory_files() {
        assert_eq!(parse_single_u64("52428800\n"), Some(52_428_800));
        assert_eq!(parse_single_u64("max\n"), None);
        assert_eq!(parse_single_u64(""), None);
    }

    #[test]
    fn proc_stat_with_awkward_command_name() {
        // Fields 14..=17 are 11 22 33 44; the name holds a space and a `)`.
        let text = "4242 (my) prog) S 1 4242 4242 0 -1 4194304 100 0 0 0 11 22 33 44 20 0 1 0 \
                    123 4096 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        assert_eq!(parse_proc_stat_ticks(text), Some(110));
        assert_eq!(parse_proc_stat_ticks("4242 (short) S 1 2"), None);
        assert_eq!(parse_proc_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn proc_status() {
        let text = "Name:\tsh\nVmPeak:\t    9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1536 kB\n";
        assert_eq!(parse_status_kib(text, "VmHWM:"), Some(2048));
        assert_eq!(parse_status_kib(text, "VmRSS:"), Some(1536));
        // A zombie's status has no Vm lines at all.
        assert_eq!(parse_status_kib("Name:\tsh\nState:\tZ (zombie)\n", "VmRSS:"), None);
    }

    #[test]
    fn own_cgroup() {
        let hybrid = "4:memory:/x\n1:cpu:/\n0::/system.slice/agent.service\n";
        assert_eq!(parse_own_cgroup(hybrid), Some("/system.slice/agent.service"));
        assert_eq!(parse_own_cgroup("0::/\n"), Some("/"));
        assert_eq!(parse_own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn auxv() {
        let mut auxv = Vec::new();
        for (k, v) in [(6usize, 4096usize), (17, 250), (0, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv_clock_ticks(&auxv), Some(250));
        assert_eq!(parse_auxv_clock_ticks(&auxv[..16]), None);
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn detection_refuses_what_is_not_a_delegated_cgroup2() {
        let dir = tempfile::tempdir().unwrap();
        let under = CgroupMode::Under(dir.path().to_owned());
        assert_eq!(under.usable_parent(), None, "no cgroup files at all");
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "cpu pids\n").unwrap();
        assert_eq!(under.usable_parent(), None, "memory not enabled for children");
        std::fs::write(dir.path().join("cgroup.subtree_control"), "cpu memory\n").unwrap();
        assert_eq!(under.usable_parent(), Some(dir.path().to_owned()));
        assert_eq!(CgroupMode::Off.usable_parent(), None);
    }

    #[test]
    fn a_job_cgroup_without_memory_accounting_is_removed_again() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_job_cgroup(dir.path(), std::process::id(), Some(1 << 20)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the job directory was removed");
    }

    #[tokio::test]
    async fn a_cgroup_is_read_into_samples_and_totals_and_removed() {
        // cgroupfs files as the kernel writes them, in a plain directory.
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("job");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 250000\nuser_usec 200000\nsystem_usec 50000\n")
            .unwrap();
        std::fs::write(dir.join("memory.current"), "1048576\n").unwrap();
        std::fs::write(dir.join("memory.peak"), "8388608\n").unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let meter = Meter::new(MetricsSource::Cgroup { path: dir.clone() }, Instant::now(), Some(tx));
        meter.sample().await;
        let sample = rx.try_recv().unwrap();
        assert_eq!(sample.cpu, Duration::from_millis(250));
        assert_eq!((sample.memory_bytes, sample.peak_memory_bytes), (1_048_576, 8_388_608));

        // Without memory.peak (before Linux 5.19) the highest reading is the peak.
        std::fs::remove_file(dir.join("memory.peak")).unwrap();
        std::fs::write(dir.join("memory.current"), "9999999\n").unwrap();
        meter.sample().await;
        let summary = meter.summary(Duration::from_secs(1));
        assert_eq!(summary.peak_memory_bytes, Some(9_999_999));
        assert_eq!(summary.cpu, Duration::from_millis(250));

        for f in ["cpu.stat", "memory.current"] {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        remove_job_cgroup(&dir).await;
        assert!(!dir.exists());
    }
}
