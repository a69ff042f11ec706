//! The hub's decoding and handling of every message an agent sends: a session's stream (its
//! `Hello` checked against the worker's certificate, then heartbeats, accepted jobs, log
//! batches, metrics, results and rotation requests, stored in a real log store) and a
//! registration. Whatever the bytes, the hub answers or ends the session with a status, and
//! never panics; it opens a session with `Welcome`, acknowledges no output past what the agent
//! sent, and no result the agent did not send.
//!
//! Input: a mode byte, then
//! - mode 0: the session's messages, each as a two-byte little-endian length and its protobuf
//!   encoding, framed here as gRPC frames;
//! - mode 1: the session's request body as it comes, gRPC frames and all;
//! - mode 2: a `RegisterRequest`'s protobuf encoding; a token `TOKEN` is replaced by one the
//!   hub issued for the request's worker id, so that registration gets past the token.
//!
//! The session's worker is `w-fuzz`, with a certificate from the hub's own CA.

#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use hodei_agent::pki::AgentKey;
use hodei_agent::protocol::v1::{AgentMessage, HubMessage, RegisterRequest, agent_message, hub_message};
use hodei_fuzz::{Cursor, ScratchDir};
use hodei_server::__fuzz::{max_session_message, register, session};
use hodei_server::hub::{Hub, HubConfig};
use hodei_server::logstore::LogStore;
use hodei_server::pki::{HubPki, PkiConfig};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tonic::codec::{Codec as _, Streaming};
use tonic_prost::ProstCodec;

const WORKER: &str = "w-fuzz";
const TOKEN_PLACEHOLDER: &str = "TOKEN";

struct Fixture {
    runtime: tokio::runtime::Runtime,
    pki: Arc<HubPki>,
    /// `w-fuzz`'s certificate, DER, as the session listener's handshake would present it.
    peer: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // One CA for every run of the target, rather than a directory left behind per process.
        let dir = std::env::temp_dir().join("hodei-fuzz-hub-pki");
        let pki = Arc::new(HubPki::open(&dir, PkiConfig::default()).expect("the hub's PKI"));
        let key = AgentKey::generate().expect("an agent key");
        let token = pki.issue_token(WORKER).expect("a registration token");
        let csr = key.csr_pem(WORKER).expect("a CSR");
        let certificate = pki.register(token.as_str(), WORKER, &csr).expect("a worker certificate");
        Fixture { runtime: hodei_fuzz::runtime(), pki, peer: certificate.cert_der.to_vec() }
    })
}

/// The messages an uncompressed gRPC body carries, as far as they decode.
fn sent_messages(mut body: &[u8]) -> Vec<AgentMessage> {
    let mut messages = Vec::new();
    while let [0, a, b, c, d, rest @ ..] = body {
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        let Some(message) = rest.get(..len) else { break };
        match AgentMessage::decode(message) {
            Ok(message) => messages.push(message),
            Err(_) => break,
        }
        body = &rest[len..];
    }
    messages
}

/// gRPC's length-prefixed message framing, uncompressed.
fn frames(messages: &mut Cursor<'_>) -> Bytes {
    let mut body = BytesMut::new();
    while !messages.is_empty() {
        let message = messages.long();
        body.put_u8(0);
        body.put_u32(u32::try_from(message.len()).expect("a short message"));
        body.put_slice(message);
    }
    body.freeze()
}

/// Checks what the hub sent on a session against what the agent sent on it.
fn check_answers(sent: &[AgentMessage], answers: &[HubMessage]) {
    let mut sent_up_to: HashMap<(&str, i32), u64> = HashMap::new();
    let mut results: HashSet<&str> = HashSet::new();
    for message in sent {
        match &message.kind {
            Some(agent_message::Kind::Log(batch)) => {
                let end = batch.offset.saturating_add(batch.data.len() as u64);
                let up_to = sent_up_to.entry((batch.job_id.as_str(), batch.stream)).or_default();
                *up_to = (*up_to).max(end);
            }
            Some(agent_message::Kind::Result(result)) => {
                results.insert(result.job_id.as_str());
            }
            _ => {}
        }
    }
    if let Some(first) = answers.first() {
        assert!(matches!(first.kind, Some(hub_message::Kind::Welcome(_))), "a session opened with {first:?}");
    }
    for answer in answers {
        match &answer.kind {
            Some(hub_message::Kind::LogAck(ack)) => {
                let up_to = sent_up_to.get(&(ack.job_id.as_str(), ack.stream)).copied().unwrap_or(0);
                assert!(ack.stored <= up_to, "acknowledged {ack:?}, but the agent sent up to {up_to}");
            }
            Some(hub_message::Kind::ResultAck(ack)) => {
                assert!(results.contains(ack.job_id.as_str()), "acknowledged a result never sent: {ack:?}");
            }
            _ => {}
        }
    }
}

async fn serve(hub: &Hub, mode: u8, input: &mut Cursor<'_>) {
    let Fixture { pki, peer, .. } = fixture();
    match mode % 3 {
        2 => {
            let Ok(mut request) = RegisterRequest::decode(input.rest()) else { return };
            if request.token == TOKEN_PLACEHOLDER
                && let Ok(token) = pki.issue_token(&request.worker_id)
            {
                request.token = token.as_str().to_owned();
            }
            let _ = register(hub, request).await;
        }
        framing => {
            let body = if framing == 0 { frames(input) } else { Bytes::copy_from_slice(input.rest()) };
            let sent = sent_messages(&body);
            let decoder = ProstCodec::<HubMessage, AgentMessage>::default().decoder();
            let inbound = Streaming::new_request(
                decoder,
                http_body_util::Full::new(body),
                None,
                Some(max_session_message(hub)),
            );
            if let Ok((answers, _)) = session(hub, peer.clone(), inbound).await {
                check_answers(&sent, &answers);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let mut input = Cursor::new(data);
    let mode = input.u8();
    let scratch = ScratchDir::new();
    fixture.runtime.block_on(async {
        let logs = Arc::new(LogStore::open(scratch.path()).await.expect("a log store"));
        let hub = Hub::new(fixture.pki.clone(), HubConfig::default()).with_logs(logs);
        serve(&hub, mode, &mut input).await;
    });
});
