//! Judging a job's result: the outcome of one that succeeded, the error of one that did not.

use hodei_core::StepError;
use serde::{Deserialize, Serialize};

use hodei_agent::protocol::v1::{self, job_result::Outcome};

/// A job that exited with code 0: the journaled output of its step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobOutcome {
    /// The job id: the step's idempotency key.
    pub job_id: String,
    /// The exit code (always 0: any other fails the step).
    pub exit_code: i32,
    /// Bytes written to stdout.
    pub stdout_bytes: u64,
    /// Bytes written to stderr.
    pub stderr_bytes: u64,
    /// CPU time used, in microseconds.
    pub cpu_usage_usec: u64,
    /// Peak memory, in bytes.
    pub memory_peak_bytes: u64,
    /// Wall-clock time, in milliseconds.
    pub wall_time_ms: u64,
    /// Where the figures come from: `cgroup` or `proc`.
    pub metrics_source: String,
}

impl JobOutcome {
    /// The outcome of a job `job_id` that exited 0, with no figures: what a test's stand-in for
    /// a job step returns (see `hodei_core::testing`).
    pub fn succeeded(job_id: impl Into<String>) -> Self {
        Self {
            job_id: job_id.into(),
            exit_code: 0,
            stdout_bytes: 0,
            stderr_bytes: 0,
            cpu_usage_usec: 0,
            memory_peak_bytes: 0,
            wall_time_ms: 0,
            metrics_source: String::new(),
        }
    }
}

pub(super) fn succeeded(result: &v1::JobResult) -> bool {
    result.outcome == Some(Outcome::ExitCode(0))
}

/// The job a result (whose `job_id` is `reported`) came from: a re-attached attempt reports
/// the earlier attempt's job, the one that really ran (and holds the output).
pub(super) fn ran_job<'a>(job_id: &'a str, reported: &'a str) -> &'a str {
    if reported.is_empty() { job_id } else { reported }
}

/// Exit code 0 succeeds; every other ending is the job's own failure, which a retry would
/// repeat, so it is terminal. Its error adds what the worker knows of the cause (`reason`) and
/// the last lines of the job's output (`tail`).
pub(super) fn judge(
    name: &str,
    job_id: &str,
    result: v1::JobResult,
    reason: Option<String>,
    tail: &str,
) -> Result<JobOutcome, StepError> {
    let job_id = ran_job(job_id, &result.job_id);
    let failure = match result.outcome {
        Some(Outcome::ExitCode(0)) => {
            return Ok(JobOutcome {
                job_id: job_id.to_owned(),
                exit_code: 0,
                stdout_bytes: result.stdout_bytes,
                stderr_bytes: result.stderr_bytes,
                cpu_usage_usec: result.cpu_usage_usec,
                memory_peak_bytes: result.memory_peak_bytes,
                wall_time_ms: result.wall_time_ms,
                metrics_source: result.metrics_source,
            });
        }
        Some(Outcome::ExitCode(code)) => format!("exited with code {code}"),
        Some(Outcome::Signal(signal)) => format!("was killed by signal {signal}"),
        Some(Outcome::TimedOut(_)) => "timed out".to_owned(),
        Some(Outcome::Cancelled(reason)) => format!("was cancelled: {reason}"),
        Some(Outcome::FailedToStart(reason)) => format!("failed to start: {reason}"),
        Some(Outcome::Lost(reason)) => format!("was lost: {reason}"),
        None => "ended without an outcome".to_owned(),
    };
    let because = reason.map(|reason| format!(": {reason}")).unwrap_or_default();
    if !because.is_empty() {
        tracing::warn!(job = job_id, "job `{name}` {failure}{because}");
    }
    let tail = if tail.is_empty() { String::new() } else { format!("\n{tail}") };
    Err(StepError::terminal(format!("job `{name}` ({job_id}) {failure}{because}{tail}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome) -> v1::JobResult {
        v1::JobResult { outcome: Some(outcome), stdout_bytes: 6, ..v1::JobResult::default() }
    }

    #[test]
    fn only_exit_code_zero_succeeds_and_every_failure_is_terminal_and_named() {
        let ok = judge("build", "s/0", result(Outcome::ExitCode(0)), None, "").unwrap();
        assert_eq!((ok.job_id.as_str(), ok.exit_code, ok.stdout_bytes), ("s/0", 0, 6));
        let cases = [
            (Outcome::ExitCode(3), "exited with code 3"),
            (Outcome::Signal(9), "killed by signal 9"),
            (Outcome::TimedOut(true), "timed out"),
            (Outcome::Cancelled("aborted".into()), "cancelled: aborted"),
            (Outcome::FailedToStart("no such file".into()), "failed to start: no such file"),
        ];
        for (outcome, expected) in cases {
            let error = judge("build", "s/0", result(outcome), None, "").unwrap_err();
            assert!(!error.is_retryable(), "{error:?}");
            assert!(
                error.message().starts_with("job `build`") && error.message().contains(expected),
                "{error:?}"
            );
        }
    }
}
