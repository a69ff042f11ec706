//! The wire protocol (`proto/hodei/agent/v1/agent.proto`) and its version negotiation.
//!
//! The package name carries the major version: a breaking change is a new package, served
//! beside the old one. Within a major version fields are only added, so two peers agree on the
//! lower of their minor versions.

use std::fmt;

/// The generated messages and services of `hodei.agent.v1`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("hodei.agent.v1");
}

use v1::ProtocolVersion;

/// The protocol this build speaks.
pub const PROTOCOL: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };

/// The per-job bound on unacknowledged output that a peer of protocol 1.0, which does not
/// negotiate it, keeps to.
pub const PROTOCOL_1_0_MAX_HELD_BYTES: u64 = 8 * 1024 * 1024;

/// The bound on unacknowledged output per job that a session uses: the smaller of what each side
/// offers, a side that offers 0 (protocol 1.0) offering [`PROTOCOL_1_0_MAX_HELD_BYTES`].
pub fn negotiate_max_held_bytes(ours: u64, theirs: u64) -> u64 {
    let theirs = if theirs == 0 { PROTOCOL_1_0_MAX_HELD_BYTES } else { theirs };
    ours.min(theirs)
}

/// An agent whose protocol this control plane cannot speak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionMismatch {
    /// The peer sent no version at all: it is not a Hodei agent, or a broken one.
    #[error("the peer sent no protocol version; it is not a Hodei agent of protocol {}.x", PROTOCOL.major)]
    Missing,
    /// Another major version.
    #[error("{}", incompatible(*.ours, *.theirs))]
    Incompatible {
        /// This side's version.
        ours: Version,
        /// The peer's version.
        theirs: Version,
    },
}

fn incompatible(ours: Version, theirs: Version) -> String {
    let upgrade = if theirs.major < ours.major { "upgrade the agent" } else { "upgrade the control plane" };
    format!("the agent speaks protocol {theirs}, this control plane speaks {ours}: {upgrade}")
}

/// A protocol version, printable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Breaking changes.
    pub major: u32,
    /// Additions.
    pub minor: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl From<ProtocolVersion> for Version {
    fn from(v: ProtocolVersion) -> Self {
        Self { major: v.major, minor: v.minor }
    }
}

impl From<Version> for ProtocolVersion {
    fn from(v: Version) -> Self {
        Self { major: v.major, minor: v.minor }
    }
}

/// The version both sides will speak: same major, the lower minor.
pub fn negotiate(
    ours: ProtocolVersion,
    theirs: Option<ProtocolVersion>,
) -> Result<ProtocolVersion, VersionMismatch> {
    let theirs = theirs.ok_or(VersionMismatch::Missing)?;
    if theirs.major != ours.major {
        return Err(VersionMismatch::Incompatible { ours: ours.into(), theirs: theirs.into() });
    }
    Ok(ProtocolVersion { major: ours.major, minor: ours.minor.min(theirs.minor) })
}

impl From<VersionMismatch> for tonic::Status {
    /// `FAILED_PRECONDITION`: retrying the same agent cannot succeed; an upgrade can.
    fn from(e: VersionMismatch) -> Self {
        tonic::Status::failed_precondition(e.to_string())
    }
}

/// Now as Unix milliseconds, as heartbeats carry it; 0 for a clock before 1970 (a heartbeat's
/// time is informational, so a wrong clock must not fail the session).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

/// What a redacted value prints as.
const REDACTED: &str = "<redacted>";

/// Secret values by name, printed with their names only.
struct RedactedMap<'a>(&'a std::collections::HashMap<String, String>);

impl fmt::Debug for RedactedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.0.keys().collect();
        names.sort();
        f.debug_map().entries(names.into_iter().map(|name| (name, REDACTED))).finish()
    }
}

impl fmt::Debug for v1::JobSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSpec")
            .field("job_id", &self.job_id)
            .field("command", &self.command)
            .field("script_len", &self.script.len())
            .field("interpreter", &self.interpreter)
            .field("env", &self.env)
            .field("inherit_env", &self.inherit_env)
            .field("working_dir", &self.working_dir)
            .field("secrets", &RedactedMap(&self.secrets))
            .field("timeout_ms", &self.timeout_ms)
            .field("cancel_grace_ms", &self.cancel_grace_ms)
            .field("resources", &self.resources)
            .field("traceparent", &self.traceparent)
            .field("tracestate", &self.tracestate)
            .finish()
    }
}

impl fmt::Debug for v1::RegisterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("protocol", &self.protocol)
            .field("worker_id", &self.worker_id)
            .field("token", &REDACTED)
            .field("csr_pem", &self.csr_pem)
            .field("agent_version", &self.agent_version)
            .field("labels", &self.labels)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_bytes_bound_is_the_smaller_offer() {
        assert_eq!(negotiate_max_held_bytes(8 << 20, 2 << 20), 2 << 20);
        assert_eq!(negotiate_max_held_bytes(1 << 20, 16 << 20), 1 << 20);
        // A 1.0 peer sends nothing and holds 8 MiB.
        assert_eq!(negotiate_max_held_bytes(16 << 20, 0), PROTOCOL_1_0_MAX_HELD_BYTES);
        assert_eq!(negotiate_max_held_bytes(1 << 20, 0), 1 << 20);
    }

    #[test]
    fn secret_values_print_redacted() {
        let spec = v1::JobSpec {
            job_id: "release-1/2#1".into(),
            script: "echo $TOKEN".into(),
            secrets: [("TOKEN".to_owned(), "tk-4f1c-secret-value".to_owned())].into(),
            ..Default::default()
        };
        let assign = v1::HubMessage {
            kind: Some(v1::hub_message::Kind::Assign(v1::AssignJob { spec: Some(spec.clone()) })),
        };
        for printed in [format!("{spec:?}"), format!("{assign:#?}")] {
            assert!(!printed.contains("tk-4f1c-secret-value"), "{printed}");
            assert!(!printed.contains("echo $TOKEN"), "the script may embed secrets too: {printed}");
            assert!(printed.contains("TOKEN") && printed.contains(REDACTED), "{printed}");
            assert!(printed.contains("release-1/2#1"), "{printed}");
        }
        let register = v1::RegisterRequest {
            worker_id: "w-1".into(),
            token: "hrt_0123.secret-part".into(),
            ..Default::default()
        };
        let printed = format!("{register:?}");
        assert!(!printed.contains("secret-part") && printed.contains("w-1"), "{printed}");
    }

    fn v(major: u32, minor: u32) -> ProtocolVersion {
        ProtocolVersion { major, minor }
    }

    #[test]
    fn the_lower_minor_wins_within_a_major() {
        assert_eq!(negotiate(v(1, 3), Some(v(1, 1))), Ok(v(1, 1)));
        assert_eq!(negotiate(v(1, 1), Some(v(1, 4))), Ok(v(1, 1)));
    }

    #[test]
    fn another_major_is_a_clear_error() {
        let older = negotiate(v(2, 0), Some(v(1, 7))).unwrap_err();
        assert_eq!(
            older.to_string(),
            "the agent speaks protocol 1.7, this control plane speaks 2.0: upgrade the agent"
        );
        let newer = negotiate(v(1, 0), Some(v(3, 0))).unwrap_err();
        assert!(newer.to_string().ends_with("upgrade the control plane"), "{newer}");
        let status = tonic::Status::from(newer);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(negotiate(v(1, 0), None), Err(VersionMismatch::Missing));
    }

    #[test]
    fn the_trace_fields_of_1_2_round_trip_and_are_empty_from_an_older_peer() {
        use prost::Message;
        assert_eq!(PROTOCOL, v(1, 2));
        let spec = v1::JobSpec {
            job_id: "s/0#1".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "congo=t61".into(),
            ..Default::default()
        };
        assert_eq!(v1::JobSpec::decode(spec.encode_to_vec().as_slice()).unwrap(), spec);
        // What a 1.1 hub sends: the same message without the new fields.
        let older = v1::JobSpec { traceparent: String::new(), tracestate: String::new(), ..spec.clone() };
        let decoded = v1::JobSpec::decode(older.encode_to_vec().as_slice()).unwrap();
        assert!(decoded.traceparent.is_empty() && decoded.tracestate.is_empty());
        let span = v1::Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            parent_span_id: vec![3; 8],
            name: "job.run".into(),
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: [("hodei.outcome".to_owned(), "ok".to_owned())].into(),
            error: String::new(),
        };
        let result = v1::JobResult { job_id: "s/0#1".into(), spans: vec![span], ..Default::default() };
        assert_eq!(v1::JobResult::decode(result.encode_to_vec().as_slice()).unwrap(), result);
        // A 1.1 hub reads a 1.2 result as it always did: an unknown field is skipped.
        let as_before = v1::JobResult { spans: Vec::new(), ..result.clone() };
        assert_eq!(
            v1::ResultAck::decode(result.encode_to_vec().as_slice()).unwrap().job_id,
            as_before.job_id,
            "field 1 still decodes with the unknown ones skipped"
        );
    }

    #[test]
    fn messages_round_trip_through_protobuf() {
        use prost::Message;
        let batch = v1::LogBatch {
            job_id: "saga-7/3".into(),
            stream: v1::OutputStream::Stderr as i32,
            offset: 65_536,
            data: vec![0xFF, 0x00, b'\n'].into(),
        };
        let message = v1::AgentMessage { kind: Some(v1::agent_message::Kind::Log(batch.clone())) };
        let decoded = v1::AgentMessage::decode(message.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.kind, Some(v1::agent_message::Kind::Log(batch)));
    }
}
