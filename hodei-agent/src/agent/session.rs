//! One session with the hub: opening it, then serving the hub's messages until it ends.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::backoff::Backoff;
use super::error::AgentError;
use super::outbox::MAX_HELD_BYTES;
use super::pump::pump;
use super::settings::Settings;
use super::status::say;
use super::worker::Worker;
use crate::connect::{self, Session};
use crate::pki::agent_client_config;
use crate::protocol::v1::{self, hub_message};
use crate::runner::{BatchLimits, JobRunner, RunnerConfig};

/// How long opening a session (TCP, TLS, Hello and Welcome) may take: a control plane that
/// accepts connections but does not answer (stopped, overloaded) is left for the next one.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a session ended.
pub(super) struct Ended {
    /// Whether it opened and the control plane answered to the end: one that did not open, or
    /// fell silent, is a reason to try the next address.
    pub(super) answered: bool,
    /// Why it ended, for the status line.
    pub(super) why: String,
    /// What ends the agent: the key and certificate of its registration could not be stored.
    pub(super) fatal: Option<AgentError>,
}

/// Opens one session with the hub at `address` and serves it: heartbeats, the jobs the hub
/// assigns, and resending what the hub has not acknowledged. Jobs outlive it.
pub(super) async fn session(
    settings: &Settings,
    address: std::net::SocketAddr,
    worker: &mut Worker,
    backoff: &mut Backoff,
) -> Ended {
    let mut answered = false;
    let mut fatal = None;
    let why = serve(settings, address, worker, backoff, &mut answered, &mut fatal).await;
    Ended { answered, why, fatal }
}

async fn serve(
    settings: &Settings,
    address: std::net::SocketAddr,
    worker: &mut Worker,
    backoff: &mut Backoff,
    answered: &mut bool,
    fatal: &mut Option<AgentError>,
) -> String {
    let hello = v1::Hello {
        jobs: worker.outboxes.all().iter().map(|outbox| outbox.announce()).collect(),
        ..connect::hello(&settings.worker_id)
    };
    // A new registration's credentials are stored while the connection is made (TCP and
    // mTLS), and are durable before `Hello`: a worker the hub lists has them, and a crash
    // cannot leave jobs run under credentials that are gone. The storing is taken only once it
    // has finished: a session that times out first leaves it to the next.
    let (identity, storing) = (&worker.identity, &mut worker.storing);
    let stored = async {
        let Some(handle) = storing.as_mut() else { return Ok(()) };
        let stored = handle.await.unwrap_or_else(|e| {
            Err(AgentError::WorkDir {
                action: "storing the credentials in",
                path: settings.work_dir.clone(),
                source: std::io::Error::other(e),
            })
        });
        *storing = None;
        stored
    };
    let opened = async {
        let tls = agent_client_config(&settings.ca_bundle_pem, Some(identity))?;
        let (channel, stored) = tokio::join!(connect::channel(address, tls), stored);
        if let Err(error) = stored {
            return Ok(Err(error));
        }
        connect::start_session(channel?, hello).await.map(Ok)
    };
    let Session { welcome, sender, mut receiver, .. } = match tokio::time::timeout(OPEN_TIMEOUT, opened).await
    {
        Ok(Ok(Ok(session))) => session,
        Ok(Ok(Err(error))) => {
            *fatal = Some(error);
            return "the registration's key and certificate could not be stored".to_owned();
        }
        Ok(Err(e)) => return format!("the session could not be opened: {e}"),
        Err(_) => return format!("the session did not open within {OPEN_TIMEOUT:?}"),
    };
    say(settings.status_to_stderr, format_args!("session open as {} at {address}", settings.worker_id));
    // A session that opened is a success: the next failure starts the backoff over.
    backoff.reset();
    *answered = true;
    let max_held = crate::protocol::negotiate_max_held_bytes(MAX_HELD_BYTES as u64, welcome.max_held_bytes);
    worker.outboxes.set_max_held(usize::try_from(max_held).unwrap_or(MAX_HELD_BYTES));
    for stored in &welcome.resume {
        worker.outboxes.ack(stored);
    }
    // A zero interval would spin; the hub never sends one, but it is not ours to trust.
    let period = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
    // The hub answers every heartbeat: past this without a word from it, it is gone even if the
    // connection is not (a stopped process, a network that drops packets silently).
    let silence = Duration::from_millis(welcome.heartbeat_timeout_ms).max(period * 2);
    let mut heard = tokio::time::Instant::now();
    // The hub sets the batch limits; the runner applies its own floors to nonsense values.
    let batch = BatchLimits {
        max_bytes: usize::try_from(welcome.log_batch_max_bytes).unwrap_or(usize::MAX),
        max_delay: Duration::from_millis(welcome.log_batch_max_delay_ms),
    };
    let runner = JobRunner::new(
        RunnerConfig::default().batch(batch).jobs_die_with_process(settings.jobs_die_with_process),
    );
    let (control, control_rx) = mpsc::unbounded_channel();
    // Sending runs in its own task, so that this loop always reads the hub's messages: if both
    // sides could block on sending at once, a full stream each way would deadlock them.
    let mut pump = AbortOnDrop(tokio::spawn(pump(
        worker.outboxes.clone(),
        sender,
        control_rx,
        period,
        batch.max_bytes.max(1),
    )));
    worker.rotating = None;
    worker.rotation_asked = false;
    loop {
        let renew_in = worker.certificate.renew_at().duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = &mut pump.0 => return "the session closed".to_owned(),
            () = tokio::time::sleep_until(heard + silence) => {
                *answered = false;
                return format!("the control plane said nothing for {silence:?}");
            }
            () = tokio::time::sleep(renew_in), if !worker.rotation_asked => {
                if let Err(ended) = worker.ask_rotation(settings, &control) {
                    return ended;
                }
            }
            message = receiver.message() => match message {
                Ok(Some(message)) => {
                    heard = tokio::time::Instant::now();
                    match message.kind {
                    Some(hub_message::Kind::Heartbeat(_)) => tracing::trace!("heartbeat answered"),
                    Some(hub_message::Kind::Assign(assign)) => match assign.spec {
                        Some(spec) => worker.start(&runner, spec),
                        None => tracing::warn!("AssignJob without a spec ignored"),
                    },
                    Some(hub_message::Kind::Cancel(cancel)) => worker.cancel(cancel),
                    Some(hub_message::Kind::LogAck(ack)) => worker.outboxes.ack(&ack),
                    Some(hub_message::Kind::ResultAck(ack)) => {
                        if worker.outboxes.result_acked(&ack.job_id) {
                            tracing::debug!(job = %ack.job_id, "job delivered");
                        }
                    }
                    Some(hub_message::Kind::Rotate(response)) => match worker.rotated(settings, response) {
                        Ok(()) => say(settings.status_to_stderr, format_args!(
                            "certificate rotated; valid until {:?}",
                            worker.certificate.not_after
                        )),
                        Err(e) => say(settings.status_to_stderr, format_args!("certificate rotation refused: {e}")),
                    },
                    other => tracing::warn!(message = ?other, "hub message not handled; ignored"),
                    }
                }
                Ok(None) => return "the control plane ended the session".to_owned(),
                Err(status) => return format!("the session failed: {}", status.message()),
            },
        }
    }
}

/// Aborts its task when dropped, so that a session's sender never outlives the session.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
