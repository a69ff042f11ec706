use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::compensation::{Compensate, IntoCompensation, NoCompensation, erase};
use super::context::SagaContext;
use crate::codec::{decode_payload, encode_payload, same_value};
use crate::driver::{CompensationSpec, StepOptions, StepSpec};
use crate::retry::{RetryPolicy, StepError};
use crate::stand_in::StandIns;
use crate::step_context::StepContext;

impl SagaContext {
    /// Starts building a step. Operations are numbered in the order the body (or the branch)
    /// calls them; the name and input of each step must match the journal on replay.
    pub fn step(&self, name: impl Into<String>) -> StepBuilder<'_, (), NoCompensation> {
        StepBuilder {
            ctx: self,
            name: name.into(),
            input: (),
            options: StepOptions::default(),
            compensation: NoCompensation,
        }
    }
}

/// Builds one step. Finish with [`run`](StepBuilder::run).
#[must_use = "a step does nothing until `.run(..).await`"]
pub struct StepBuilder<'c, I, C> {
    ctx: &'c SagaContext,
    name: String,
    input: I,
    options: StepOptions,
    compensation: C,
}

impl<I, C> fmt::Debug for StepBuilder<'_, I, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepBuilder")
            .field("name", &self.name)
            .field("retry", &self.options.retry)
            .field("timeout", &self.options.timeout)
            .finish_non_exhaustive()
    }
}

impl<'c, I, C> StepBuilder<'c, I, C> {
    /// The step's input: journaled, handed to the body on every attempt, and to the
    /// compensation.
    pub fn input<J>(self, input: J) -> StepBuilder<'c, J, C> {
        StepBuilder {
            ctx: self.ctx,
            name: self.name,
            input,
            options: self.options,
            compensation: self.compensation,
        }
    }

    /// The retry policy (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.options.retry = policy;
        self
    }

    /// A time limit per attempt. An attempt past it is cancelled and counts as a retryable
    /// failure.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.options.timeout = Some(limit);
        self
    }

    /// Whether an attempt cut off by a restart of this process uses up one of the step's
    /// attempts (default: yes, so that a step that kills its process cannot retry for ever).
    /// A step whose work runs elsewhere and is picked up again after a restart (a remote job
    /// re-attached to on its worker) turns it off: a control plane that restarts five times
    /// during a long job has not failed the job five times.
    pub fn interruptions_count(mut self, count: bool) -> Self {
        self.options.interruptions_count = count;
        self
    }

    /// How long a running attempt may go on once its saga, or its branch, is cancelled, to stop
    /// what it started: it learns of the cancel through [`StepContext::cancelled`], and is
    /// dropped when this time is up (default: at once). A remote job uses it to cancel its job
    /// and wait for the job's end.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.options.wind_down = grace;
        self
    }

    /// The step's compensation, run in reverse order if the saga later fails or is
    /// cancelled. It is retried under the step's retry policy.
    pub fn compensate<F>(self, run: F) -> StepBuilder<'c, I, Compensate<F>> {
        self.compensate_with(run, None)
    }

    /// Like [`compensate`](Self::compensate), with a retry policy of its own.
    pub fn compensate_retrying<F>(self, policy: RetryPolicy, run: F) -> StepBuilder<'c, I, Compensate<F>> {
        self.compensate_with(run, Some(policy))
    }

    fn compensate_with<F>(self, run: F, retry: Option<RetryPolicy>) -> StepBuilder<'c, I, Compensate<F>> {
        StepBuilder {
            ctx: self.ctx,
            name: self.name,
            input: self.input,
            options: self.options,
            compensation: Compensate { run, retry },
        }
    }

    /// Runs the step, or returns its journaled result on replay.
    ///
    /// The body may run more than once (retries, or a crash before its completion was
    /// recorded); it never runs again once its completion is recorded.
    pub async fn run<O, F, Fut>(self, body: F) -> Result<O, StepError>
    where
        I: Serialize + DeserializeOwned + Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        C: IntoCompensation<I, O>,
        F: Fn(StepContext, I) -> Fut + Send + Sync,
        Fut: Future<Output = Result<O, StepError>> + Send,
    {
        self.run_comparing(body, |recorded, input| same_value(recorded, input)).await
    }

    /// [`run`](Self::run), with how a journaled input is compared with this one on replay: for
    /// an input that holds a payload of its own (a child saga's run).
    pub(crate) async fn run_comparing<O, F, Fut, S>(self, body: F, same: S) -> Result<O, StepError>
    where
        I: Serialize + DeserializeOwned + Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        C: IntoCompensation<I, O>,
        F: Fn(StepContext, I) -> Fut + Send + Sync,
        Fut: Future<Output = Result<O, StepError>> + Send,
        S: FnOnce(&[u8], &I) -> Result<bool, String> + Send,
    {
        let shared = &self.ctx.shared;
        let input = encode_payload(&self.input).map_err(|e| {
            StepError::terminal(format!("step `{}`: the input does not encode: {e}", self.name))
        })?;
        let options = self.options;
        let mut compensation = self
            .compensation
            .into_spec(options.retry)
            .map(|(run, retry)| CompensationSpec { run, retry, timeout: options.timeout });
        // A test's stand-ins run instead of the body and the compensation; the journal cannot
        // tell them apart.
        let mut stand_in = None;
        if let Ok(stand_ins) = shared.host.resources.get::<StandIns>() {
            stand_in = stand_ins.body::<I, O>(&self.name).transpose().map_err(StepError::terminal)?;
            if let Some(found) = stand_ins.compensation::<I, O>(&self.name) {
                let found = found.map_err(StepError::terminal)?;
                let Some(spec) = compensation.as_mut() else {
                    let reason = format!(
                        "a stand-in compensation is registered for step `{}`, which has none",
                        self.name
                    );
                    return Err(StepError::terminal(reason));
                };
                spec.run = erase(move |ctx| found(ctx));
            }
        }
        let spec = StepSpec { name: self.name, input, options, compensation };
        let body = &body;
        let value = self.input;
        let same_input = move |recorded: &[u8]| same(recorded, &value);
        let (step, output) = shared
            .run_step(&self.ctx.scope, &spec, same_input, move |step_ctx: StepContext, input: &[u8]| {
                let input = decode_payload::<I>(input);
                let stand_in = stand_in.clone();
                async move {
                    let input = input
                        .map_err(|e| StepError::terminal(format!("the step input does not decode: {e}")))?;
                    let output = match stand_in {
                        Some(stand_in) => stand_in(step_ctx, input).await?,
                        None => body(step_ctx, input).await?,
                    };
                    encode_payload(&output)
                        .map_err(|e| StepError::terminal(format!("the step output does not encode: {e}")))
                }
            })
            .await?;
        match decode_payload::<O>(&output) {
            Ok(output) => Ok(output),
            Err(e) => {
                let reason = format!(
                    "step {step} `{}`: its journaled output does not decode as the type the code now expects: {e}",
                    spec.name
                );
                shared.park(reason).await
            }
        }
    }
}
