//! A session's side of running jobs: the callers' commands (assign, re-attach, cancel,
//! abandon) and the results the agent sends back, stored before anyone is told.

use super::command::SessionCommand;
use super::error::HubError;
use super::results::stored_result;
use super::task::{Flow, PendingJob, SessionTask};
use crate::logstore::{LogStatus, LogStream};
use hodei_agent::protocol::v1::{self, AssignJob, CancelJob, ResultAck, hub_message};

impl SessionTask {
    pub(super) async fn command(&mut self, command: SessionCommand) -> Flow {
        match command {
            SessionCommand::Run { spec, previous, reply } => {
                let job_id = spec.job_id.clone();
                let worker_id = self.guard.worker_id.clone();
                if self.jobs.contains_key(&job_id) {
                    let _ = reply.send(Err(HubError::DuplicateJob { worker_id, job_id }));
                    return Flow::Continue(());
                }
                // Checked again here, in the task that stores results: one may have arrived
                // since the caller looked.
                if let Some(logs) = &self.logs {
                    match stored_result(logs, &job_id, &previous).await {
                        Ok(Some(result)) => {
                            let _ = reply.send(Ok(result));
                            return Flow::Continue(());
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return Flow::Continue(());
                        }
                    }
                }
                let attached = previous.iter().find(|id| self.agent_jobs.contains(*id)).cloned();
                match attached {
                    Some(earlier) => {
                        tracing::info!(worker = %worker_id, job = %earlier, "re-attached to a running job");
                        self.aliases.insert(job_id, earlier.clone());
                        self.jobs.insert(earlier, PendingJob { reply, log_error: None });
                        Flow::Continue(())
                    }
                    None => {
                        self.close_replaced(&previous, &job_id).await;
                        // Recorded before it is assigned: whatever happens next, the job has a
                        // log, so its end can be recorded and it is listed even if it never
                        // writes. So is its worker: a step of it elsewhere waits for this run.
                        if let Some(logs) = &self.logs
                            && let Err(e) = logs.begin_on(&job_id, &worker_id, self.session).await
                        {
                            let _ = reply.send(Err(HubError::Logs { job_id, source: e }));
                            return Flow::Continue(());
                        }
                        // Handed to the worker before it can answer: from now on its output,
                        // acceptance and result are taken, and no other worker's.
                        self.conduct.assigned(&job_id);
                        self.guard.holders().hand(&job_id, &worker_id);
                        // Sent even for a job the agent holds: it then goes on, and its output and
                        // result come as they would have. Recorded as pending after the send,
                        // which touches nothing else, so that the event names it without a copy.
                        let flow =
                            self.send(hub_message::Kind::Assign(AssignJob { spec: Some(*spec) })).await;
                        tracing::debug!(worker = %worker_id, job = %job_id, "job assigned");
                        self.jobs.insert(job_id, PendingJob { reply, log_error: None });
                        flow
                    }
                }
            }
            SessionCommand::Cancel { job_id, reason } => {
                let job_id = self.aliases.get(&job_id).cloned().unwrap_or(job_id);
                self.agent_jobs.remove(&job_id);
                self.send(hub_message::Kind::Cancel(CancelJob { job_id, reason })).await
            }
            SessionCommand::Abandon { job_id, cancel } => {
                let job_id = self.aliases.remove(&job_id).unwrap_or(job_id);
                self.jobs.remove(&job_id);
                match cancel {
                    Some(reason) => {
                        // Being cancelled, it is no job to re-attach a later attempt to.
                        self.agent_jobs.remove(&job_id);
                        self.send(hub_message::Kind::Cancel(CancelJob { job_id, reason })).await
                    }
                    None => Flow::Continue(()),
                }
            }
        }
    }

    /// A new attempt replaces the earlier ones this worker does not hold: none of them runs
    /// anywhere any more (the pool hands out no other worker while one may), so each whose log
    /// is still open without a result is closed with a `Lost` result saying what replaced it.
    async fn close_replaced(&self, previous: &[String], replacement: &str) {
        let Some(logs) = &self.logs else { return };
        for earlier in previous {
            self.guard.holders().release(earlier);
            match logs.result(earlier).await {
                Ok(Some(_)) => continue,
                Ok(None) if logs.exists(earlier).await.unwrap_or(false) => {}
                // No log: that attempt never reached a worker.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(job = %earlier, error = %e, "cannot read an earlier attempt's result");
                    continue;
                }
            }
            use prost::Message as _;
            let lost = v1::JobResult {
                job_id: earlier.clone(),
                outcome: Some(v1::job_result::Outcome::Lost(format!(
                    "its worker was lost or died with the control plane; {replacement} replaced it"
                ))),
                ..v1::JobResult::default()
            };
            if let Err(e) = logs.finish(earlier, &lost.encode_to_vec()).await {
                tracing::warn!(job = %earlier, error = %e, "cannot close an earlier attempt's log");
            }
        }
    }

    /// Stores the result and closes the job's log, acknowledges the result, then hands it to
    /// the waiter: the log is complete and the result durable by the time `run_job` returns,
    /// and a result nobody waits for (the control plane restarted since it assigned the job)
    /// is found by the step when it asks again.
    pub(super) async fn result(&mut self, mut result: v1::JobResult) -> Flow {
        use prost::Message as _;
        if let Err(refusal) = self.conduct.check_job(&result.job_id, "a result") {
            return self.refuse(refusal).await;
        }
        let job_id = result.job_id.clone();
        // Nothing more of it is due on this session, stored or not: a result the store
        // refused comes again on the agent's next session, listed in its `Hello`.
        self.conduct.finished(&job_id);
        // Exported, not stored: they are the trace's, and a stored result is read again.
        let spans = std::mem::take(&mut result.spans);
        self.agent_jobs.remove(&job_id);
        self.metrics.map().remove(&job_id);
        self.running.remove(&job_id);
        self.guard.set_jobs(&self.running);
        // Closing syncs what was written, so the log is durable before the result is stored,
        // and it is acknowledged before the result, so that the agent can forget the job.
        self.sync.forget(&job_id);
        let stored = match &self.logs {
            Some(logs) => match logs.finish(&job_id, &result.encode_to_vec()).await {
                Ok(()) => logs.status(&job_id).await,
                Err(error) => Err(error),
            },
            None => Ok(LogStatus::default()),
        };
        if let Ok(status) = &stored {
            for stream in LogStream::ALL {
                if self.acknowledge(&job_id, stream, status).await.is_break() {
                    return Flow::Break(());
                }
            }
        }
        let stored = stored.map(drop);
        let job = self.jobs.remove(&job_id);
        self.aliases.retain(|_, attached| *attached != job_id);
        if let Err(error) = &stored {
            // Not acknowledged: the agent keeps the result and sends it again on its next
            // session, by when the store may work again.
            tracing::error!(worker = %self.guard.worker_id, job = %job_id, %error, "job result not stored");
            if error.calls_for_resend() {
                // A shared database that failed, or output lost on its way: the session ends
                // (detaching the job, which the agent still holds), its waiter finds the job
                // held, and the output and result come again on the agent's next session.
                self.agent_jobs.insert(job_id);
                return Flow::Break(());
            }
        }
        let flow = match stored {
            Ok(()) => {
                self.guard.holders().release(&job_id);
                // Once: a result not stored is sent again, spans and all.
                super::spans::export(&self.guard.worker_id, spans);
                let flow =
                    self.send(hub_message::Kind::ResultAck(ResultAck { job_id: job_id.clone() })).await;
                // The agent may forget the job now; the step's completion is not journaled yet.
                tracing::debug!(worker = %self.guard.worker_id, job = %job_id, "job result acknowledged");
                flow
            }
            Err(_) => Flow::Continue(()),
        };
        let Some(job) = job else {
            tracing::info!(worker = %self.guard.worker_id, job = %job_id, "result stored for a job nobody waits for yet");
            return flow;
        };
        let outcome = match job.log_error.map_or(stored, Err) {
            Ok(()) => Ok(result),
            Err(source) => Err(HubError::Logs { job_id, source }),
        };
        // The caller may have given up waiting; the result is then nobody's.
        let _ = job.reply.send(outcome);
        flow
    }
}
