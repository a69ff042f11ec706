//! Cancels asked on another control plane sharing the log store: a step whose saga runs on one
//! engine may wait for a job whose worker's session is with another ([`Hub::cancel_job`]
//! records the cancel in the database then). The control plane the session is with finds it
//! here and sends it on, as if asked itself.
//!
//! It looks only while its sessions run jobs, for those jobs alone (by primary key), twice a
//! second: an idle control plane asks the database nothing. A worker that moves to another
//! control plane before the cancel reached it is found there, since the request stays until
//! the job's result is stored.
//!
//! [`Hub::cancel_job`]: super::Hub::cancel_job

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::command::SessionCommand;
use super::registry::{Registry, jobs_snapshot};
use crate::logstore::LogStore;

/// How often the cancels of running jobs are looked for.
const RECHECK: Duration = Duration::from_millis(500);

/// Forwards the cancels recorded for the jobs this hub's sessions run, until `stopped`. Holds
/// the registry and the store weakly: a stopped control plane must not be kept by this task.
pub(super) async fn forward_cancels(
    registry: Weak<Registry>,
    logs: Weak<LogStore>,
    mut stopped: watch::Receiver<bool>,
) {
    // (worker, job) sent already: sent once per session's sight of the job.
    let mut forwarded: BTreeSet<(String, String)> = BTreeSet::new();
    let Some(mut workers) = registry.upgrade().map(|r| r.workers.subscribe()) else { return };
    loop {
        let running = jobs_snapshot(&workers.borrow_and_update());
        forwarded.retain(|(worker, job)| running.get(worker).is_some_and(|jobs| jobs.contains(job)));
        let jobs: Vec<String> = running.values().flatten().cloned().collect();
        if jobs.is_empty() {
            // Nothing runs here: wait for something to, without asking the database.
            tokio::select! {
                _ = stopped.wait_for(|stopped| *stopped) => return,
                changed = workers.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let Some(store) = logs.upgrade() else { return };
        let asked = store.cancels(&jobs).await;
        drop(store);
        match asked {
            Ok(asked) => {
                let Some(registry) = registry.upgrade() else { return };
                for (job, reason) in asked {
                    let Some((worker, _)) = running.iter().find(|(_, jobs)| jobs.contains(&job)) else {
                        continue;
                    };
                    if !forwarded.insert((worker.clone(), job.clone())) {
                        continue;
                    }
                    forward(&registry, worker, job, reason).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the cancels asked for running jobs failed"),
        }
        tokio::select! {
            _ = stopped.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

async fn forward(registry: &Arc<Registry>, worker: &str, job: String, reason: String) {
    let Some(commands) = registry.commands(worker) else { return };
    tracing::info!(worker, job = %job, "forwarding a cancel asked on another control plane");
    if commands.send(SessionCommand::Cancel { job_id: job, reason }).await.is_err() {
        tracing::debug!(worker, "the session ended before the cancel; its next one finds the request");
    }
}
