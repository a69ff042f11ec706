//! A saga's remote jobs, found again through its journal and the log store.

use super::attempt;
use crate::hub::{Hub, HubError};
use hodei_agent::protocol::v1;

/// One attempt of a remote job of a saga: which step ran it, and what became of it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SagaJob {
    /// The step's number in its saga.
    pub step: u32,
    /// The step's name; with ` rollback` for its rollback job.
    pub name: String,
    /// The step's operation key: its place in the saga's code (`2` at the top level, `1.0.0`
    /// for the first operation of branch 0 of the group at `1`).
    pub key: String,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The job's id, `saga id/key#attempt` (`saga id/key/rollback#attempt` for a rollback job):
    /// what the log store and the hub know it by.
    pub job_id: String,
    /// Its stored result, once it has ended.
    pub result: Option<v1::JobResult>,
}

/// The jobs of saga `saga` whose logs `hub` keeps, by step number then attempt, found through
/// the saga's journal (`history`, from `Engine::history`): the steps of its branches included,
/// whose job ids carry an operation key rather than the step number.
pub async fn saga_jobs(
    hub: &Hub,
    saga: &hodei_core::SagaId,
    history: &[hodei_core::RecordedEvent],
) -> Result<Vec<SagaJob>, HubError> {
    use hodei_core::Event;
    let Some(logs) = hub.logs() else { return Err(HubError::NoLogStore) };
    let stored =
        logs.jobs().await.map_err(|source| HubError::Logs { job_id: format!("{saga}/*"), source })?;
    let mut out = Vec::new();
    for recorded in history {
        let (step, key, name) = match &recorded.event {
            Event::StepStarted { step, name, .. } => (*step, step.to_string(), name),
            Event::StepStartedAt { step, key, name, .. } => (*step, key.clone(), name),
            _ => continue,
        };
        // The step's own job, then its rollback job's attempts.
        for (suffix, job_name) in [("", name.clone()), (attempt::ROLLBACK_SUFFIX, format!("{name} rollback"))]
        {
            let prefix = format!("{saga}/{key}{suffix}#");
            let mut attempts: Vec<(u32, &String)> = stored
                .iter()
                .filter_map(|job| Some((job.strip_prefix(&prefix)?.parse().ok()?, job)))
                .collect();
            attempts.sort();
            for (attempt, job_id) in attempts {
                let result = hub.stored_result(job_id).await?;
                out.push(SagaJob {
                    step,
                    name: job_name.clone(),
                    key: key.clone(),
                    attempt,
                    job_id: job_id.clone(),
                    result,
                });
            }
        }
    }
    // Stable: a step's rollback attempts stay after its own.
    out.sort_by_key(|job| job.step);
    Ok(out)
}
