//! Following one pod with a watch, from a resource version the API server returned, until a
//! decision is taken on one of its versions: the provider never polls.

use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{WatchEvent, WatchParams};
use tokio::time::Instant;

use super::KubernetesProvider;
use crate::provider::ProviderError;

/// The longest watch the API server is asked for; it ends streams on its own after a while
/// anyway, and the provider re-watches from the last version seen.
const MAX_WATCH_SECONDS: u32 = 290;

/// What following a pod with a watch came to.
pub(super) enum Followed<T> {
    /// The decision taken on one of the pod's versions.
    Decided(T),
    /// The pod was deleted, or never existed.
    Gone,
    /// The deadline passed; the last version seen.
    TimedOut(Box<Pod>),
}

impl KubernetesProvider {
    /// Follows the pod `name` from `start` (a version the API server returned) until `decide`
    /// returns a decision on one of its versions, the pod is gone, or `deadline` passes.
    pub(super) async fn follow<T>(
        &self,
        name: &str,
        start: Pod,
        deadline: Instant,
        mut decide: impl FnMut(&Pod) -> Option<T>,
    ) -> Result<Followed<T>, ProviderError> {
        if let Some(decision) = decide(&start) {
            return Ok(Followed::Decided(decision));
        }
        let pods = self.pods();
        let selector = format!("metadata.name={name}");
        let mut version = start.metadata.resource_version.clone().unwrap_or_else(|| "0".to_owned());
        let mut last = start;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(Followed::TimedOut(Box::new(last)));
            }
            let seconds = u32::try_from(remaining.as_secs()).unwrap_or(u32::MAX).clamp(1, MAX_WATCH_SECONDS);
            let params = WatchParams::default().fields(&selector).timeout(seconds);
            // The version is too old to watch from (410 Gone, as the request's status or as an
            // event): the pod is read as it is now, then watched from there.
            let mut expired = false;
            let watched = tokio::time::timeout(remaining, async {
                let mut events = match pods.watch(&params, &version).await {
                    Ok(events) => Box::pin(events),
                    Err(kube::Error::Api(status)) if status.code == 410 => {
                        expired = true;
                        return Ok(None);
                    }
                    Err(e) => return Err(self.classify("watching the pod", e)),
                };
                while let Some(event) =
                    events.try_next().await.map_err(|e| self.classify("watching the pod", e))?
                {
                    match event {
                        WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                            if let Some(seen) = &pod.metadata.resource_version {
                                version.clone_from(seen);
                            }
                            if let Some(decision) = decide(&pod) {
                                return Ok(Some(Followed::Decided(decision)));
                            }
                            last = pod;
                        }
                        WatchEvent::Deleted(_) => return Ok(Some(Followed::Gone)),
                        WatchEvent::Bookmark(bookmark) => version = bookmark.metadata.resource_version,
                        WatchEvent::Error(status) if status.code == 410 => {
                            expired = true;
                            return Ok(None);
                        }
                        WatchEvent::Error(status) => {
                            return Err(self.classify("watching the pod", kube::Error::Api(status)));
                        }
                    }
                }
                // The API server ended the stream (its timeout): watch again from where it was.
                Ok::<_, ProviderError>(None)
            })
            .await;
            match watched {
                Ok(Ok(Some(followed))) => return Ok(followed),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(Followed::TimedOut(Box::new(last))),
            }
            if expired {
                let Some(pod) = pods.get_opt(name).await.map_err(|e| self.classify("reading the pod", e))?
                else {
                    return Ok(Followed::Gone);
                };
                version = pod.metadata.resource_version.clone().unwrap_or_default();
                if let Some(decision) = decide(&pod) {
                    return Ok(Followed::Decided(decision));
                }
                last = pod;
            }
        }
    }
}
