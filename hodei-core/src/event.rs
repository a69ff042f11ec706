//! The event model: what the journal of a saga holds.
//!
//! A saga's journal is a dense sequence of [`RecordedEvent`]s numbered from 0. The engine is
//! the only writer, it appends before it acts on a transition, and replay reads the journal
//! back in order. [`SagaRecord`] is the saga's summary row: its status, kept beside the journal
//! so that listing and recovery never read whole histories.
//!
//! **Compatibility rule:** variants of [`Event`] and [`SagaStatus`] are only ever appended at
//! the end. Records are bincode, which encodes a variant by its index, so reordering or removing
//! one would make old journals decode as different events. `tests::encoding_is_pinned` guards
//! this. The user payloads inside events (inputs, outputs, signal payloads) are not bincode of
//! the user's type: each starts with a codec byte (see `codec.rs`), JSON for everything written
//! now; records of journals written before that carry raw bincode payloads and are tagged as
//! such when read ([`Event::tag_legacy_payloads`]). A new variant with a payload field needs no
//! entry there: no such old record can exist.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The id of one saga run. It is also the run's idempotency key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SagaId(Arc<str>);

impl SagaId {
    /// The longest id accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validates an id: 1 to 256 bytes, no control characters.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > Self::MAX_LEN {
            Some("it is longer than 256 bytes")
        } else if id.chars().any(char::is_control) {
            Some("it contains a control character")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidSagaId { id, reason }),
            None => Ok(Self(id.into())),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SagaId {
    type Error = Error;
    fn try_from(id: String) -> Result<Self> {
        Self::new(id)
    }
}

impl From<SagaId> for String {
    fn from(id: SagaId) -> String {
        id.0.to_string()
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Wall-clock time in milliseconds since the Unix epoch, as journaled.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// This time as RFC 3339 in UTC with milliseconds: `2026-12-07T09:30:00.125Z`. The one
    /// calendar conversion of the workspace (Howard Hinnant's civil-from-days), for messages
    /// and for the operator API.
    pub fn to_rfc3339(self) -> String {
        let (days, ms) = ((self.0 / 86_400_000) as i64, self.0 % 86_400_000);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let (h, m, s, milli) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::of(SystemTime::now())
    }

    /// The millisecond `time` falls in.
    pub fn of(time: SystemTime) -> Self {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    /// This time as a [`SystemTime`].
    pub fn as_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }

    /// This time plus a duration, saturating.
    pub fn after(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d.as_millis() as u64))
    }

    /// The first millisecond at or after `time`: a wait until it never ends early.
    pub fn at_or_after(time: SystemTime) -> Self {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let millis = since.as_millis() + u128::from(!since.subsec_nanos().is_multiple_of(1_000_000));
        Self(u64::try_from(millis).unwrap_or(u64::MAX))
    }

    /// How long from now until this time; zero if it has passed.
    pub fn remaining(self) -> Duration {
        Duration::from_millis(self.0.saturating_sub(Self::now().0))
    }
}

/// One entry of a saga's journal.
///
/// Every durable operation of a saga (a step, a timer, a signal wait, a group of branches) has
/// an **operation key**: its place in the code. Each scope numbers its operations in the order
/// it calls them, from 0; the top-level scope's keys are `0`, `1`, ...; branch `b` of the group
/// with key `k` is the scope `k.b.`, whose operations are `k.b.0`, `k.b.1`, ... Keys do not
/// depend on the order in which concurrent branches happen to run, which is what keeps replay
/// deterministic. The saga id with the key is the operation's idempotency key. Steps also have
/// a number, unique in the saga, that the step and compensation events refer to. Payloads are
/// serde values encoded by the engine: a codec byte, then the value (JSON, or bincode in
/// journals written before JSON payloads); [`payload_to_json`](crate::payload_to_json) reads
/// them without the type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// The run was created.
    SagaStarted {
        /// Definition name.
        definition: String,
        /// Definition version.
        version: u32,
        /// The encoded input.
        input: Vec<u8>,
    },
    /// The first attempt of a step began. Written before its body runs.
    StepStarted {
        /// Step number.
        step: u32,
        /// Step name.
        name: String,
        /// The encoded step input.
        input: Vec<u8>,
        /// Whether the step has a compensation: starting it pushes it on the compensation
        /// stack, so that a side effect whose completion was never recorded is undone too.
        compensable: bool,
    },
    /// A later attempt of a step began.
    StepRetried {
        /// Step number.
        step: u32,
        /// The attempt number, from 2.
        attempt: u32,
    },
    /// An attempt failed with a retryable error; the next one is due at `retry_at`.
    StepAttemptFailed {
        /// Step number.
        step: u32,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
        /// When the next attempt is due.
        retry_at: Timestamp,
    },
    /// The step succeeded. This is the durable point: it is never run again.
    StepCompleted {
        /// Step number.
        step: u32,
        /// The encoded output.
        output: Vec<u8>,
    },
    /// The step failed for good: a terminal error, or its attempts ran out.
    StepFailed {
        /// Step number.
        step: u32,
        /// Why.
        error: String,
        /// Whether the last error was retryable (and the attempts ran out).
        retryable: bool,
    },
    /// The saga body returned an error; compensation follows.
    BodyFailed {
        /// The error the body returned.
        cause: String,
    },
    /// Someone asked for the saga to be cancelled; compensation follows.
    CancelRequested {
        /// The reason given.
        reason: String,
    },
    /// An attempt of a step's compensation began.
    CompensationStarted {
        /// The step being compensated.
        step: u32,
        /// The attempt number, from 1.
        attempt: u32,
    },
    /// A compensation attempt failed with a retryable error.
    CompensationAttemptFailed {
        /// The step being compensated.
        step: u32,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        error: String,
        /// When the next attempt is due.
        retry_at: Timestamp,
    },
    /// The step's compensation succeeded.
    CompensationCompleted {
        /// The compensated step.
        step: u32,
    },
    /// The step's compensation failed for good.
    CompensationFailed {
        /// The step whose compensation failed.
        step: u32,
        /// Why.
        error: String,
    },
    /// Final: the body returned its output.
    SagaCompleted {
        /// The encoded output.
        output: Vec<u8>,
    },
    /// Final: the saga failed with nothing to compensate.
    SagaFailed {
        /// Why.
        cause: String,
    },
    /// Final: the saga failed and every compensation succeeded.
    SagaCompensated {
        /// Why it was compensated.
        cause: String,
    },
    /// Final: a compensation failed for good; an operator must finish the job.
    SagaCompensationFailed {
        /// The step whose compensation failed.
        step: u32,
        /// Its error.
        error: String,
        /// The steps whose compensation never ran (the failed one first).
        undone: Vec<u32>,
    },
    /// A step began whose key is not simply its number: one inside a branch, or one that
    /// follows other operations (a timer, a signal wait, a group of branches) in its scope.
    /// `StepStarted` remains the event of a top-level step whose key is its number.
    StepStartedAt {
        /// Step number, unique in the saga: what the other step events name.
        step: u32,
        /// The operation key: the step's place in the saga's code (see [`Event`] docs).
        key: String,
        /// Step name.
        name: String,
        /// The encoded step input.
        input: Vec<u8>,
        /// Whether the step has a compensation.
        compensable: bool,
    },
    /// A durable timer was set. After a crash it fires at `due`, not at restart plus its length.
    TimerStarted {
        /// The operation key.
        key: String,
        /// When it fires.
        due: Timestamp,
    },
    /// The timer fired and the saga moved on.
    TimerFired {
        /// The operation key.
        key: String,
    },
    /// A signal arrived. It waits in the saga's inbox until a wait with its name takes it, so a
    /// signal sent before the saga waits for it is not lost.
    SignalReceived {
        /// The signal's name.
        name: String,
        /// The encoded payload.
        payload: Vec<u8>,
    },
    /// The saga began waiting for a signal.
    SignalWaitStarted {
        /// The operation key.
        key: String,
        /// The signal's name.
        name: String,
        /// When the wait gives up, if it has a timeout.
        timeout_at: Option<Timestamp>,
    },
    /// The wait took the signal journaled at sequence number `signal`.
    SignalConsumed {
        /// The operation key.
        key: String,
        /// The sequence number of the `SignalReceived` it took.
        signal: u64,
    },
    /// The wait reached its timeout without a signal.
    SignalWaitTimedOut {
        /// The operation key.
        key: String,
    },
    /// A group of branches began to run concurrently.
    BranchesStarted {
        /// The operation key; branch `i`'s operations have keys under `key.i.`.
        key: String,
        /// The group's name.
        name: String,
        /// How many branches.
        count: u32,
        /// How the group joins: [`JoinMode`].
        mode: JoinMode,
    },
    /// A branch finished. These are journaled in the order the branches finished, which is
    /// what replay goes by: it decides the group exactly as the first run did.
    BranchFinished {
        /// The group's operation key.
        key: String,
        /// The branch's index.
        branch: u32,
        /// Its error, with whether it was retryable, if it failed.
        error: Option<(String, bool)>,
    },
    /// This run was forked from another: it reuses that run's recorded steps before `step`.
    ForkedFrom {
        /// The original run.
        source: SagaId,
        /// The first step this run ran live.
        step: u32,
    },
    /// A fork of this run was started. May follow the final event: it links, it changes
    /// nothing.
    Forked {
        /// The new run.
        fork: SagaId,
        /// The step the fork runs live from.
        step: u32,
    },
    /// A running step was stopped because its saga was cancelled, or its branch was cancelled
    /// by its group's decision (a failure under `all`, a winner under `first`): its end. It is
    /// never run again; its compensation runs with `output: None`.
    StepCancelled {
        /// Step number.
        step: u32,
        /// Why it was stopped.
        reason: String,
    },
    /// Someone asked for the saga to be cancelled, and the journal names who:
    /// [`CancelRequested`](Event::CancelRequested) with its author. Replay treats both alike;
    /// it also ends a pause, so that the cancelled saga compensates at once.
    CancelRequestedBy {
        /// The reason given.
        reason: String,
        /// Who asked (an operator, an API token's name).
        by: String,
    },
    /// A signal arrived from a named sender: [`SignalReceived`](Event::SignalReceived) with
    /// its author. Replay treats both alike.
    SignalReceivedBy {
        /// The signal's name.
        name: String,
        /// The encoded payload.
        payload: Vec<u8>,
        /// Who sent it.
        by: String,
    },
    /// Someone paused the saga: it finishes the operation (or compensation) it is in, then
    /// starts nothing more until it is resumed or cancelled.
    Paused {
        /// Who paused it.
        by: String,
    },
    /// Someone resumed the paused saga.
    Resumed {
        /// Who resumed it.
        by: String,
    },
    /// Someone cut short the backoff of every step or compensation waiting to retry: their
    /// next attempt is due at this event's time, not at the `retry_at` their failure named.
    RetryNowRequested {
        /// Who asked.
        by: String,
    },
    /// Someone asked a saga whose compensation failed for good to try again: it follows the
    /// saga's `SagaCompensationFailed`, reopens it, and the failed compensation runs again
    /// (a new round of attempts, numbered from 1), then those left undone.
    CompensationRetryRequested {
        /// Who asked.
        by: String,
    },
    /// The wait that starts at `key` (its `SignalWaitStarted` follows in the same write)
    /// expects a payload matching this JSON Schema, traced from the type the saga reads it as,
    /// so that an operator's tool can offer a form for it. Waits whose type could not be
    /// traced have none.
    SignalWaitExpects {
        /// The operation key of the wait.
        key: String,
        /// The JSON Schema (draft 2020-12) of the payload, as JSON text.
        schema: String,
    },
    /// Where the saga's spans sit in a distributed trace: the W3C context of its `saga.start`
    /// span, written with the saga's first step (staged: it costs no flush of its own). Every
    /// run of the driver, the first and each one after a restart, is a child of it, so a
    /// resumed saga continues its trace. Written only while spans are exported; a journal
    /// without it (older, or exported since) starts a fresh trace on each resumption.
    TraceStarted {
        /// The W3C `traceparent` value.
        traceparent: String,
        /// The W3C `tracestate` value, empty for none.
        tracestate: String,
    },
    /// The run reached [`SagaContext::patched`](crate::SagaContext::patched) for the patch
    /// `patch` live, at the place in the code where its next operation has the key `key`: it
    /// took the patch's new path there. Replay answers the same call `true` from it; a run
    /// whose journal records an operation at `key` without it took the old path.
    Patched {
        /// The operation key of the operation that follows the call.
        key: String,
        /// The patch's id.
        patch: String,
    },
    // Later events are appended here (see the compatibility rule at the top of this module).
}

/// How a group of branches joins (see [`Event::BranchesStarted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JoinMode {
    /// Every branch must succeed; the first failure cancels the others.
    All,
    /// The first branch to finish decides; the others are cancelled.
    First,
}

impl Event {
    /// Whether this event only links to another run, after which the saga's state is unchanged
    /// (it may follow the final event).
    pub fn is_link(&self) -> bool {
        matches!(self, Event::Forked { .. })
    }

    /// The step number and name, if this event starts a step.
    pub fn step_start(&self) -> Option<(u32, &str)> {
        match self {
            Event::StepStarted { step, name, .. } | Event::StepStartedAt { step, name, .. } => {
                Some((*step, name))
            }
            _ => None,
        }
    }

    /// Marks the payload fields of an event read from a record of the format of before payload
    /// codecs, whose payloads are raw bincode, as legacy bincode: every payload above the store
    /// then starts with its codec byte.
    #[cfg_attr(not(any(feature = "sled", test)), allow(dead_code))]
    pub(crate) fn tag_legacy_payloads(&mut self) {
        use crate::codec::tag_legacy;
        match self {
            Event::SagaStarted { input, .. }
            | Event::StepStarted { input, .. }
            | Event::StepStartedAt { input, .. } => tag_legacy(input),
            Event::StepCompleted { output, .. } | Event::SagaCompleted { output } => tag_legacy(output),
            Event::SignalReceived { payload, .. } => tag_legacy(payload),
            // No other variant of the old format has a payload, and variants added since never
            // occur in old records.
            _ => {}
        }
    }

    /// The trace context this event journals, if it is [`Event::TraceStarted`] and holds a
    /// valid one. A malformed one (a damaged or foreign journal) is ignored: the run starts a
    /// fresh trace.
    pub fn trace_context(&self) -> Option<crate::trace::TraceContext> {
        match self {
            Event::TraceStarted { traceparent, tracestate } => {
                crate::trace::TraceContext::parse_or_ignore(traceparent, tracestate, "journal")
            }
            _ => None,
        }
    }

    /// Whether this event ends the saga.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::SagaCompleted { .. }
                | Event::SagaFailed { .. }
                | Event::SagaCompensated { .. }
                | Event::SagaCompensationFailed { .. }
        )
    }
}

/// An event with its place in the journal and the time it was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Position in the saga's journal, from 0, without gaps.
    pub seq: u64,
    /// When the engine wrote it.
    pub at: Timestamp,
    /// What happened.
    pub event: Event,
}

/// Where a saga stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SagaStatus {
    /// Running its body.
    Running,
    /// Running its compensations.
    Compensating,
    /// Stopped because its code no longer matches its journal. It never runs other code; it
    /// is retried on the next start, once the code is fixed.
    Parked {
        /// What did not match.
        reason: String,
    },
    /// Its definition version is not registered in this process. It waits, untouched.
    WaitingForVersion,
    /// Final: completed.
    Completed,
    /// Final: failed, then fully compensated.
    Compensated,
    /// Final: a compensation failed; an operator must act.
    CompensationFailed,
    /// Final: failed with nothing to compensate.
    Failed,
    /// Paused by an operator: it finishes the operation it is in, then waits to be resumed
    /// (see [`Engine::pause`](crate::Engine::pause)).
    Paused,
}

impl SagaStatus {
    /// Whether the saga has finished.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            SagaStatus::Completed
                | SagaStatus::Compensated
                | SagaStatus::CompensationFailed
                | SagaStatus::Failed
        )
    }

    /// A short name, for listings and filters.
    pub fn kind(&self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Parked { .. } => "parked",
            SagaStatus::WaitingForVersion => "waiting-for-version",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::CompensationFailed => "compensation-failed",
            SagaStatus::Failed => "failed",
            SagaStatus::Paused => "paused",
        }
    }
}

/// The summary row of a saga.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaRecord {
    /// The saga's id.
    pub id: SagaId,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// Where it stands.
    pub status: SagaStatus,
    /// When it was started.
    pub created_at: Timestamp,
    /// When its status last changed.
    pub updated_at: Timestamp,
}

impl SagaRecord {
    pub(crate) fn new(id: SagaId, definition: String, version: u32, at: Timestamp) -> Self {
        Self { id, definition, version, status: SagaStatus::Running, created_at: at, updated_at: at }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_record, encode_record};

    #[test]
    fn ids_are_validated() {
        assert!(SagaId::new("build-42").is_ok());
        assert!(matches!(SagaId::new(""), Err(Error::InvalidSagaId { .. })));
        assert!(matches!(SagaId::new("a\u{0}b"), Err(Error::InvalidSagaId { .. })));
        assert!(matches!(SagaId::new("x".repeat(257)), Err(Error::InvalidSagaId { .. })));
        let decoded: std::result::Result<SagaId, _> = decode_record::<SagaId>(&encode_record("").unwrap());
        assert!(decoded.is_err(), "an invalid id in a record must not decode");
    }

    /// Pins the encoding of every variant, so a reordered enum fails here and not in a user's
    /// data directory. Regenerate only when adding variants at the end.
    #[test]
    fn encoding_is_pinned() {
        let events = [
            Event::SagaStarted { definition: "d".into(), version: 1, input: vec![7] },
            Event::StepStarted { step: 0, name: "s".into(), input: vec![], compensable: true },
            Event::StepRetried { step: 0, attempt: 2 },
            Event::StepAttemptFailed { step: 0, attempt: 1, error: "e".into(), retry_at: Timestamp(5) },
            Event::StepCompleted { step: 1, output: vec![1, 2] },
            Event::StepFailed { step: 1, error: "e".into(), retryable: false },
            Event::BodyFailed { cause: "c".into() },
            Event::CancelRequested { reason: "r".into() },
            Event::CompensationStarted { step: 1, attempt: 1 },
            Event::CompensationAttemptFailed {
                step: 1,
                attempt: 1,
                error: "e".into(),
                retry_at: Timestamp(5),
            },
            Event::CompensationCompleted { step: 1 },
            Event::CompensationFailed { step: 1, error: "e".into() },
            Event::SagaCompleted { output: vec![3] },
            Event::SagaFailed { cause: "c".into() },
            Event::SagaCompensated { cause: "c".into() },
            Event::SagaCompensationFailed { step: 1, error: "e".into(), undone: vec![1, 0] },
            Event::StepStartedAt {
                step: 2,
                key: "1.0.0".into(),
                name: "s".into(),
                input: vec![],
                compensable: false,
            },
            Event::TimerStarted { key: "1".into(), due: Timestamp(9) },
            Event::TimerFired { key: "1".into() },
            Event::SignalReceived { name: "approve".into(), payload: vec![1] },
            Event::SignalWaitStarted { key: "2".into(), name: "approve".into(), timeout_at: None },
            Event::SignalConsumed { key: "2".into(), signal: 4 },
            Event::SignalWaitTimedOut { key: "2".into() },
            Event::BranchesStarted { key: "3".into(), name: "g".into(), count: 2, mode: JoinMode::All },
            Event::BranchFinished { key: "3".into(), branch: 1, error: None },
            Event::ForkedFrom { source: SagaId::new("a").unwrap(), step: 2 },
            Event::Forked { fork: SagaId::new("b").unwrap(), step: 2 },
            Event::StepCancelled { step: 3, reason: "r".into() },
            Event::CancelRequestedBy { reason: "r".into(), by: "ops".into() },
            Event::SignalReceivedBy { name: "approve".into(), payload: vec![1], by: "ops".into() },
            Event::Paused { by: "ops".into() },
            Event::Resumed { by: "ops".into() },
            Event::RetryNowRequested { by: "ops".into() },
            Event::CompensationRetryRequested { by: "ops".into() },
            Event::SignalWaitExpects { key: "2".into(), schema: "{}".into() },
            Event::TraceStarted {
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                tracestate: String::new(),
            },
            Event::Patched { key: "1".into(), patch: "p".into() },
        ];
        for (index, event) in events.iter().enumerate() {
            let bytes = encode_record(event).unwrap();
            // After the 5-byte envelope header, bincode writes the variant index first.
            assert_eq!(bytes[5] as usize, index, "variant {event:?} moved");
            assert_eq!(&decode_record::<Event>(&bytes).unwrap(), event);
        }
        let statuses = [
            SagaStatus::Running,
            SagaStatus::Compensating,
            SagaStatus::Parked { reason: "r".into() },
            SagaStatus::WaitingForVersion,
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::CompensationFailed,
            SagaStatus::Failed,
            SagaStatus::Paused,
        ];
        for (index, status) in statuses.iter().enumerate() {
            assert_eq!(encode_record(status).unwrap()[5] as usize, index, "status {status:?} moved");
        }
    }
}
