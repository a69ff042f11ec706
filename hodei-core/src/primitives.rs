//! The durable primitives beyond steps: timers, signals, concurrent branches and child sagas.
//!
//! Each is journaled as its own operation, under a key that names its place in the code (see
//! [`Event`](crate::Event)), so it survives a crash exactly as a step does and replays
//! deterministically.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::codec::{PayloadCodec, decode_payload, payload_codec, tag_legacy};
use crate::driver::{BoxFuture, Scope};
use crate::engine::{Engine, Outcome};
use crate::error::Error;
use crate::event::{JoinMode, SagaId, Timestamp};
use crate::payload_schema::schema_of;
use crate::retry::{RetryPolicy, StepError};
use crate::saga::{CompensationContext, Saga, SagaContext, SagaRun};

/// One branch of a group run by [`SagaContext::all`] or [`SagaContext::first`]: an async
/// function of its own context, whose steps, timers and waits are journaled under the branch.
pub struct Branch<T> {
    run: Box<dyn FnOnce(SagaContext) -> BoxFuture<Result<T, StepError>> + Send>,
}

impl<T> fmt::Debug for Branch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Branch").finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Branch<T> {
    /// A branch from an async closure. Use the context it is given, not the saga's: that is
    /// what places its operations under the branch.
    pub fn new<F, Fut>(run: F) -> Self
    where
        F: FnOnce(SagaContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StepError>> + Send + 'static,
    {
        Self { run: Box::new(move |ctx| Box::pin(run(ctx))) }
    }
}

/// How a group was decided, from the journaled order in which its branches finished.
enum Decision {
    AllSucceeded,
    Failed(u32),
    Won(u32),
}

/// How long a group waits for the branches it cancelled to stop: each running step is bounded
/// by its own cancel grace; this bounds a branch that reaches no operation at all.
const BRANCH_WIND_DOWN_LIMIT: Duration = Duration::from_secs(60);

fn decide(mode: JoinMode, count: u32, order: &[(u32, bool)]) -> Option<Decision> {
    match mode {
        JoinMode::All => order
            .iter()
            .find(|(_, ok)| !ok)
            .map(|(branch, _)| Decision::Failed(*branch))
            .or_else(|| (order.len() == count as usize).then_some(Decision::AllSucceeded)),
        JoinMode::First => order.first().map(|(branch, _)| Decision::Won(*branch)),
    }
}

/// What a child saga step journals as its input: enough to start the child again, or to find
/// it, after a crash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ChildRun {
    id: SagaId,
    definition: String,
    version: Option<u32>,
    input: Vec<u8>,
}

impl SagaContext {
    /// Sleeps durably for `duration`. The due time is journaled: after a crash the saga wakes
    /// at the original due time, not at restart plus `duration`. Thousands of sleeping sagas
    /// cost no CPU: one engine-wide scheduler waits for the nearest due time.
    pub async fn sleep(&self, duration: Duration) {
        let due = self.shared.host.timers.clock().due_after(duration);
        self.shared.sleep_until(&self.scope, due).await
    }

    /// Sleeps durably until the wall-clock time `at` (at once if it has passed).
    pub async fn sleep_until(&self, at: SystemTime) {
        self.shared.sleep_until(&self.scope, Timestamp::at_or_after(at)).await
    }

    /// Waits for the signal `name` (see [`Engine::signal`]) and returns its payload. A signal
    /// sent before the saga reaches the wait is kept and taken here; each signal is taken by
    /// one wait, in the order they arrived.
    ///
    /// The wait journals the JSON Schema of `T`, traced from its `Deserialize` impl, so the
    /// dashboard offers a form for the payload (types it cannot trace, such as
    /// `serde_json::Value`, get a JSON box instead).
    pub async fn wait_signal<T: DeserializeOwned>(&self, name: &str) -> Result<T, StepError> {
        match self.shared.wait_signal(&self.scope, name, None, schema_of::<T>).await {
            Some(payload) => decode_signal(name, &payload),
            None => Err(StepError::terminal(format!("the wait for signal `{name}` ended without one"))),
        }
    }

    /// Like [`wait_signal`](Self::wait_signal), giving up after `timeout` with `Ok(None)`. The
    /// deadline is journaled when the wait begins, so a restart does not extend it.
    pub async fn wait_signal_timeout<T: DeserializeOwned>(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<T>, StepError> {
        match self.shared.wait_signal(&self.scope, name, Some(timeout), schema_of::<T>).await {
            Some(payload) => decode_signal(name, &payload).map(Some),
            None => Ok(None),
        }
    }

    /// Runs the branches concurrently and returns all their outputs, in branch order. The
    /// first branch to fail cancels the others (their running steps and jobs are cancelled)
    /// and its error is returned; every step any branch started stays on the compensation
    /// stack, so a failing saga undoes the branches that completed too.
    pub async fn all<T: Send + 'static>(
        &self,
        name: &str,
        branches: Vec<Branch<T>>,
    ) -> Result<Vec<T>, StepError> {
        self.join(name, JoinMode::All, usize::MAX, branches).await?.outputs()
    }

    /// Runs the branches concurrently; the first to finish decides, and the others are
    /// cancelled. Returns the winner's index with its output, or its error if it failed.
    pub async fn first<T: Send + 'static>(
        &self,
        name: &str,
        branches: Vec<Branch<T>>,
    ) -> Result<(usize, T), StepError> {
        if branches.is_empty() {
            return Err(StepError::terminal(format!("`{name}`: a race needs at least one branch")));
        }
        let count = branches.len();
        let mut results = self.join(name, JoinMode::First, count, branches).await?;
        match results.decision {
            Decision::Won(branch) => match results.results[branch as usize].take() {
                Some(Ok(value)) => Ok((branch as usize, value)),
                Some(Err(e)) => Err(e),
                None => Err(missing(branch)),
            },
            _ => Err(StepError::terminal(format!("`{name}`: the race ended without a winner"))),
        }
    }

    /// The same branch over each parameter, at most `limit` at once, fail-fast as
    /// [`all`](Self::all): a test matrix, say. Outputs come back in parameter order.
    pub async fn matrix<P, T, F, Fut>(
        &self,
        name: &str,
        params: Vec<P>,
        limit: usize,
        branch: F,
    ) -> Result<Vec<T>, StepError>
    where
        P: Send + 'static,
        T: Send + 'static,
        F: Fn(SagaContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, StepError>> + Send + 'static,
    {
        let branch = Arc::new(branch);
        let branches = params
            .into_iter()
            .map(|param| {
                let branch = branch.clone();
                Branch::new(move |ctx| branch(ctx, param))
            })
            .collect();
        self.join(name, JoinMode::All, limit.max(1), branches).await?.outputs()
    }

    /// Runs a group of branches and returns each one's result with the group's decision.
    async fn join<T: Send + 'static>(
        &self,
        name: &str,
        mode: JoinMode,
        limit: usize,
        branches: Vec<Branch<T>>,
    ) -> Result<Joined<T>, StepError> {
        let count = u32::try_from(branches.len())
            .map_err(|_| StepError::terminal(format!("`{name}`: too many branches")))?;
        let shared = self.shared.clone();
        let group = shared.open_group(&self.scope, name, count, mode).await;
        let listed: HashMap<u32, bool> = group.finished.iter().map(|(b, e)| (*b, e.is_none())).collect();
        let mut order: Vec<(u32, bool)> = group.finished.iter().map(|(b, e)| (*b, e.is_none())).collect();
        // A group the journal shows decided replays the branches that finished and freezes the
        // others where the first run cancelled them; it runs nothing live.
        let decided = decide(mode, count, &order).is_some();
        let mut frozen: HashSet<u32> =
            if decided { (0..count).filter(|b| !listed.contains_key(b)).collect() } else { HashSet::new() };
        let limit = if decided { usize::MAX } else { limit };
        let (stopped_tx, mut stopped_rx) = mpsc::unbounded_channel();
        let mut waiting: VecDeque<(u32, Branch<T>)> = (0..count).zip(branches).collect();
        let mut running = JoinSet::new();
        let mut indices = HashMap::new();
        let mut results: Vec<Option<Result<T, StepError>>> = (0..count).map(|_| None).collect();
        let mut unreplayed = listed.len();
        let mut staged = false;
        let mut scopes = HashMap::new();
        loop {
            while running.len() < limit {
                let Some((branch, run)) = waiting.pop_front() else { break };
                let scope = Scope::branch(
                    &self.scope,
                    &group.key,
                    branch,
                    frozen.contains(&branch),
                    stopped_tx.clone(),
                );
                scopes.insert(branch, scope.clone());
                let ctx = SagaContext { shared: shared.clone(), scope };
                let task = running.spawn((run.run)(ctx).in_current_span());
                indices.insert(task.id(), branch);
            }
            if unreplayed == 0
                && frozen.is_empty()
                && let Some(decision) = decide(mode, count, &order)
            {
                // The decision is durable before its effects: the branches it cancels, and the
                // body that sees the group's result (for `first`, which branch won; for `all`,
                // which failure came first, is only in these events).
                if staged {
                    shared.sync().await;
                }
                // The branches still running are cancelled, not dropped: each running step
                // journals its end and winds down (a job is cancelled and waited for), and each
                // branch stops before it would start anything more.
                let reason = match decision {
                    Decision::Failed(branch) => format!("branch {branch} of `{name}` failed"),
                    Decision::Won(branch) => format!("branch {branch} of `{name}` finished first"),
                    Decision::AllSucceeded => format!("`{name}` is decided"),
                };
                let cancelled: Vec<Arc<Scope>> =
                    indices.values().filter_map(|branch| scopes.get(branch).cloned()).collect();
                for scope in &cancelled {
                    scope.cancel(&reason);
                }
                // A branch with no step at work is dropped at once; the others once their steps
                // have journaled their ends and wound down.
                let wound_down = async {
                    for scope in &cancelled {
                        scope.idle().await;
                    }
                };
                if tokio::time::timeout(BRANCH_WIND_DOWN_LIMIT, wound_down).await.is_err() {
                    tracing::warn!(group = %name, "cancelled branches still at work; dropping them");
                }
                running.shutdown().await;
                return Ok(Joined { decision, results });
            }
            tokio::select! {
                joined = running.join_next_with_id() => {
                    let Some(joined) = joined else {
                        return Err(StepError::terminal(format!("`{name}`: the branches ended without a decision")));
                    };
                    let (id, result) = match joined {
                        Ok((id, result)) => (id, result),
                        Err(e) => {
                            let why = if e.is_panic() { "panicked" } else { "was cancelled" };
                            (e.id(), Err(StepError::terminal(format!("a branch of `{name}` {why}"))))
                        }
                    };
                    let Some(branch) = indices.remove(&id) else { continue };
                    if let Some(&ok) = listed.get(&branch) {
                        if ok != result.is_ok() {
                            return shared.branch_diverged(&group.key, branch, ok).await;
                        }
                        unreplayed -= 1;
                    } else if frozen.remove(&branch) {
                        // Cancelled in the first run just as it finished: not part of the decision.
                        continue;
                    } else {
                        let error = result.as_ref().err().map(|e| (e.message().to_string(), e.is_retryable()));
                        order.push((branch, error.is_none()));
                        shared.branch_finished(&group.key, branch, error).await;
                        staged = true;
                    }
                    results[branch as usize] = Some(result);
                }
                Some(branch) = stopped_rx.recv() => {
                    frozen.remove(&branch);
                }
            }
        }
    }

    /// Starts a child saga and waits for its outcome: its output, or an error if it failed.
    ///
    /// The child is journaled in the parent as a step (named `child <definition>`), so after a
    /// crash the parent re-attaches to the same child instead of starting another. The child
    /// is part of the parent's compensation: if the parent later fails or is cancelled, a
    /// running child is cancelled, and a completed one has its steps compensated.
    pub async fn child<O>(&self, run: SagaRun) -> Result<O, StepError>
    where
        O: Serialize + DeserializeOwned + Send + 'static,
    {
        let engine = Engine::hosting(&self.shared.host);
        let compensating = engine.clone();
        let comparing = engine.clone();
        // The child's input is a payload inside this step's input: compared as the child's
        // input type, as the child's own idempotent start compares it, not as bytes.
        let same = move |recorded: &[u8], new: &ChildRun| -> Result<bool, String> {
            let mut journaled: ChildRun = decode_payload(recorded)?;
            // Journaled before payload codecs: the inner payload is raw bincode too.
            if matches!(payload_codec(recorded), Ok(PayloadCodec::LegacyBincode)) {
                tag_legacy(&mut journaled.input);
            }
            if (&journaled.id, &journaled.definition, journaled.version)
                != (&new.id, &new.definition, new.version)
            {
                return Ok(false);
            }
            comparing.same_input(&new.definition, new.version, &journaled.input, &new.input)
        };
        let input = ChildRun {
            id: run.id.clone(),
            definition: run.definition.clone(),
            version: run.version,
            input: run.input.clone(),
        };
        // Re-attaching to a child is idempotent, so a restart while the child runs (or
        // compensates) must not use up attempts, as it does for a step that may have killed its
        // process: only the child's own end decides, and only storage errors are retried.
        let reattach = RetryPolicy::attempts(u32::MAX).max_backoff(Duration::from_secs(30));
        self.step(format!("child {}", run.definition))
            .input(input)
            .retry(reattach)
            .compensate_retrying(reattach, move |c: CompensationContext<ChildRun, O>| {
                let engine = compensating.clone();
                async move { engine.compensate_child(&c.input.id, &c.saga_id).await }
            })
            .run_comparing(move |step, child: ChildRun| {
                let engine = engine.clone();
                async move {
                    let run = SagaRun {
                        definition: child.definition,
                        version: child.version,
                        id: child.id.clone(),
                        input: child.input,
                    };
                    let handle = match engine.start(run).await {
                        Ok(handle) => handle,
                        // Shutting down: the parent resumes and re-attaches on the next start.
                        Err(Error::ShuttingDown) => return std::future::pending().await,
                        Err(e @ (Error::IdempotencyConflict { .. } | Error::UnknownSaga { .. })) => {
                            return Err(StepError::terminal(e.to_string()));
                        }
                        Err(e) => return Err(StepError::retryable(e.to_string())),
                    };
                    let mut shutdown = step.signals.shutdown.clone();
                    let stopping = async move {
                        let _ = shutdown.wait_for(|stopping| *stopping).await;
                    };
                    let outcome = tokio::select! {
                        outcome = handle.outcome::<O>() => outcome,
                        () = stopping => return std::future::pending().await,
                    };
                    match outcome {
                        Ok(Outcome::Completed(output)) => Ok(output),
                        Ok(Outcome::Compensated { cause } | Outcome::Failed { cause }) => {
                            Err(StepError::terminal(format!("child saga `{}` failed: {cause}", child.id)))
                        }
                        Ok(Outcome::CompensationFailed { step, error, .. }) => Err(StepError::terminal(format!(
                            "child saga `{}` failed, and the compensation of its step `{}` failed: {error}",
                            child.id, step.name
                        ))),
                        Err(Error::EngineStopped(_)) => std::future::pending().await,
                        Err(e) => Err(StepError::retryable(e.to_string())),
                    }
                }
            }, same)
            .await
    }

    /// [`child`](Self::child) for a saga made by `#[saga]`.
    pub async fn child_saga<S: Saga>(
        &self,
        id: impl Into<String>,
        input: &S::Input,
    ) -> Result<S::Output, StepError> {
        let run = SagaRun::new(S::NAME, id, input)
            .map_err(|e| StepError::terminal(e.to_string()))?
            .version(S::VERSION);
        self.child(run).await
    }
}

fn decode_signal<T: DeserializeOwned>(name: &str, payload: &[u8]) -> Result<T, StepError> {
    decode_payload(payload).map_err(|e| {
        StepError::terminal(format!(
            "the payload of signal `{name}` does not decode as the type the saga expects: {e}"
        ))
    })
}

fn missing(branch: u32) -> StepError {
    StepError::terminal(format!("branch {branch} has no result"))
}

struct Joined<T> {
    decision: Decision,
    results: Vec<Option<Result<T, StepError>>>,
}

impl<T> Joined<T> {
    /// An `All` group's outputs in branch order, or the error of the branch that decided it.
    fn outputs(mut self) -> Result<Vec<T>, StepError> {
        if let Decision::Failed(branch) = self.decision {
            return match self.results[branch as usize].take() {
                Some(Err(e)) => Err(e),
                _ => Err(missing(branch)),
            };
        }
        (0..)
            .zip(self.results)
            .map(|(branch, result)| result.unwrap_or_else(|| Err(missing(branch))))
            .collect()
    }
}
