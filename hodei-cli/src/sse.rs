//! Server-sent events, parsed as the WHATWG `EventSource` does: from bytes as they arrive,
//! in chunks cut anywhere (in a line, in a UTF-8 character, between `\r` and `\n`).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The last id the stream set, at this event: what a reconnect sends as `Last-Event-ID`.
    pub id: Option<String>,
    /// Its type; `message` when the stream named none.
    pub event: String,
    /// Its data lines, joined by `\n`.
    pub data: String,
}

/// Turns a byte stream into events. An event is only dispatched at the blank line that ends
/// it, so one cut off by a dropped connection is never half-delivered: the reconnect's
/// `Last-Event-ID` then names the last event that was delivered whole.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` starting this one belongs to that line end.
    after_cr: bool,
    started: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
    retry_ms: Option<u64>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The reconnection delay the server asked for, if it did.
    #[allow(dead_code)] // kept for parity with EventSource; the CLI uses its own backoff
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Feeds the next bytes; returns the events they complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = bytes {
                bytes = rest;
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&bytes[..end]);
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.process_line(&line) {
                events.push(event);
            }
            let crlf = bytes[end] == b'\r';
            bytes = &bytes[end + 1..];
            if crlf {
                match bytes.first() {
                    Some(b'\n') => bytes = &bytes[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
        self.line.extend_from_slice(bytes);
        events
    }

    fn process_line(&mut self, raw: &[u8]) -> Option<SseEvent> {
        let mut raw = raw;
        if !self.started {
            self.started = true;
            raw = raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw);
        }
        // Decoded per whole line, so a character cut between two chunks is decoded whole.
        let line = String::from_utf8_lossy(raw);
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            id: self.last_id.clone(),
            event: if event.is_empty() { "message".to_owned() } else { event },
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: Option<&str>, kind: &str, data: &str) -> SseEvent {
        SseEvent { id: id.map(str::to_owned), event: kind.to_owned(), data: data.to_owned() }
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        chunks.iter().flat_map(|chunk| parser.feed(chunk)).collect()
    }

    #[test]
    fn events_with_ids_types_and_multi_line_data() {
        let stream =
            b"id: 3\nevent: step_started\ndata: {\"a\":1}\n\n: keep-alive\n\ndata: one\ndata: two\n\n";
        assert_eq!(
            parse_all(&[stream]),
            vec![event(Some("3"), "step_started", "{\"a\":1}"), event(Some("3"), "message", "one\ntwo")]
        );
    }

    #[test]
    fn every_split_of_the_stream_gives_the_same_events() {
        let stream = "\u{feff}id: 7\r\nevent: log\r\ndata: {\"text\":\"héllo ✓ 🦀\"}\r\n\r\n:ping\rid: 9\revent: end\rdata:\r\r"
            .as_bytes();
        let expected =
            vec![event(Some("7"), "log", "{\"text\":\"héllo ✓ 🦀\"}"), event(Some("9"), "end", "")];
        for split in 0..=stream.len() {
            assert_eq!(parse_all(&[&stream[..split], &stream[split..]]), expected, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_all(&bytes), expected, "one byte at a time");
    }

    #[test]
    fn an_event_cut_off_by_the_end_of_the_stream_is_not_dispatched() {
        let mut parser = SseParser::new();
        assert_eq!(
            parser.feed(b"id: 1\ndata: whole\n\nid: 2\ndata: cut"),
            vec![event(Some("1"), "message", "whole")]
        );
        // The next connection starts afresh; the half event must not leak into it.
        let mut parser = SseParser::new();
        assert_eq!(parser.feed(b"id: 2\ndata: again\n\n"), vec![event(Some("2"), "message", "again")]);
    }

    #[test]
    fn fields_without_space_or_value_and_unknown_fields() {
        let events = parse_all(&[b"data:x\nfoo: bar\nevent\ndata\n\nevent: e\n\n"]);
        // `event` with no value resets the type; an event with no data is not dispatched.
        assert_eq!(events, vec![event(None, "message", "x\n")]);
    }

    #[test]
    fn ids_with_nul_are_ignored_and_retry_is_read() {
        let mut parser = SseParser::new();
        let events = parser.feed(b"id: 4\nid: a\0b\nretry: 1500\nretry: soon\ndata: d\n\n");
        assert_eq!(events, vec![event(Some("4"), "message", "d")]);
        assert_eq!(parser.retry_ms(), Some(1500));
    }
}
