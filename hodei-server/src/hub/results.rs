//! The job results the log store keeps, and which of them a new attempt may take instead of
//! running: what both the callers' side and a session check before assigning a job.

use super::error::HubError;
use crate::logstore::{LogStore, LogStoreError};
use hodei_agent::protocol::v1;

/// The first reusable stored result among `job_ids`: a cancelled job's result is not reused,
/// because the hub cancels only jobs nobody waits for any more.
pub(super) async fn stored_result(
    logs: &LogStore,
    job_id: &str,
    previous: &[String],
) -> Result<Option<v1::JobResult>, HubError> {
    for job_id in std::iter::once(job_id).chain(previous.iter().map(String::as_str)) {
        if let Some(result) = read_result(logs, job_id).await?
            && !matches!(
                result.outcome,
                Some(v1::job_result::Outcome::Cancelled(_) | v1::job_result::Outcome::Lost(_))
            )
        {
            return Ok(Some(result));
        }
    }
    Ok(None)
}

pub(super) async fn read_result(logs: &LogStore, job_id: &str) -> Result<Option<v1::JobResult>, HubError> {
    use prost::Message as _;
    let logs_error = |source| HubError::Logs { job_id: job_id.to_owned(), source };
    let Some(bytes) = logs.result(job_id).await.map_err(logs_error)? else { return Ok(None) };
    v1::JobResult::decode(bytes.as_slice()).map(Some).map_err(|e| {
        logs_error(LogStoreError::CorruptState {
            path: job_id.into(),
            reason: format!("the stored result does not decode: {e}"),
        })
    })
}
