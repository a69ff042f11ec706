//! A W3C trace context (`traceparent` and `tracestate`), as journaled and as sent with a job.

use std::fmt;

/// The longest `tracestate` kept: the W3C limit is 32 list members, and 512 characters is what
/// a propagator must be able to pass on; anything longer is dropped rather than journaled.
const MAX_TRACESTATE: usize = 512;

/// Why a `traceparent` or `tracestate` was not taken. Context from the wire or from a journal
/// is never trusted: a malformed one is ignored (the saga or job starts a fresh trace).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceContextError {
    /// The `traceparent` is not `version-traceid-parentid-flags` in lowercase hex.
    #[error("malformed traceparent `{value}`: {reason}")]
    Malformed {
        /// The value, cut to 64 characters.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The `tracestate` is too long or holds characters a header cannot.
    #[error("tracestate dropped: {reason}")]
    State {
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The position of one span in one trace: what W3C Trace Context propagates.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
    state: String,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("tracestate", &self.state)
            .finish()
    }
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut bytes = [0; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

impl TraceContext {
    /// A context from its parts; `None` if either id is all zeros, which W3C reserves for
    /// "no trace".
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> Option<Self> {
        (trace_id != [0; 16] && span_id != [0; 8]).then(|| Self {
            trace_id,
            span_id,
            flags: u8::from(sampled),
            state: String::new(),
        })
    }

    /// Parses a `traceparent` header value and its `tracestate` (empty for none). A
    /// `tracestate` that cannot be passed on is an error too: both come from the same peer.
    pub fn parse(traceparent: &str, tracestate: &str) -> Result<Self, TraceContextError> {
        let malformed =
            |reason| TraceContextError::Malformed { value: traceparent.chars().take(64).collect(), reason };
        let mut parts = traceparent.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("it does not have four fields"));
        };
        let [version] =
            hex_bytes::<1>(version).ok_or_else(|| malformed("the version is not two hex digits"))?;
        // Version 00 has exactly four fields; a later version may add fields after them, and a
        // reader of 00 takes the four it knows (W3C Trace Context, "versioning").
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return Err(malformed("the version is invalid or has extra fields"));
        }
        let trace_id =
            hex_bytes::<16>(trace).ok_or_else(|| malformed("the trace id is not 32 hex digits"))?;
        let span_id = hex_bytes::<8>(span).ok_or_else(|| malformed("the parent id is not 16 hex digits"))?;
        let [flags] = hex_bytes::<1>(flags).ok_or_else(|| malformed("the flags are not two hex digits"))?;
        let mut context =
            Self::new(trace_id, span_id, false).ok_or_else(|| malformed("an id is all zeros"))?;
        context.flags = flags;
        context.state = check_state(tracestate)?;
        Ok(context)
    }

    /// [`parse`](Self::parse), or `None` with a debug log: what a peer or a journal sends is
    /// never a reason to fail.
    pub fn parse_or_ignore(traceparent: &str, tracestate: &str, from: &str) -> Option<Self> {
        if traceparent.is_empty() {
            return None;
        }
        Self::parse(traceparent, tracestate)
            .map_err(|e| tracing::debug!(error = %e, from, "trace context ignored"))
            .ok()
    }

    /// This context with `tracestate` (empty for none).
    pub fn with_state(mut self, tracestate: &str) -> Result<Self, TraceContextError> {
        self.state = check_state(tracestate)?;
        Ok(self)
    }

    /// The `traceparent` value: `00-<trace id>-<span id>-<flags>`.
    pub fn traceparent(&self) -> String {
        // Every saga that starts while spans are exported journals one: no formatter here.
        let mut header = String::with_capacity(55);
        header.push_str("00-");
        header.push_str(&hex::encode(self.trace_id));
        header.push('-');
        header.push_str(&hex::encode(self.span_id));
        header.push('-');
        header.push_str(&hex::encode([self.flags]));
        header
    }

    /// The `tracestate` value, empty for none.
    pub fn tracestate(&self) -> &str {
        &self.state
    }

    /// The trace's id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The trace id as 32 lowercase hex digits, as trace viewers show it.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The id of the span this context names (the parent of what continues from it).
    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// Whether the trace is sampled (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

fn check_state(tracestate: &str) -> Result<String, TraceContextError> {
    if tracestate.len() > MAX_TRACESTATE {
        return Err(TraceContextError::State { reason: "it is longer than 512 characters" });
    }
    if !tracestate.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(TraceContextError::State { reason: "it holds a character outside printable ASCII" });
    }
    Ok(tracestate.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips() {
        let context = TraceContext::parse(PARENT, "congo=t61rcWkgMzE").unwrap();
        assert_eq!(context.traceparent(), PARENT);
        assert_eq!(context.tracestate(), "congo=t61rcWkgMzE");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(context.sampled());
        let unsampled = TraceContext::parse(&PARENT.replace("-01", "-00"), "").unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn a_later_version_is_read_for_the_fields_it_shares() {
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert_eq!(TraceContext::parse(future, "").unwrap().traceparent(), PARENT);
    }

    #[test]
    fn malformed_values_are_errors_never_panics() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47é6-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                matches!(TraceContext::parse(bad, ""), Err(TraceContextError::Malformed { .. })),
                "{bad:?} was taken"
            );
            assert_eq!(TraceContext::parse_or_ignore(bad, "", "test"), None);
        }
        assert!(matches!(TraceContext::parse(PARENT, "a=\n"), Err(TraceContextError::State { .. })));
        assert!(matches!(
            TraceContext::parse(PARENT, &"a".repeat(513)),
            Err(TraceContextError::State { .. })
        ));
    }

    #[test]
    fn zero_ids_make_no_context() {
        assert_eq!(TraceContext::new([0; 16], [1; 8], true), None);
        assert_eq!(TraceContext::new([1; 16], [0; 8], true), None);
        let context = TraceContext::new([1; 16], [2; 8], true).unwrap();
        assert_eq!(context.traceparent(), format!("00-{}-{}-01", "01".repeat(16), "02".repeat(8)));
    }
}
