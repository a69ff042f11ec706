//! One running job's task: its output, samples and result into its outbox, and the running
//! jobs' cancel handles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::mpsc;

use super::outbox::{Outbox, Outboxes};
use super::trace::JobTrace;
use super::wire::job_result;
use crate::protocol::now_unix_ms;
use crate::protocol::v1;
use crate::runner::{self, CancelHandle, RunningJob};

/// The running jobs' cancel handles by job id, each with where its cancellation reason goes.
pub(super) type Cancels = Arc<Mutex<CancelMap>>;
pub(super) type CancelMap = HashMap<String, (CancelHandle, Arc<OnceLock<String>>)>;

/// One job's task: moves its output and samples into its outbox, then its result.
pub(super) struct JobTask {
    pub(super) outboxes: Arc<Outboxes>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) cancels: Cancels,
    pub(super) reason: Arc<OnceLock<String>>,
    /// The run's span, when the hub traces the job.
    pub(super) trace: Option<JobTrace>,
}

impl JobTask {
    pub(super) async fn run(
        self,
        job: RunningJob,
        mut batches: mpsc::Receiver<runner::LogBatch>,
        mut samples: mpsc::Receiver<runner::MetricsSample>,
    ) {
        let job_id = self.outbox.job_id().to_owned();
        let pid = job.pid();
        let source = job.metrics_source().clone();
        let wait = job.wait();
        tokio::pin!(wait);
        // Output is taken while waiting: the runner's wait also waits for its sink to drain.
        let finished = loop {
            tokio::select! {
                Some(batch) = batches.recv() => self.keep(batch).await,
                Some(sample) = samples.recv() => {
                    self.outbox.sample(v1::MetricsSample {
                        job_id: job_id.clone(),
                        at_unix_ms: now_unix_ms(),
                        cpu_usage_usec: u64::try_from(sample.cpu.as_micros()).unwrap_or(u64::MAX),
                        memory_current_bytes: sample.memory_bytes,
                        memory_peak_bytes: sample.peak_memory_bytes,
                    });
                    self.outboxes.notify();
                }
                finished = &mut wait => break finished,
            }
        };
        // Batches sent just before the job was over.
        while let Some(batch) = batches.recv().await {
            self.keep(batch).await;
        }
        let mut result = job_result(&job_id, finished, &source, self.reason.get());
        result.spans.extend(self.trace.as_ref().and_then(|trace| trace.finish(&result, pid)));
        self.outbox.finish(result);
        self.outboxes.notify();
        self.cancels.lock().unwrap_or_else(PoisonError::into_inner).remove(&job_id);
    }

    /// Keeps a batch, then waits while the job holds too much unacknowledged output: not
    /// taking more makes the runner stop reading the job's pipes.
    async fn keep(&self, batch: runner::LogBatch) {
        self.outbox.push(batch.stream, batch.offset, batch.data);
        self.outboxes.notify();
        self.outbox.wait_for_room().await;
    }
}
