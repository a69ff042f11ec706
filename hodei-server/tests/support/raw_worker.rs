//! A worker that speaks the session protocol by hand, over mutual TLS with a certificate the
//! test hub issued it: what a compromised worker can send, message by message.

use hodei_agent::connect::{self, ConnectError, Session};
use hodei_agent::pki::{TlsIdentity, agent_client_config};
use hodei_agent::protocol::v1::{self, AgentMessage, HubMessage, agent_message, hub_message};
use hodei_server::logstore::LogStream;
use tonic::Status;

use super::{Setup, within};

/// A registered worker with no agent behind it: the test sends what it likes.
pub struct RawWorker {
    pub worker_id: String,
    identity: TlsIdentity,
    sessions: std::net::SocketAddr,
    ca: String,
}

impl RawWorker {
    /// Registers `worker_id` with a token of `setup`'s hub, over its registration listener.
    pub async fn register(setup: &Setup, worker_id: &str) -> Self {
        let address = |name: &str| {
            let (_, value) = setup.binary_env().iter().find(|(key, _)| *key == name).unwrap();
            value.parse().unwrap()
        };
        let ca = setup.hub.pki().ca_bundle_pem().to_owned();
        let token = setup.hub.pki().issue_token(worker_id).unwrap();
        let (key, certificate) =
            within(connect::register(address("HODEI_REGISTRATION_ADDR"), &ca, worker_id, token.as_str()))
                .await
                .unwrap();
        Self {
            worker_id: worker_id.to_owned(),
            identity: key.identity(&certificate).unwrap(),
            sessions: address("HODEI_SESSION_ADDR"),
            ca,
        }
    }

    /// Opens a session whose `Hello` claims `jobs`.
    pub async fn open_claiming(&self, jobs: &[&str]) -> Result<RawSession, ConnectError> {
        let tls = agent_client_config(&self.ca, Some(&self.identity))?;
        let hello = v1::Hello {
            jobs: jobs
                .iter()
                .map(|job_id| v1::JobState {
                    job_id: (*job_id).to_owned(),
                    running: true,
                    ..Default::default()
                })
                .collect(),
            ..connect::hello(&self.worker_id)
        };
        let session = within(async {
            connect::start_session(connect::channel(self.sessions, tls).await?, hello).await
        })
        .await?;
        Ok(RawSession(session))
    }

    /// Opens a session claiming no job.
    pub async fn open(&self) -> RawSession {
        self.open_claiming(&[]).await.unwrap()
    }
}

/// An open session of a [`RawWorker`].
pub struct RawSession(pub Session);

impl RawSession {
    /// Sends one message; a session the hub already ended takes it without complaint, as a
    /// stream does until its end is noticed.
    pub async fn send(&self, kind: agent_message::Kind) {
        let _ = self.0.sender.send(AgentMessage { kind: Some(kind) }).await;
    }

    pub async fn log(&self, job_id: &str, stream: LogStream, offset: u64, data: &[u8]) {
        let stream = match stream {
            LogStream::Stdout => v1::OutputStream::Stdout,
            LogStream::Stderr => v1::OutputStream::Stderr,
        };
        let batch = v1::LogBatch {
            job_id: job_id.to_owned(),
            stream: stream.into(),
            offset,
            data: data.to_vec().into(),
        };
        self.send(agent_message::Kind::Log(batch)).await;
    }

    /// The hub's next message.
    pub async fn next(&mut self) -> Option<HubMessage> {
        within(self.0.receiver.message()).await.unwrap()
    }

    /// Waits for the job the hub assigns next.
    pub async fn assigned(&mut self) -> v1::JobSpec {
        loop {
            match self.next().await.and_then(|m| m.kind) {
                Some(hub_message::Kind::Assign(assign)) => return assign.spec.unwrap(),
                Some(_) => {}
                None => panic!("the session ended before an assignment"),
            }
        }
    }

    /// Waits until the hub acknowledges `job_id`'s stdout up to `stored`.
    pub async fn acknowledged(&mut self, job_id: &str, stored: u64) {
        loop {
            match self.next().await.and_then(|m| m.kind) {
                Some(hub_message::Kind::LogAck(ack))
                    if ack.job_id == job_id
                        && ack.stream() == v1::OutputStream::Stdout
                        && ack.stored >= stored =>
                {
                    return;
                }
                Some(_) => {}
                None => panic!("the session ended before the acknowledgement"),
            }
        }
    }

    /// A heartbeat and its answer: the hub's session task takes messages in order, so every
    /// message sent before has been handled by then.
    pub async fn round_trip(&mut self) {
        self.send(agent_message::Kind::Heartbeat(v1::Heartbeat { sent_unix_ms: 1 })).await;
        loop {
            match self.next().await.and_then(|m| m.kind) {
                Some(hub_message::Kind::Heartbeat(_)) => return,
                Some(_) => {}
                None => panic!("the session ended before the heartbeat's answer"),
            }
        }
    }

    /// The status the hub ended the session with; whatever it sent before is skipped.
    pub async fn refusal(mut self) -> Status {
        loop {
            match within(self.0.receiver.message()).await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the session ended without a status"),
                Err(status) => return status,
            }
        }
    }
}
