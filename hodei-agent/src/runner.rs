//! Running one job on a worker, independent of how its output and result travel.
//!
//! [`JobRunner::start`] spawns the job and returns a [`RunningJob`]: its output goes to a
//! bounded [`mpsc`] sink as [`LogBatch`]es, optional [`MetricsSample`]s to a second one, and
//! [`RunningJob::wait`] gives the [`JobResult`].
//!
//! # Secrets on stdin
//!
//! Secret values never go into the job's argv or environment, where other local users and
//! `/proc/<pid>/environ` can read them (a spec that puts one there is refused), nor to disk.
//! The job's stdin, a pipe the runner writes and then closes, carries them.
//!
//! A script for a POSIX shell ([`Invocation::Script`] with `sh`, `bash`, `dash`, ...) runs as
//! `<shell> <args> /dev/stdin` and reads, as shell code:
//!
//! ```text
//! NAME1='value 1'                  one assignment per secret, in name order: the value's bytes
//! NAME2='it'\''s'                  in single quotes, a quote as '\'' (newlines, $, \ as they are)
//! exec 0</dev/null                 the script's commands read /dev/null, not the script
//! <script bytes>
//! ```
//!
//! so `$NAME1` holds the value, ready to use (`docker login --password "$TOKEN"`), never
//! exported unless the script exports it. A shell variable cannot hold a NUL byte, so a secret
//! with one is refused for a shell script. The shell reads the script through a descriptor of
//! its own, so a command in it that reads stdin (`cat`, `docker login --password-stdin`) gets
//! end-of-file, not the rest of the script.
//!
//! Any other program ([`Invocation::Command`], or a script for another interpreter, which
//! follows the header on stdin) reads this header, lines up to a blank one:
//!
//! ```text
//! NAME1=<base64 of value 1>\n      one line per secret, in name order, standard padded base64
//! NAME2=<base64 of value 2>\n
//! \n                               a blank line ends the header (it is there with no secrets)
//! <script bytes>                   a non-shell Invocation::Script only
//! ```
//!
//! # Output
//!
//! stdout and stderr are read as bytes, masked (see [`Masker`] for what is masked), and cut into
//! batches per [`BatchLimits`]. Offsets count bytes of the *masked* stream, each stream from 0.
//! When the sink is full the runner stops reading, so the job blocks on its next write: output
//! is never dropped and the runner holds at most [`BufferStats::bound`] bytes of it. If the sink
//! is closed the job is stopped ([`Outcome::SinkClosed`]).
//!
//! # Stopping
//!
//! The job leads its own process group. [`RunningJob::cancel`], dropping the [`RunningJob`], or
//! the spec's timeout sends SIGTERM to the group, then SIGKILL after the spec's grace period.
//! When the job's main process exits (on its own or not), whatever it left running in its group
//! is SIGKILLed, and with a cgroup so is everything in the cgroup: a job does not outlive its
//! main process. Its output pipes are then read to their end, but for at most the grace period
//! if a process outside the group still holds them open ([`JobResult::pipes_held_open`]).
//!
//! # Metrics
//!
//! See [`CgroupMode`] and [`MetricsSource`]: a cgroup v2 of the job's own when the agent's cgroup
//! delegates the memory controller, `/proc/<pid>` of the main process otherwise. A job cgroup
//! also holds the job's [`JobSpec::memory_limit`], so a job with a limit needs one.

mod batch;
mod encoding;
mod error;
mod mask;
mod metrics;
mod process;
mod sentinel;
mod spec;

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use batch::{BatchLimits, LogBatch, Stream};
pub use error::RunnerError;
pub use mask::{MASK, MIN_DERIVED_LEN, Masker};
pub use metrics::{CgroupMode, DEFAULT_SAMPLE_INTERVAL, MetricsSample, MetricsSource, MetricsSummary};
pub use spec::{DEFAULT_GRACE, Invocation, JobSpec, SecretValue, Secrets};

use batch::{BufferGauge, Pump, PumpReport};
use metrics::Meter;
use process::{ExitWatch, GroupGuard, signal_group};

type PumpTask = JoinHandle<Result<PumpReport, RunnerError>>;

/// How the runner runs every job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// When output batches are sent.
    pub batch: BatchLimits,
    /// How often a running job's usage is sampled (at least 1 ms is used).
    pub sample_interval: Duration,
    /// Whether and where jobs get a cgroup.
    pub cgroup: CgroupMode,
    /// Whether a job's processes are killed when this process dies, by a watcher outside it
    /// (`/bin/sh`): for an agent that runs inside another program, whose death would otherwise
    /// orphan its jobs. A job whose watcher cannot start fails to start.
    pub jobs_die_with_process: bool,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch: BatchLimits::default(),
            sample_interval: DEFAULT_SAMPLE_INTERVAL,
            cgroup: CgroupMode::Auto,
            jobs_die_with_process: false,
        }
    }
}

impl RunnerConfig {
    /// Sets the batch limits.
    #[must_use]
    pub fn batch(mut self, batch: BatchLimits) -> Self {
        self.batch = batch;
        self
    }

    /// Sets the sampling period.
    #[must_use]
    pub fn sample_interval(mut self, interval: Duration) -> Self {
        self.sample_interval = interval;
        self
    }

    /// Sets the cgroup mode.
    #[must_use]
    pub fn cgroup(mut self, mode: CgroupMode) -> Self {
        self.cgroup = mode;
        self
    }

    /// Sets whether jobs die with this process ([`RunnerConfig::jobs_die_with_process`]).
    #[must_use]
    pub fn jobs_die_with_process(mut self, die: bool) -> Self {
        self.jobs_die_with_process = die;
        self
    }
}

/// Why the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Outcome {
    /// Its main process exited by itself (with any code, or killed by a signal it did not get
    /// from the runner).
    Completed,
    /// It was cancelled through [`RunningJob::cancel`] or by dropping the [`RunningJob`].
    Cancelled,
    /// It ran past the spec's timeout.
    TimedOut,
    /// The log sink was closed, so its output could no longer be delivered.
    SinkClosed,
}

/// How the main process ended, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// Everything known about a job once it is over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobResult {
    /// Why it ended.
    pub outcome: Outcome,
    /// How its main process ended.
    pub exit: Exit,
    /// Masked stdout bytes sent to the sink: the end offset of the stream.
    pub stdout_bytes: u64,
    /// Masked stderr bytes sent to the sink.
    pub stderr_bytes: u64,
    /// A process outside the job's group still held stdout or stderr open a grace period after
    /// the main process exited; whatever it writes after that is not captured.
    pub pipes_held_open: bool,
    /// The kernel's OOM killer killed a process of the job: the job went past its
    /// [`JobSpec::memory_limit`], which kills every process of it at once (`exit` is then
    /// SIGKILL), or the machine ran out of memory. Known only with a job cgroup (its
    /// `memory.events`); always false without one.
    pub oom_killed: bool,
    /// Resource usage.
    pub metrics: MetricsSummary,
}

/// Watches the output bytes held inside the runner for one job; outlives the [`RunningJob`].
#[derive(Debug, Clone)]
pub struct BufferMonitor {
    gauge: Arc<BufferGauge>,
    bound: usize,
}

impl BufferMonitor {
    /// The numbers now.
    pub fn stats(&self) -> BufferStats {
        BufferStats { held: self.gauge.held(), peak: self.gauge.peak(), bound: self.bound }
    }
}

/// Output bytes held inside the runner for one job, for watching that backpressure works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferStats {
    /// Held now.
    pub held: usize,
    /// The most held at any time so far.
    pub peak: usize,
    /// The most that can ever be held, from the batch limits and the longest masked pattern.
    pub bound: usize,
}

/// Why the runner stops a job early. The first reason wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    TimedOut,
    SinkClosed,
    /// A pipe could not be read: the job would block forever on a full pipe.
    OutputFailed,
}

/// Requests a stop; cheap to clone.
#[derive(Debug, Clone)]
struct StopSender(watch::Sender<Option<StopReason>>);

impl StopSender {
    fn request(&self, reason: StopReason) {
        self.0.send_if_modified(|current| {
            let first = current.is_none();
            if first {
                *current = Some(reason);
            }
            first
        });
    }
}

/// Cancels one job; cheap to clone, usable after [`RunningJob::wait`] has taken the job.
#[derive(Debug, Clone)]
pub struct CancelHandle(StopSender);

impl CancelHandle {
    /// Stops the job: SIGTERM to its group now, SIGKILL after the grace period. Does nothing if
    /// it is already stopping or over.
    pub fn cancel(&self) {
        self.0.request(StopReason::Cancelled);
    }
}

/// Starts jobs. Cheap to clone; holds only the configuration.
#[derive(Debug, Clone, Default)]
pub struct JobRunner {
    config: RunnerConfig,
}

impl JobRunner {
    /// A runner with this configuration.
    pub fn new(config: RunnerConfig) -> Self {
        Self { config }
    }

    /// Spawns the job and starts reading its output into `logs` (and samples into `metrics`).
    ///
    /// Must be called inside a Tokio runtime. Everything it does before returning is in-memory
    /// or on pseudo-filesystems (`/proc`, cgroupfs), which never wait on a disk, so it is not
    /// async: the job is running when it returns.
    pub fn start(
        &self,
        spec: JobSpec,
        secrets: Secrets,
        logs: mpsc::Sender<LogBatch>,
        metrics: Option<mpsc::Sender<MetricsSample>>,
    ) -> Result<RunningJob, RunnerError> {
        tokio::runtime::Handle::try_current().map_err(|_| RunnerError::NoRuntime)?;
        spec.validate(&secrets)?;
        let masker = Masker::new(&secrets)?;
        let stdin_payload = spec.stdin_payload(&secrets);
        drop(secrets);

        let mut command = command(&spec);
        let cgroup_parent = self.config.cgroup.usable_parent();
        if spec.memory_limit.is_some() && cgroup_parent.is_none() {
            return Err(RunnerError::InvalidSpec {
                reason: format!(
                    "a memory limit needs a cgroup of the job's own, and {:?} gives none here: no cgroup v2 directory whose cgroup.subtree_control enables memory",
                    self.config.cgroup
                ),
            });
        }

        let started = Instant::now();
        let spawn_failed = |source| RunnerError::Spawn {
            program: spec.program().to_owned(),
            working_dir: spec.working_dir.clone(),
            source,
        };
        let mut child = command.spawn().map_err(spawn_failed)?;
        // Tokio hands out the pid and the piped ends once, right after spawn: never missing here.
        let pid = child.id();
        let pgid = pid.and_then(|p| i32::try_from(p).ok()).and_then(Pid::from_raw);
        let (Some(pid), Some(pgid), Some(mut stdin), Some(stdout), Some(stderr)) =
            (pid, pgid, child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(spawn_failed(std::io::Error::other("the new process has no pid or pipes")));
        };
        let sentinel = match self.config.jobs_die_with_process.then(|| sentinel::Sentinel::watch(pgid)) {
            None => None,
            Some(Ok(sentinel)) => Some(sentinel),
            Some(Err(source)) => {
                signal_group(pgid, Signal::KILL);
                return Err(RunnerError::Spawn {
                    program: "/bin/sh (the watcher that kills the job if this process dies)".to_owned(),
                    working_dir: None,
                    source,
                });
            }
        };
        let guard = GroupGuard::new(pgid, sentinel);

        let cgroup = cgroup_parent.map(|parent| metrics::create_job_cgroup(&parent, pid, spec.memory_limit));
        let source = match cgroup {
            Some(Ok(path)) => MetricsSource::Cgroup { path },
            // The guard kills the job on the way out: a limit asked for is never silently dropped.
            Some(Err(source)) if spec.memory_limit.is_some() => {
                return Err(RunnerError::Io {
                    context: "making the cgroup that holds the job's memory limit",
                    source,
                });
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "no cgroup for the job, measuring it through /proc");
                MetricsSource::Proc { pid }
            }
            None => MetricsSource::Proc { pid },
        };
        let meter = Meter::new(source, started, metrics);
        let exit = ExitWatch::new(pgid);

        // Written by its own task: a job that does not read its stdin must not stall the runner.
        let stdin_writer = tokio::spawn(async move {
            match stdin.write_all(stdin_payload.expose()).await {
                Ok(()) => {}
                // The job exited or closed stdin without reading it all: its choice.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => tracing::warn!(error = %e, "could not write the job's stdin"),
            }
        });

        let (stop_tx, stop_rx) = watch::channel(None);
        let stop = StopSender(stop_tx);
        let (drain_tx, drain_rx) = watch::channel(false);
        let gauge = Arc::new(BufferGauge::default());
        let bound = 2 * self.config.batch.held_bound(masker.max_pattern_len());
        let pump = |stream, masker| Pump {
            stream,
            limits: self.config.batch,
            masker,
            sink: logs.clone(),
            gauge: Arc::clone(&gauge),
            drain_deadline: drain_rx.clone(),
            stop: stop.clone(),
        };
        let stdout_pump = tokio::spawn(pump(Stream::Stdout, masker.clone()).run(stdout));
        let stderr_pump = tokio::spawn(pump(Stream::Stderr, masker).run(stderr));

        let sampler = meter.spawn_sampler(self.config.sample_interval.max(Duration::from_millis(1)));
        let source = meter.source().clone();
        let supervisor = Supervisor {
            child,
            pgid,
            guard,
            exit,
            stop_rx,
            timeout: spec.timeout,
            grace: spec.grace,
            meter,
            sampler,
            stdin_writer,
            drain_tx,
            started,
        };
        let task = tokio::spawn(supervisor.run([stdout_pump, stderr_pump]));
        let buffer = BufferMonitor { gauge, bound };
        Ok(RunningJob { pid, source, cancel: CancelHandle(stop), buffer, task: Some(task), finished: false })
    }
}

fn command(spec: &JobSpec) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(spec.program());
    command
        .args(spec.process_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that one signal reaches everything the job starts.
        .process_group(0)
        .kill_on_drop(true);
    if !spec.inherit_env {
        command.env_clear();
    }
    command.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = &spec.working_dir {
        command.current_dir(dir);
    }
    command
}

/// A job that has been started.
///
/// Dropping it cancels the job (which is then still stopped and cleaned up properly, in the
/// background).
#[derive(Debug)]
pub struct RunningJob {
    pid: u32,
    source: MetricsSource,
    cancel: CancelHandle,
    buffer: BufferMonitor,
    task: Option<JoinHandle<Result<JobResult, RunnerError>>>,
    finished: bool,
}

impl RunningJob {
    /// The main process's pid, which is also the job's process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where this job's metrics come from.
    pub fn metrics_source(&self) -> &MetricsSource {
        &self.source
    }

    /// Stops the job (see [`CancelHandle::cancel`]).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// A handle that can cancel the job from elsewhere.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Output bytes held inside the runner right now and at most so far.
    pub fn buffer_stats(&self) -> BufferStats {
        self.buffer.stats()
    }

    /// A handle on the same numbers that stays usable after [`wait`](Self::wait).
    pub fn buffer_monitor(&self) -> BufferMonitor {
        self.buffer.clone()
    }

    /// Waits until the job is over, its output delivered to the sink and its cgroup removed.
    ///
    /// Delivering the output means this waits for the sink to take it: drain the sink while
    /// waiting.
    pub async fn wait(mut self) -> Result<JobResult, RunnerError> {
        let Some(task) = self.task.take() else { return Err(RunnerError::TaskFailed { task: "supervisor" }) };
        let result = task.await.unwrap_or(Err(RunnerError::TaskFailed { task: "supervisor" }));
        self.finished = true;
        result
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel();
        }
    }
}

/// Owns the job's process from spawn to cleanup.
struct Supervisor {
    child: tokio::process::Child,
    pgid: Pid,
    guard: GroupGuard,
    exit: ExitWatch,
    stop_rx: watch::Receiver<Option<StopReason>>,
    timeout: Option<Duration>,
    grace: Duration,
    meter: Meter,
    sampler: JoinHandle<()>,
    /// Still blocked only if a process that escaped the group holds stdin open without reading.
    stdin_writer: JoinHandle<()>,
    drain_tx: watch::Sender<bool>,
    started: Instant,
}

impl Supervisor {
    async fn run(mut self, pumps: [PumpTask; 2]) -> Result<JobResult, RunnerError> {
        let waited = self.stop_and_reap().await;
        self.sampler.abort();
        self.stdin_writer.abort();
        let (reason, status) = match waited {
            Ok(done) => done,
            Err(e) => {
                let _ = self.finish_cgroup().await;
                return Err(e);
            }
        };
        let wall = self.started.elapsed();

        // Output still in the pipes is read to the end; only a pipe held open by a process that
        // escaped the group is cut off, a grace period on.
        let [stdout, stderr] = pumps;
        let joined = async { tokio::join!(stdout, stderr) };
        tokio::pin!(joined);
        let (stdout, stderr) = tokio::select! {
            r = &mut joined => r,
            () = tokio::time::sleep(self.grace) => {
                let _ = self.drain_tx.send(true);
                joined.await
            }
        };
        let oom_killed = self.finish_cgroup().await;
        let task_failed = |_| Err(RunnerError::TaskFailed { task: "output" });
        let stdout = stdout.unwrap_or_else(task_failed)?;
        let stderr = stderr.unwrap_or_else(task_failed)?;

        let outcome = match reason {
            None => Outcome::Completed,
            Some(StopReason::Cancelled) => Outcome::Cancelled,
            Some(StopReason::TimedOut) => Outcome::TimedOut,
            Some(StopReason::SinkClosed) => Outcome::SinkClosed,
            // The pump that failed has returned its error above.
            Some(StopReason::OutputFailed) => return Err(RunnerError::TaskFailed { task: "output" }),
        };
        let exit = match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Code(status.into_raw()),
        };
        Ok(JobResult {
            outcome,
            exit,
            stdout_bytes: stdout.bytes,
            stderr_bytes: stderr.bytes,
            pipes_held_open: stdout.left_open || stderr.left_open,
            oom_killed,
            metrics: self.meter.summary(wall),
        })
    }

    /// Waits for the main process to exit or for a reason to stop it, stops it if need be, kills
    /// what it left behind, and reaps it.
    async fn stop_and_reap(&mut self) -> Result<(Option<StopReason>, std::process::ExitStatus), RunnerError> {
        let timeout = self.timeout;
        let timer = async move {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let stop_rx = &mut self.stop_rx;
        let requested = async move {
            let reason = stop_rx.wait_for(Option::is_some).await.map(|r| r.unwrap_or(StopReason::Cancelled));
            match reason {
                Ok(reason) => reason,
                // Every sender is gone, so no stop can be requested any more.
                Err(_) => std::future::pending().await,
            }
        };
        let reason = tokio::select! {
            r = self.exit.exited() => { r.map_err(wait_failed)?; None }
            reason = requested => Some(reason),
            () = timer => Some(StopReason::TimedOut),
        };
        if let Some(reason) = reason {
            // A timeout races with stop requests: the first one recorded is the one reported.
            let reason = self.stop_rx.borrow().unwrap_or(reason);
            // The last look at a job being stopped, while its processes are all still there.
            self.meter.sample().await;
            signal_group(self.pgid, Signal::TERM);
            tokio::select! {
                r = self.exit.exited() => r.map_err(wait_failed)?,
                () = tokio::time::sleep(self.grace) => {
                    signal_group(self.pgid, Signal::KILL);
                    self.exit.exited().await.map_err(wait_failed)?;
                }
            }
            return self.reap(Some(reason)).await;
        }
        self.reap(None).await
    }

    async fn reap(
        &mut self,
        reason: Option<StopReason>,
    ) -> Result<(Option<StopReason>, std::process::ExitStatus), RunnerError> {
        // The leader is a zombie: its final CPU times are readable and its pid still names only
        // this group.
        self.meter.sample().await;
        signal_group(self.pgid, Signal::KILL);
        if let MetricsSource::Cgroup { path } = self.meter.source() {
            metrics::kill_job_cgroup(path).await;
        }
        self.guard.release_sentinel().await;
        let status = self
            .child
            .wait()
            .await
            .map_err(|source| RunnerError::Io { context: "reaping the job", source })?;
        self.guard.disarm();
        Ok((reason, status))
    }

    /// Takes the cgroup's final reading and removes it, and says whether the OOM killer killed
    /// a process of the job. After the pipes have closed, so that every process's CPU time is in.
    async fn finish_cgroup(&self) -> bool {
        let MetricsSource::Cgroup { path } = self.meter.source() else { return false };
        self.meter.sample().await;
        let oom_killed = metrics::oom_killed(path).await;
        metrics::remove_job_cgroup(path).await;
        oom_killed
    }
}

fn wait_failed(source: std::io::Error) -> RunnerError {
    RunnerError::Io { context: "waiting for the job to exit", source }
}
