//! What a worker may send on its session: output, results and acceptances only for the jobs
//! handed to it, log offsets that never go back, batches within the size `Welcome` set, and
//! metrics samples at a bounded rate. A valid certificate proves who a worker is, not that it
//! behaves: a compromised one must not reach other jobs, nor grow what the hub holds.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::config::HubConfig;
use super::error::HubError;
use super::sync::{log_stream, stream_index};
use crate::logstore::LogStream;
use hodei_agent::protocol::v1::LogAck;

/// Logs what the hub refuses of `worker`'s session, and returns the status the session ends
/// with.
pub(super) fn refused(worker: &str, error: &HubError) -> Status {
    let job = error.job_id().unwrap_or_default();
    tracing::warn!(worker, job, %error, "refused what the worker sent; ending its session");
    error.refusal()
}

/// One job handed to the session's worker.
#[derive(Debug, Default)]
struct Handed {
    /// Per stream: how far the session's output has reached. It starts where `Welcome` told
    /// the agent to resume (it resends from there at the earliest) and moves to the end of
    /// each batch taken; an agent never sends below it.
    reached: [u64; 2],
    /// The metrics samples taken in the window that started at `window_start`.
    samples: u32,
    window_start: Option<Instant>,
}

/// What a metrics sample came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sample {
    Taken,
    /// Over the job's rate, or for a job not handed to the worker; `warn` on the first of a
    /// window, so that a flood of samples is not a flood of log lines too.
    Dropped {
        warn: bool,
    },
}

/// The jobs a session's worker may send for, and where each stands.
#[derive(Debug)]
pub(super) struct Conduct {
    worker_id: String,
    jobs: HashMap<String, Handed>,
    max_batch_bytes: u64,
    max_message: usize,
    max_samples: u32,
    window: Duration,
    /// Whether a sample for a job not handed to the worker was logged yet.
    warned_unhanded_sample: bool,
}

impl Conduct {
    pub(super) fn new(worker_id: &str, config: &HubConfig) -> Self {
        Self {
            worker_id: worker_id.to_owned(),
            jobs: HashMap::new(),
            max_batch_bytes: config.log_batch_max_bytes,
            max_message: config.max_session_message(),
            max_samples: config.metrics_max_samples,
            window: config.metrics_window,
            warned_unhanded_sample: false,
        }
    }

    /// A job the agent listed in its `Hello`.
    pub(super) fn held(&mut self, job_id: String) {
        self.jobs.entry(job_id).or_default();
    }

    /// Where `Welcome` tells the agent to resume a stream of a job it holds: the earliest
    /// offset it sends from on this session.
    pub(super) fn resumes(&mut self, resume: &LogAck) {
        let (Some(job), Some(stream)) = (self.jobs.get_mut(&resume.job_id), log_stream(resume.stream()))
        else {
            return;
        };
        job.reached[stream_index(stream)] = resume.stored;
    }

    /// A job assigned on this session; one the agent already holds keeps where it stands.
    pub(super) fn assigned(&mut self, job_id: &str) {
        if !self.jobs.contains_key(job_id) {
            self.jobs.insert(job_id.to_owned(), Handed::default());
        }
    }

    /// The job's result arrived: the agent owes nothing more for it on this session.
    pub(super) fn finished(&mut self, job_id: &str) {
        self.jobs.remove(job_id);
    }

    /// Refuses `what` naming `job_id` unless the job was handed to the worker.
    pub(super) fn check_job(&self, job_id: &str, what: &'static str) -> Result<(), HubError> {
        if self.jobs.contains_key(job_id) {
            return Ok(());
        }
        Err(HubError::NotAssigned { worker_id: self.worker_id.clone(), job_id: job_id.to_owned(), what })
    }

    /// What a message too large to decode is refused as.
    pub(super) fn message_too_large(&self) -> HubError {
        HubError::MessageTooLarge { worker_id: self.worker_id.clone(), max: self.max_message }
    }

    /// Refuses a batch for a job not handed to the worker, over the size limit, or starting
    /// below where the session's output of that stream reached. One starting past it is the
    /// store's to refuse (a gap), which knows what is stored from earlier sessions too.
    pub(super) fn check_batch(
        &self,
        job_id: &str,
        stream: LogStream,
        offset: u64,
        len: usize,
    ) -> Result<(), HubError> {
        self.check_job(job_id, "a log batch")?;
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        if len > self.max_batch_bytes {
            return Err(HubError::BatchTooLarge {
                worker_id: self.worker_id.clone(),
                job_id: job_id.to_owned(),
                len,
                max: self.max_batch_bytes,
            });
        }
        let reached = self.jobs.get(job_id).map_or(0, |job| job.reached[stream_index(stream)]);
        if offset < reached {
            return Err(HubError::OffsetRewound {
                worker_id: self.worker_id.clone(),
                job_id: job_id.to_owned(),
                stream,
                offset,
                reached,
            });
        }
        Ok(())
    }

    /// Records that the store took a batch of `stream` of `job_id` ending at `end`.
    pub(super) fn took(&mut self, job_id: &str, stream: LogStream, end: u64) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            let reached = &mut job.reached[stream_index(stream)];
            *reached = (*reached).max(end);
        }
    }

    /// Whether a metrics sample for `job_id` arriving `now` is taken: only for a job handed to
    /// the worker, and at most `metrics_max_samples` per job within each window.
    pub(super) fn sample(&mut self, job_id: &str, now: Instant) -> Sample {
        let Some(job) = self.jobs.get_mut(job_id) else {
            let warn = !std::mem::replace(&mut self.warned_unhanded_sample, true);
            return Sample::Dropped { warn };
        };
        if job.window_start.is_none_or(|start| now.duration_since(start) >= self.window) {
            job.window_start = Some(now);
            job.samples = 0;
        }
        if job.samples < self.max_samples {
            job.samples += 1;
            return Sample::Taken;
        }
        job.samples = job.samples.saturating_add(1);
        Sample::Dropped { warn: job.samples == self.max_samples.saturating_add(1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conduct(max_samples: u32) -> Conduct {
        let config = HubConfig::default()
            .log_batches(16, Duration::from_millis(10))
            .metrics_limit(max_samples, Duration::from_secs(10));
        Conduct::new("w", &config)
    }

    #[test]
    fn only_handed_jobs_are_written_and_never_backwards() {
        let mut conduct = conduct(1);
        conduct.held("held".to_owned());
        let stdout = hodei_agent::protocol::v1::OutputStream::Stdout.into();
        conduct.resumes(&LogAck { job_id: "held".to_owned(), stream: stdout, stored: 5 });
        conduct.assigned("new");
        assert!(matches!(
            conduct.check_batch("other", LogStream::Stdout, 0, 1),
            Err(HubError::NotAssigned { what: "a log batch", .. })
        ));
        assert!(matches!(
            conduct.check_batch("held", LogStream::Stdout, 4, 1),
            Err(HubError::OffsetRewound { offset: 4, reached: 5, .. })
        ));
        assert!(conduct.check_batch("held", LogStream::Stdout, 5, 16).is_ok());
        assert!(matches!(
            conduct.check_batch("held", LogStream::Stderr, 0, 17),
            Err(HubError::BatchTooLarge { len: 17, max: 16, .. })
        ));
        conduct.took("new", LogStream::Stderr, 3);
        assert!(conduct.check_batch("new", LogStream::Stdout, 0, 1).is_ok());
        assert!(conduct.check_batch("new", LogStream::Stderr, 2, 1).is_err());
        // Assigned again while held: it stays where it stood.
        conduct.assigned("held");
        assert!(conduct.check_batch("held", LogStream::Stdout, 0, 1).is_err());
        conduct.finished("held");
        assert!(conduct.check_job("held", "a result").is_err());
    }

    #[test]
    fn samples_over_the_rate_are_dropped_warning_once_a_window() {
        let mut conduct = conduct(2);
        conduct.assigned("job");
        let start = Instant::now();
        let taken: Vec<Sample> = (0..4).map(|_| conduct.sample("job", start)).collect();
        assert_eq!(
            taken,
            [Sample::Taken, Sample::Taken, Sample::Dropped { warn: true }, Sample::Dropped { warn: false }]
        );
        assert_eq!(conduct.sample("job", start + Duration::from_secs(10)), Sample::Taken);
        assert_eq!(conduct.sample("other", start), Sample::Dropped { warn: true });
        assert_eq!(conduct.sample("other", start), Sample::Dropped { warn: false });
    }
}
