//! The agent's run loop: credentials once, then one session after another until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::backoff::Backoff;
use super::credentials::credentials;
use super::error::AgentError;
use super::outbox::Outboxes;
use super::session::session;
use super::settings::Settings;
use super::status::say;
use super::worker::Worker;

/// The pause before trying the next control plane's address when one did not answer.
const NEXT_ADDRESS: Duration = Duration::from_millis(50);

/// The longest pause between sessions while the agent holds jobs (running, or whose output or
/// result the hub has not acknowledged).
const HOLDING_JOBS_MAX_DELAY: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` completes: registers if no valid certificate is stored, then
/// keeps a session open, sending heartbeats, and reconnects with backoff when it ends. Jobs
/// keep running while the control plane is unreachable; their output waits (bounded) and is
/// resent on the next session. When `shutdown` completes, running jobs are cancelled.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    settings.check_addresses()?;
    tokio::pin!(shutdown);
    let mut backoff = Backoff { policy: settings.backoff, attempt: 0 };
    let (identity, certificate, storing) = tokio::select! {
        () = &mut shutdown => return Ok(()),
        identity = credentials(&settings, &mut backoff) => identity?,
    };
    backoff.reset();
    let mut worker = Worker {
        identity,
        certificate,
        outboxes: Arc::new(Outboxes::default()),
        cancels: Arc::default(),
        tasks: JoinSet::new(),
        rotating: None,
        rotation_asked: false,
        status_to_stderr: settings.status_to_stderr,
        storing,
    };
    // The agent stays with the hub it reached; one where no session opens (its control plane
    // is gone, say), or that falls silent, sends it on to the next of those sharing the
    // database.
    let mut at = 0;
    // Addresses that did not answer since one last did: the rest of them are tried at once,
    // and the backoff applies once all have been.
    let mut unanswered = 0;
    loop {
        let address = settings.session_addrs[at % settings.session_addrs.len()];
        say(settings.status_to_stderr, format_args!("dialling the control plane's sessions at {address}"));
        let ended = tokio::select! {
            () = &mut shutdown => return Ok(()),
            ended = session(&settings, address, &mut worker, &mut backoff) => ended,
        };
        if let Some(fatal) = ended.fatal {
            return Err(fatal);
        }
        if ended.answered {
            unanswered = 0;
        } else {
            at += 1;
            unanswered += 1;
        }
        // Reap the tasks of jobs that are over, so the set does not grow with every job.
        while worker.tasks.try_join_next().is_some() {}
        let delay = if unanswered > 0 && unanswered % settings.session_addrs.len() != 0 {
            NEXT_ADDRESS
        } else if worker.outboxes.all().is_empty() {
            backoff.next()
        } else {
            // Steps wait for the jobs it holds, and give them up past the hub's worker wait.
            backoff.next().min(HOLDING_JOBS_MAX_DELAY)
        };
        say(settings.status_to_stderr, format_args!("{}; reconnecting in {delay:?}", ended.why));
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}
