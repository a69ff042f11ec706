//! The agent's run of a job as a span of the control plane's trace: the job's process is told
//! where it sits (`TRACEPARENT`), and the span goes back with the result for the hub to export.
//! The agent exports nothing itself: a worker may have no route to a collector, and the agent
//! stays free of an OpenTelemetry stack.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::SecureRandom as _;

use crate::pki::hex;
use crate::protocol::v1;

/// What a malformed context from the hub turns into: nothing, with a debug line; the job runs.
fn ignored<T>(traceparent: &str, why: &str) -> Option<T> {
    tracing::debug!(traceparent, why, "trace context of a job ignored");
    None
}

/// Parses a lowercase hex field of exactly `digits` digits.
fn field(text: &str, digits: usize) -> Option<u128> {
    let lowercase_hex = text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (text.len() == digits && lowercase_hex).then(|| u128::from_str_radix(text, 16).ok()).flatten()
}

/// One job's run, traced: the hub's span for the job is its parent.
#[derive(Debug)]
pub(super) struct JobTrace {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    span_id: [u8; 8],
    state: String,
    started: SystemTime,
    /// An unsampled trace is not recorded, by the hub nor here: the job's process is handed the
    /// hub's context as it came, so that what it traces stays out as well.
    sampled: bool,
}

impl JobTrace {
    /// The run of the job `spec` names, if it carries a trace context (protocol 1.2).
    pub(super) fn from_spec(spec: &v1::JobSpec) -> Option<Self> {
        let traceparent = spec.traceparent.as_str();
        if traceparent.is_empty() {
            return None;
        }
        let parts: Vec<&str> = traceparent.split('-').collect();
        let [version, trace, parent, flags, ..] = parts.as_slice() else {
            return ignored(traceparent, "not four fields");
        };
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (field(version, 2), field(trace, 32), field(parent, 16), field(flags, 2))
        else {
            return ignored(traceparent, "a field is not lowercase hex of its length");
        };
        // Version 00 has four fields; a later one may add some after them (W3C versioning).
        if version == 0xff || (version == 0 && parts.len() != 4) || trace == 0 || parent == 0 {
            return ignored(traceparent, "an invalid version or an all-zero id");
        }
        let parent_id = u64::try_from(parent).unwrap_or_default().to_be_bytes();
        let sampled = flags & 1 == 1;
        let mut span_id = if sampled { [0u8; 8] } else { parent_id };
        while span_id == [0; 8] {
            if ring::rand::SystemRandom::new().fill(&mut span_id).is_err() {
                return ignored(traceparent, "no randomness for a span id");
            }
        }
        let printable =
            spec.tracestate.len() <= 512 && spec.tracestate.bytes().all(|b| (0x20..0x7f).contains(&b));
        Some(Self {
            trace_id: trace.to_be_bytes(),
            parent_id,
            span_id,
            state: if printable { spec.tracestate.clone() } else { String::new() },
            started: SystemTime::now(),
            sampled,
        })
    }

    /// `TRACEPARENT` (and `TRACESTATE`) for the job's process: its parent is this run, or the
    /// hub's context itself when the trace is not sampled.
    pub(super) fn env(&self) -> Vec<(String, String)> {
        let flags = if self.sampled { "01" } else { "00" };
        let traceparent = format!("00-{}-{}-{flags}", hex(&self.trace_id), hex(&self.span_id));
        let mut env = vec![("TRACEPARENT".to_owned(), traceparent)];
        if !self.state.is_empty() {
            env.push(("TRACESTATE".to_owned(), self.state.clone()));
        }
        env
    }

    /// This run as a finished span, described by the result it ended with; none when the trace
    /// is not sampled.
    pub(super) fn finish(&self, result: &v1::JobResult, pid: u32) -> Option<v1::Span> {
        use v1::job_result::Outcome;
        if !self.sampled {
            return None;
        }
        let mut attributes = vec![("hodei.job.id", result.job_id.clone())];
        if pid > 0 {
            attributes.push(("process.pid", pid.to_string()));
        }
        let (outcome, error) = match &result.outcome {
            Some(Outcome::ExitCode(0)) => ("ok", String::new()),
            Some(Outcome::ExitCode(code)) => {
                attributes.push(("process.exit.code", code.to_string()));
                ("error", format!("exited with code {code}"))
            }
            Some(Outcome::Signal(signal)) => ("error", format!("killed by signal {signal}")),
            Some(Outcome::Cancelled(reason)) => ("cancelled", format!("cancelled: {reason}")),
            Some(Outcome::TimedOut(_)) => ("timed_out", "timed out".to_owned()),
            Some(Outcome::FailedToStart(why) | Outcome::Lost(why)) => ("failed_to_start", why.clone()),
            None => ("unknown", "no outcome".to_owned()),
        };
        if let Some(Outcome::ExitCode(0)) = &result.outcome {
            attributes.push(("process.exit.code", "0".to_owned()));
        }
        attributes.push(("hodei.outcome", outcome.to_owned()));
        Some(v1::Span {
            trace_id: self.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            parent_span_id: self.parent_id.to_vec(),
            name: "job.run".to_owned(),
            start_unix_nanos: unix_nanos(self.started),
            end_unix_nanos: unix_nanos(SystemTime::now()),
            attributes: attributes.into_iter().map(|(key, value)| (key.to_owned(), value)).collect(),
            error,
        })
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(traceparent: &str, tracestate: &str) -> v1::JobSpec {
        v1::JobSpec {
            job_id: "s/0#1".into(),
            traceparent: traceparent.into(),
            tracestate: tracestate.into(),
            ..Default::default()
        }
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_process_is_told_the_run_not_the_hubs_span() {
        let run = JobTrace::from_spec(&spec(PARENT, "congo=t61")).unwrap();
        let env = run.env();
        let traceparent = &env[0].1;
        assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{traceparent}");
        assert!(traceparent.ends_with("-01"));
        assert_eq!(&traceparent[36..52], hex(&run.span_id));
        assert_ne!(&traceparent[36..52], "00f067aa0ba902b7");
        assert_eq!(env[1], ("TRACESTATE".to_owned(), "congo=t61".to_owned()));

        let result = v1::JobResult {
            job_id: "s/0#1".into(),
            outcome: Some(v1::job_result::Outcome::ExitCode(2)),
            ..Default::default()
        };
        let span = run.finish(&result, 42).unwrap();
        assert_eq!(span.parent_span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(span.span_id, run.span_id);
        assert_eq!(span.trace_id, run.trace_id);
        assert_eq!(span.attributes["process.exit.code"], "2");
        assert_eq!(span.attributes["hodei.outcome"], "error");
        assert_eq!(span.error, "exited with code 2");
        assert!(span.end_unix_nanos >= span.start_unix_nanos && span.start_unix_nanos > 0);
    }

    #[test]
    fn an_unsampled_context_reaches_the_process_as_it_came_and_makes_no_span() {
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let run = JobTrace::from_spec(&spec(unsampled, "")).unwrap();
        assert_eq!(run.env(), [("TRACEPARENT".to_owned(), unsampled.to_owned())]);
        let result = v1::JobResult { job_id: "s/0#1".into(), ..Default::default() };
        assert_eq!(run.finish(&result, 42), None);
    }

    #[test]
    fn no_or_bad_context_means_no_span() {
        for traceparent in [
            "",
            "nonsense",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(JobTrace::from_spec(&spec(traceparent, "")).is_none(), "{traceparent}");
        }
        let unprintable = JobTrace::from_spec(&spec(PARENT, "a=\u{7}")).unwrap();
        assert_eq!(unprintable.env().len(), 1, "a state that cannot be a variable is dropped");
    }
}
