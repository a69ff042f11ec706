//! Translation between the wire's jobs and the runner's: the spec in, the result out.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::protocol::v1;
use crate::runner::{self, DEFAULT_GRACE, Exit, MetricsSource, Outcome, RunnerError, Secrets};

/// The runner's spec and secrets for a wire spec. A `script` without an interpreter runs with
/// `/bin/sh -s`, the interpreter the runner's stdin header is designed for.
pub(super) fn job_spec(spec: v1::JobSpec) -> Result<(runner::JobSpec, Secrets), RunnerError> {
    let v1::JobSpec {
        command,
        script,
        interpreter,
        env,
        working_dir,
        secrets,
        timeout_ms,
        cancel_grace_ms,
        inherit_env,
        ..
    } = spec;
    const NO_SHELL_ARGS: [&str; 0] = [];
    let mut job = match (command.split_first(), interpreter.split_first()) {
        (Some((program, args)), _) => runner::JobSpec::command(program, args),
        (None, Some((program, args))) => runner::JobSpec::script(program, args, script),
        (None, None) if !script.is_empty() => runner::JobSpec::script("/bin/sh", NO_SHELL_ARGS, script),
        (None, None) => {
            return Err(RunnerError::InvalidSpec { reason: "neither a command nor a script".to_owned() });
        }
    };
    // Sorted, so that the job sees the same environment order every time.
    let mut env: BTreeMap<String, String> = env.into_iter().collect();
    // The agent's own values of the names the job inherits from its worker; the control plane
    // already left out those the job sets, and a name the agent does not have stays unset.
    for name in inherit_env {
        if let Ok(value) = std::env::var(&name) {
            env.entry(name).or_insert(value);
        }
    }
    for (name, value) in env {
        job = job.env(name, value);
    }
    if !working_dir.is_empty() {
        job = job.working_dir(working_dir);
    }
    if timeout_ms > 0 {
        job = job.timeout(Duration::from_millis(timeout_ms));
    }
    job = job.grace(if cancel_grace_ms > 0 { Duration::from_millis(cancel_grace_ms) } else { DEFAULT_GRACE });
    let mut values = Secrets::new();
    for (name, value) in secrets {
        values.insert(name, value.into_bytes())?;
    }
    Ok((job, values))
}

/// The wire result for what the runner reported.
pub(super) fn job_result(
    job_id: &str,
    finished: Result<runner::JobResult, RunnerError>,
    source: &MetricsSource,
    reason: Option<&String>,
) -> v1::JobResult {
    use v1::job_result::Outcome as Wire;
    let metrics_source = match source {
        MetricsSource::Cgroup { .. } => "cgroup",
        MetricsSource::Proc { .. } => "proc",
    };
    let result = match finished {
        Ok(result) => result,
        // The proto has no outcome for the runner's own failure; the job's end is unknown, and
        // "did not run properly" is what the hub must hear.
        Err(e) => {
            return v1::JobResult {
                job_id: job_id.to_owned(),
                outcome: Some(Wire::FailedToStart(format!("the runner failed: {e}"))),
                metrics_source: metrics_source.to_owned(),
                ..v1::JobResult::default()
            };
        }
    };
    let outcome = match (result.outcome, result.exit) {
        (Outcome::Completed, Exit::Code(code)) => Wire::ExitCode(code),
        (Outcome::Completed, Exit::Signal(signal)) => Wire::Signal(signal),
        (Outcome::Cancelled, _) => Wire::Cancelled(reason.cloned().unwrap_or_else(|| "cancelled".to_owned())),
        (Outcome::TimedOut, _) => Wire::TimedOut(true),
        // Only when this session's sender is gone, so the result is unlikely to arrive at all.
        (Outcome::SinkClosed, _) => Wire::Cancelled("the session closed".to_owned()),
    };
    let metrics = &result.metrics;
    v1::JobResult {
        job_id: job_id.to_owned(),
        outcome: Some(outcome),
        stdout_bytes: result.stdout_bytes,
        stderr_bytes: result.stderr_bytes,
        cpu_usage_usec: u64::try_from(metrics.cpu.as_micros()).unwrap_or(u64::MAX),
        memory_peak_bytes: metrics.peak_memory_bytes.unwrap_or(0),
        wall_time_ms: u64::try_from(metrics.wall.as_millis()).unwrap_or(u64::MAX),
        metrics_source: metrics_source.to_owned(),
        spans: Vec::new(),
    }
}
