//! The session handshake: the agent's `Hello` checked against its client certificate, the
//! worker registered, `Welcome` sent, and the session handed to its own task.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::conduct::{Conduct, refused};
use super::config::HubConfig;
use super::error::HubError;
use super::metrics::Metrics;
use super::registry::Registry;
use super::sync::{LogSync, log_ack};
use super::task::SessionTask;
use crate::logstore::{LogStore, LogStoreError, LogStream};
use crate::pki::HubPki;
use hodei_agent::pki::check_peer_worker_id;
use hodei_agent::protocol::v1::control_plane_server::ControlPlane;
use hodei_agent::protocol::v1::{
    AgentMessage, HubMessage, RegisterRequest, RegisterResponse, Welcome, agent_message, hub_message,
};
use hodei_agent::protocol::{PROTOCOL, negotiate, negotiate_max_held_bytes};

/// `Session`, on the mutual-TLS listener.
#[derive(Debug)]
pub(super) struct SessionService {
    pub(super) config: HubConfig,
    pub(super) registry: Arc<Registry>,
    pub(super) logs: Option<Arc<LogStore>>,
    pub(super) pki: Arc<HubPki>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) stopped: watch::Receiver<bool>,
    /// Held by every session task until it ends (see [`Hub::session_service`]).
    ///
    /// [`Hub::session_service`]: super::Hub::session_service
    pub(super) alive: mpsc::Sender<()>,
}

#[tonic::async_trait]
impl ControlPlane for SessionService {
    async fn register(&self, _: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("registration is served on the registration listener"))
    }

    type SessionStream = ReceiverStream<Result<HubMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // The handshake verified the chain and revocation; what is left is who it is.
        let peer = request
            .peer_certs()
            .and_then(|chain| chain.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        self.open(peer.to_vec(), request.into_inner()).await.map(Response::new)
    }
}

impl SessionService {
    /// Opens the session of the worker whose verified client certificate (DER) is `peer`: its
    /// `Hello` read from `inbound` and checked, `Welcome` queued, and the session's task spawned
    /// on the rest of `inbound`. The stream returned carries what the hub sends, and ends with
    /// the task.
    pub(super) async fn open(
        &self,
        peer: Vec<u8>,
        mut inbound: Streaming<AgentMessage>,
    ) -> Result<ReceiverStream<Result<HubMessage, Status>>, Status> {
        let hello = match tokio::time::timeout(self.config.heartbeat_timeout, inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no Hello within the heartbeat timeout")),
            Ok(message) => match message?.and_then(|m| m.kind) {
                Some(agent_message::Kind::Hello(hello)) => hello,
                _ => return Err(Status::invalid_argument("the first message of a session must be Hello")),
            },
        };
        let protocol = negotiate(PROTOCOL, hello.protocol)?;
        check_peer_worker_id(&peer, &hello.worker_id)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        self.check_claims(&hello).await?;
        let mut conduct = Conduct::new(&hello.worker_id, &self.config);
        for job in &hello.jobs {
            conduct.held(job.job_id.clone());
        }

        // This session among the control plane's, for the store's record of who holds a job.
        static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let session_number = NEXT_SESSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Where each job the agent still holds must resume: what the store has confirmed.
        let mut resume = Vec::new();
        let agent_jobs: HashSet<String> = hello.jobs.iter().map(|job| job.job_id.clone()).collect();
        if let Some(logs) = &self.logs {
            let mut attached = Vec::new();
            let recorded = async {
                for job in &hello.jobs {
                    let status = logs.status(&job.job_id).await.map_err(|e| {
                        tracing::warn!(worker = %hello.worker_id, job = %job.job_id, error = %e, "log status unreadable");
                        Status::internal("the control plane cannot read its log store")
                    })?;
                    for stream in LogStream::ALL {
                        let resumed = log_ack(&job.job_id, stream, &status);
                        conduct.resumes(&resumed);
                        resume.push(resumed);
                    }
                    // A step on any control plane sharing the store waits for it from now on.
                    attached.push(job.job_id.clone());
                    logs.attach(&job.job_id, &hello.worker_id, session_number).await.map_err(|e| {
                        tracing::warn!(worker = %hello.worker_id, job = %job.job_id, error = %e, "job holder not recorded");
                        Status::unavailable("the control plane cannot record the jobs the agent holds")
                    })?;
                }
                let listed: Vec<String> = agent_jobs.iter().cloned().collect();
                logs.holds_only(&hello.worker_id, &listed).await.map_err(|e| {
                    tracing::warn!(worker = %hello.worker_id, error = %e, "jobs the worker does not hold not recorded");
                    Status::unavailable("the control plane cannot record the jobs the agent holds")
                })
            };
            if let Err(refused) = recorded.await {
                // No session follows to detach what was attached: a step elsewhere would wait
                // for this control plane's session with the worker, which never opened.
                super::task::detach_until_recorded(logs, &hello.worker_id, attached, session_number).await;
                return Err(refused);
            }
        }
        let max_held_bytes = negotiate_max_held_bytes(self.config.max_held_bytes, hello.max_held_bytes);
        let max_unsynced_bytes = usize::try_from(max_held_bytes.saturating_mul(2)).unwrap_or(usize::MAX);
        let sync = LogSync::new(max_unsynced_bytes, self.config.log_batch_max_bytes);
        let (commands, command_rx) = mpsc::channel(16);
        let guard = self.registry.connect(
            &hello.worker_id,
            commands,
            sync.held(),
            agent_jobs.iter().cloned().collect(),
        );
        let (outbound, stream) = mpsc::channel(16);
        let welcome = Welcome {
            protocol: Some(protocol),
            heartbeat_interval_ms: millis(self.config.heartbeat_interval),
            heartbeat_timeout_ms: millis(self.config.heartbeat_timeout),
            log_batch_max_bytes: self.config.log_batch_max_bytes,
            log_batch_max_delay_ms: millis(self.config.log_batch_max_delay),
            resume,
            max_held_bytes,
        };
        // The channel is new and empty, so this cannot find it full.
        outbound
            .try_send(Ok(HubMessage { kind: Some(hub_message::Kind::Welcome(welcome)) }))
            .map_err(|_| Status::internal("session closed before Welcome"))?;
        let session = SessionTask {
            outbound,
            commands: command_rx,
            logs: self.logs.clone(),
            sync,
            conduct,
            pki: self.pki.clone(),
            metrics: self.metrics.clone(),
            peer,
            jobs: HashMap::new(),
            aliases: HashMap::new(),
            running: agent_jobs.clone(),
            agent_jobs,
            session: session_number,
            guard,
        };
        let (alive, timeout, stopped) =
            (self.alive.clone(), self.config.heartbeat_timeout, self.stopped.clone());
        tokio::spawn(async move {
            session.run(inbound, timeout, stopped).await;
            drop(alive);
        });
        Ok(ReceiverStream::new(stream))
    }
}

impl SessionService {
    /// Refuses a `Hello` that claims a job handed to another worker, or one the store has no
    /// log for (every job is given one before it is assigned): before the store is asked
    /// anything of the job, so that a refused claim learns nothing of it.
    async fn check_claims(&self, hello: &hodei_agent::protocol::v1::Hello) -> Result<(), Status> {
        let worker_id = &hello.worker_id;
        let claimed = |job_id: &str| HubError::NotAssigned {
            worker_id: worker_id.clone(),
            job_id: job_id.to_owned(),
            what: "a claim in its Hello",
        };
        for job in &hello.jobs {
            if let Some(holder) = self.registry.holders.other_than(&job.job_id, worker_id) {
                tracing::debug!(worker = %worker_id, job = %job.job_id, %holder, "the job is another worker's");
                return Err(refused(worker_id, &claimed(&job.job_id)));
            }
            let Some(logs) = &self.logs else { continue };
            // Another control plane sharing the store may have handed the job out.
            let handed = async {
                Ok::<_, LogStoreError>(match logs.handed_to(&job.job_id).await? {
                    Some(holder) => holder == *worker_id,
                    None => logs.exists(&job.job_id).await?,
                })
            };
            match handed.await {
                Ok(true) => {}
                Ok(false) | Err(LogStoreError::InvalidJobId { .. }) => {
                    return Err(refused(worker_id, &claimed(&job.job_id)));
                }
                Err(e) => {
                    tracing::warn!(worker = %worker_id, job = %job.job_id, error = %e, "log store unreadable");
                    return Err(Status::internal("the control plane cannot read its log store"));
                }
            }
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
