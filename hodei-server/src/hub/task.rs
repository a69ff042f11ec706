//! A session's task: the state it owns, its loop over the agent's stream and the callers'
//! commands, the agent's messages, and the acknowledgements of the output it stores.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Status, Streaming};

use super::command::SessionCommand;
use super::conduct::{Conduct, Sample, refused};
use super::error::HubError;
use super::metrics::Metrics;
use super::registry::ConnectionGuard;
use super::sync::{LogSync, SyncOutcome, log_ack, log_stream};
use crate::logstore::{LogStatus, LogStore, LogStoreError, LogStream};
use crate::pki::HubPki;
use hodei_agent::protocol::now_unix_ms;
use hodei_agent::protocol::v1::{self, AgentMessage, Heartbeat, HubMessage, agent_message, hub_message};

/// A job waiting for its result on this session.
pub(super) struct PendingJob {
    pub(super) reply: oneshot::Sender<Result<v1::JobResult, HubError>>,
    /// The first failure to store its output: the result is then reported as this error.
    pub(super) log_error: Option<LogStoreError>,
}

/// One session's state, owned by its task.
pub(super) struct SessionTask {
    pub(super) commands: mpsc::Receiver<SessionCommand>,
    pub(super) logs: Option<Arc<LogStore>>,
    /// The output written and not yet durable, and the sync in flight.
    pub(super) sync: LogSync,
    /// The jobs handed to the worker, and what it may send for them.
    pub(super) conduct: Conduct,
    pub(super) pki: Arc<HubPki>,
    pub(super) metrics: Arc<Metrics>,
    /// The agent's certificate (DER), which a rotation request must present.
    pub(super) peer: Vec<u8>,
    /// By job id. Dropped with the task, which tells every waiter its worker was lost.
    pub(super) jobs: HashMap<String, PendingJob>,
    /// The id a caller asked for, by the id of the earlier attempt it re-attached to.
    pub(super) aliases: HashMap<String, String>,
    /// The jobs the agent holds that a later attempt may re-attach to: announced in `Hello` or
    /// accepted on this session, and not cancelled.
    pub(super) agent_jobs: HashSet<String>,
    /// The jobs running on the agent until their result arrives, cancelled ones included;
    /// published in the registry.
    pub(super) running: HashSet<String>,
    /// This session's number among the control plane's ([`LogStore::attach`]).
    pub(super) session: u64,
    pub(super) guard: ConnectionGuard,
    /// Last, so dropped last: the server's graceful stop waits for the response stream, which
    /// ends when this goes, and by then the session holds no log store or PKI any more.
    pub(super) outbound: mpsc::Sender<Result<HubMessage, Status>>,
}

/// Whether the session goes on after a message.
pub(super) type Flow = std::ops::ControlFlow<()>;

impl SessionTask {
    /// Serves the session until the agent closes its stream, falls silent, or the connection
    /// dies.
    pub(super) async fn run(
        mut self,
        mut inbound: Streaming<AgentMessage>,
        timeout: Duration,
        mut stopped: watch::Receiver<bool>,
    ) {
        // Why the session ended, said once it has: what an operator reads first when a worker
        // comes and goes.
        let why: &str = loop {
            let message = tokio::select! {
                // The guard `wait_for` returns is not `Send`; drop it before awaiting anything else.
                () = async { let _ = stopped.wait_for(|stopped| *stopped).await; } => {
                    let _ = self.outbound.send(Err(Status::unavailable("the control plane is shutting down"))).await;
                    break "the control plane is shutting down";
                }
                // The response stream was dropped: the peer is gone.
                () = self.outbound.closed() => break "the agent's side of the stream is gone",
                Some(command) = self.commands.recv() => {
                    if self.command(command).await.is_break() {
                        break "a job could not be handed to the agent, or its record failed";
                    }
                    continue;
                }
                synced = self.sync.in_flight(), if self.sync.is_syncing() => {
                    let synced = self.sync.ended(synced, &self.guard.worker_id);
                    if self.synced(synced).await.is_break() {
                        break "the log store failed: the agent resends what it did not acknowledge";
                    }
                    self.start_sync();
                    continue;
                }
                // Not while the sync in flight leaves too much written and unsynced.
                received = tokio::time::timeout(timeout, inbound.message()),
                    if self.sync.may_read() => received,
            };
            let worker = self.guard.worker_id.as_str();
            let kind = match message {
                Err(_) => {
                    tracing::warn!(worker, "no message within the heartbeat timeout; closing the session");
                    let _ = self
                        .outbound
                        .send(Err(Status::deadline_exceeded("no heartbeat within the timeout")))
                        .await;
                    break "no message within the heartbeat timeout";
                }
                Ok(Ok(Some(message))) => message.kind,
                Ok(Ok(None)) => break "the agent closed its stream",
                Ok(Err(status)) if status.code() == tonic::Code::OutOfRange => {
                    // Only a message over the decoding limit makes the hub's own decoder fail so.
                    let _ = self.refuse(self.conduct.message_too_large()).await;
                    break "the agent sent a message over the session's limit";
                }
                Ok(Err(status)) => {
                    tracing::debug!(worker, %status, "session stream failed");
                    break "the agent's stream failed";
                }
            };
            if self.message(kind).await.is_break() {
                break "a message of the agent was refused or could not be handled, or the reply not sent";
            }
            self.start_sync();
        };
        tracing::info!(worker = %self.guard.worker_id, why, "session ending");
        // What was written is made durable and acknowledged as far as the stream still goes,
        // so that the agent's next session resends less.
        // The sync in flight, then one for what it left; no more, so that a store that keeps
        // failing cannot hold the session's end up.
        for _ in 0..2 {
            self.start_sync();
            if !self.sync.is_syncing() {
                break;
            }
            let ended = self.sync.in_flight().await;
            let outcome = self.sync.ended(ended, &self.guard.worker_id);
            let _ = self.synced(outcome).await;
        }
        if !self.jobs.is_empty() {
            tracing::warn!(worker = %self.guard.worker_id, jobs = self.jobs.len(), "session ended with jobs running");
        }
        if let Some(logs) = &self.logs {
            // Assigned ones too: the agent may have received them before the session ended.
            let mut held: Vec<String> = self.running.union(&self.agent_jobs).cloned().collect();
            held.extend(self.jobs.keys().filter(|job| !self.running.contains(*job)).cloned());
            detach_until_recorded(logs, &self.guard.worker_id, held, self.session).await;
        }
    }

    pub(super) async fn send(&self, kind: hub_message::Kind) -> Flow {
        match self.outbound.send(Ok(HubMessage { kind: Some(kind) })).await {
            Ok(()) => Flow::Continue(()),
            Err(_) => Flow::Break(()),
        }
    }

    /// Ends the session over what its worker sent, telling the agent why.
    pub(super) async fn refuse(&self, error: HubError) -> Flow {
        let status = refused(&self.guard.worker_id, &error);
        let _ = self.outbound.send(Err(status)).await;
        Flow::Break(())
    }

    async fn message(&mut self, kind: Option<agent_message::Kind>) -> Flow {
        self.guard.heard();
        let worker = self.guard.worker_id.as_str();
        match kind {
            Some(agent_message::Kind::Heartbeat(_)) => {
                self.send(hub_message::Kind::Heartbeat(Heartbeat { sent_unix_ms: now_unix_ms() })).await
            }
            Some(agent_message::Kind::Hello(_)) => {
                tracing::warn!(worker, "second Hello on a session ignored");
                Flow::Continue(())
            }
            Some(agent_message::Kind::Accepted(accepted)) => {
                if let Err(refusal) = self.conduct.check_job(&accepted.job_id, "an acceptance") {
                    return self.refuse(refusal).await;
                }
                tracing::info!(worker, job = %accepted.job_id, pid = accepted.pid, "job accepted");
                self.running.insert(accepted.job_id.clone());
                self.guard.set_jobs(&self.running);
                self.agent_jobs.insert(accepted.job_id);
                Flow::Continue(())
            }
            Some(agent_message::Kind::Log(batch)) => self.log(batch).await,
            Some(agent_message::Kind::Result(result)) => self.result(result).await,
            Some(agent_message::Kind::Metrics(sample)) => {
                match self.conduct.sample(&sample.job_id, tokio::time::Instant::now()) {
                    Sample::Taken => self.metrics.record(sample),
                    Sample::Dropped { warn } => {
                        self.metrics.dropped(worker);
                        if warn {
                            tracing::warn!(worker, job = %sample.job_id, "metrics samples over the job's rate, or for a job not the worker's, dropped");
                        }
                    }
                }
                Flow::Continue(())
            }
            Some(agent_message::Kind::Rotate(request)) => self.rotate(request).await,
            None => {
                tracing::warn!(worker, "empty message ignored");
                Flow::Continue(())
            }
        }
    }

    /// Writes a batch; the next sync makes it durable and acknowledges it (group commit: see
    /// [`LogSync::start`]). A batch that cannot be stored is not acknowledged, so that
    /// the agent keeps it (once it can resend).
    async fn log(&mut self, batch: v1::LogBatch) -> Flow {
        let Some(logs) = &self.logs else { return Flow::Continue(()) };
        let Some(stream) = log_stream(batch.stream()) else {
            tracing::warn!(worker = %self.guard.worker_id, job = %batch.job_id, "log batch without a stream ignored");
            return Flow::Continue(());
        };
        let len = batch.data.len();
        if let Err(refusal) = self.conduct.check_batch(&batch.job_id, stream, batch.offset, len) {
            return self.refuse(refusal).await;
        }
        match logs.write(&batch.job_id, stream, batch.offset, batch.data).await {
            Ok(()) => {
                let end = batch.offset.saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
                self.conduct.took(&batch.job_id, stream, end);
                self.sync.written(batch.job_id, stream, len);
                Flow::Continue(())
            }
            // A batch past what the agent sent: told why, as for any refusal; its next session
            // resends from what is stored.
            Err(error @ LogStoreError::Gap { .. }) => {
                self.refuse(HubError::Logs { job_id: batch.job_id, source: error }).await
            }
            Err(error) => self.log_failed(&batch.job_id, error),
        }
    }

    /// A batch the store refused fails its job's result. One the agent's resend can still
    /// store (a shared database that failed, a gap left by batches lost on their way) ends the
    /// session instead, so that the agent resends from what is stored on its next one, which
    /// may be with another control plane, and the job's waiter finds the job still held.
    fn log_failed(&mut self, job_id: &str, error: LogStoreError) -> Flow {
        tracing::warn!(worker = %self.guard.worker_id, job = %job_id, %error, "log batch not stored");
        if error.calls_for_resend() {
            return Flow::Break(());
        }
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.log_error.get_or_insert(error);
        }
        Flow::Continue(())
    }

    /// Starts a sync of what was written, unless one is in flight ([`LogSync::start`]).
    fn start_sync(&mut self) {
        self.sync.start(self.logs.as_ref(), &self.guard.worker_id);
    }

    /// Acknowledges what a sync made durable.
    async fn synced(&mut self, outcomes: SyncOutcome) -> Flow {
        if !outcomes.is_empty() {
            // Durable, not yet acknowledged.
            tracing::debug!(worker = %self.guard.worker_id, jobs = outcomes.len(), "log synced");
        }
        for (job_id, streams, outcome) in outcomes {
            match outcome {
                Ok(status) => {
                    for (stream, written) in LogStream::ALL.into_iter().zip(streams) {
                        if written && self.acknowledge(&job_id, stream, &status).await.is_break() {
                            return Flow::Break(());
                        }
                    }
                }
                Err(error) => {
                    if self.log_failed(&job_id, error).is_break() {
                        return Flow::Break(());
                    }
                }
            }
        }
        Flow::Continue(())
    }

    pub(super) async fn acknowledge(&self, job_id: &str, stream: LogStream, status: &LogStatus) -> Flow {
        self.send(hub_message::Kind::LogAck(log_ack(job_id, stream, status))).await
    }
}

/// Records that `worker`'s `session` ended while it held `held`. Until that is recorded they
/// count as attached here, and a step elsewhere waits for them: tried again in the background
/// while the database is out of reach, for at most a minute (past that this control plane is
/// unlikely to hold its lease).
pub(super) async fn detach_until_recorded(
    logs: &Arc<LogStore>,
    worker: &str,
    held: Vec<String>,
    session: u64,
) {
    let Err(error) = logs.detach(worker, &held, session).await else { return };
    tracing::warn!(worker, %error, "the end of the session not recorded; trying again");
    let (logs, worker) = (logs.clone(), worker.to_owned());
    tokio::spawn(async move {
        for _ in 0..120 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if logs.detach(&worker, &held, session).await.is_ok() {
                return;
            }
        }
        tracing::error!(%worker, "the end of the session could not be recorded");
    });
}
