//! The sagas the operator API's tests (and the CLI's, through `#[path]`) run: a deploy gated by
//! an approval, and a saga that fails when told to, to fork it from its failure.

// Each test crate registers its own part of these.
#![allow(dead_code)]

use hodei_core::{
    CompensationContext, Engine, Event, RetryPolicy, SagaContext, SagaDefinition, SagaId, SledStore,
    StepError,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Deploy {
    pub service: String,
    /// Added in a later release of the saga: runs started before it read `None`.
    #[serde(default)]
    pub region: Option<String>,
}

/// What an approver sends: the dashboard builds a form for it from its traced schema (a text
/// field, an optional number, an optional choice whose one variant has a field of its own).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Approval {
    pub comment: String,
    pub ticket: Option<u32>,
    pub risk: Option<Risk>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    Low,
    High { mitigation: String },
}

/// A deploy gated by an `approval` signal, with a compensated staging step.
pub fn gated() -> SagaDefinition {
    SagaDefinition::new("gated", 1, |ctx: SagaContext, deploy: Deploy| async move {
        let staged = ctx
            .step("stage")
            .input(deploy.service.clone())
            .compensate(|_: CompensationContext<String, String>| async move { Ok(()) })
            .run(|_, service: String| async move { Ok::<_, StepError>(format!("{service} on staging")) })
            .await?;
        let approval: Approval = ctx.wait_signal("approval").await?;
        let region = deploy.region.unwrap_or_else(|| "default".into());
        ctx.step("release")
            .input((staged, region))
            .run(|_, (staged, region): (String, String)| async move {
                Ok::<_, StepError>(format!("{staged}, released in {region}"))
            })
            .await
            .map(|released| format!("{released} ({})", approval.comment))
    })
}

/// A saga that fails at its second step, so that it can be forked from the failure.
pub fn flaky() -> SagaDefinition {
    SagaDefinition::new("flaky", 1, |ctx: SagaContext, fail: bool| async move {
        let a = ctx.step("a").input(1u32).run(|_, n: u32| async move { Ok::<_, StepError>(n + 1) }).await?;
        ctx.step("b")
            .input((a, fail))
            .run(|_, (n, fail): (u32, bool)| async move {
                if fail { Err(StepError::terminal("b failed")) } else { Ok::<_, StepError>(n * 10) }
            })
            .await
    })
}

/// Runs `flaky` (told not to fail) as a child saga.
pub fn parent() -> SagaDefinition {
    SagaDefinition::new("parent", 1, |ctx: SagaContext, child_id: String| async move {
        let run = hodei_core::SagaRun::new("flaky", child_id, &false).map_err(StepError::terminal)?;
        ctx.child::<u32>(run).await
    })
}

/// A step whose first attempt fails and whose next is due an hour later: only an operator's
/// retry-now lets it complete within a test.
pub fn patient() -> SagaDefinition {
    SagaDefinition::new("patient", 1, |ctx: SagaContext, n: u32| async move {
        ctx.step("call")
            .input(n)
            .retry(RetryPolicy::attempts(2).initial_backoff(std::time::Duration::from_secs(3600)))
            .run(|step, n: u32| async move {
                if step.attempt == 1 { Err(StepError::retryable("503 from upstream")) } else { Ok(n + 1) }
            })
            .await
    })
}

/// An engine on the sled journal in `dir/journal`, running `definitions`: a deploy is another
/// engine on the same directory with other definitions.
pub async fn sled_engine(
    dir: &std::path::Path,
    definitions: impl IntoIterator<Item = SagaDefinition>,
) -> Engine {
    let mut builder = Engine::builder().store(SledStore::open(dir.join("journal")).unwrap());
    for definition in definitions {
        builder = builder.register(definition);
    }
    builder.start().await.unwrap()
}

/// Returns once run `id`'s journal holds an event that `reached` accepts: woken by the engine's
/// events, never by polling.
pub async fn journaled(engine: &Engine, id: &str, reached: impl Fn(&Event) -> bool) {
    let id = SagaId::new(id).unwrap();
    // Subscribed before the journal is read, so an event written in between still wakes us.
    let mut events = engine.subscribe();
    loop {
        if engine.history(&id).is_ok_and(|history| history.iter().any(|r| reached(&r.event))) {
            return;
        }
        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = events.recv().await {
            panic!("the engine stopped before run `{id}` got there");
        }
    }
}

/// Whether the event starts a wait for a signal.
pub fn signal_wait(event: &Event) -> bool {
    matches!(event, Event::SignalWaitStarted { .. })
}

/// Whether the event ends a run.
pub fn final_event(event: &Event) -> bool {
    event.is_final()
}

/// A rollout: `stage` (compensated), then a last step named `last` that, with `hang`, never
/// ends. A later deploy that renames `last` in the same version parks the runs it cut off there.
pub fn rollout(version: u32, last: &'static str, hang: bool) -> SagaDefinition {
    SagaDefinition::new("rollout", version, move |ctx: SagaContext, service: String| async move {
        let staged = ctx
            .step("stage")
            .input(service)
            .compensate(|_: CompensationContext<String, String>| async move { Ok(()) })
            .run(|_, service: String| async move { Ok::<_, StepError>(format!("{service} staged")) })
            .await?;
        ctx.step(last)
            .input(staged)
            .run(move |_, staged: String| async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok::<_, StepError>(format!("{staged}, {last}"))
            })
            .await
    })
}

/// A release: `fetch`, a wait for `go`, then `ship`. With `verify`, the code of a later build:
/// a `verify` step after `fetch`, behind the patch `verify-before-go`, so that the runs in flight
/// from before keep their path (the old one) and new runs take the new.
pub fn release(verify: bool) -> SagaDefinition {
    SagaDefinition::new("release", 1, move |ctx: SagaContext, version: String| async move {
        let fetched = ctx
            .step("fetch")
            .input(version)
            .run(|_, version: String| async move { Ok::<_, StepError>(format!("{version} fetched")) })
            .await?;
        if verify && ctx.patched("verify-before-go").await {
            ctx.step("verify")
                .input(fetched.clone())
                .run(|_, fetched: String| async move { Ok::<_, StepError>(fetched) })
                .await?;
        }
        ctx.wait_signal::<bool>("go").await?;
        ctx.step("ship")
            .input(fetched)
            .run(|_, fetched: String| async move { Ok::<_, StepError>(format!("{fetched}, shipped")) })
            .await
    })
}

/// Whether the event starts the step named `name`.
pub fn step_named(name: &str) -> impl Fn(&Event) -> bool + '_ {
    move |event| event.step_start().is_some_and(|(_, started)| started == name)
}

/// Returns once run `id` is parked, woken by the engine's events.
pub async fn parked(engine: &Engine, id: &str) {
    let id = SagaId::new(id).unwrap();
    // Subscribed before the status is read, so a park in between still wakes us.
    let mut events = engine.subscribe();
    while !matches!(engine.status(&id).unwrap().status, hodei_core::SagaStatus::Parked { .. }) {
        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = events.recv().await {
            panic!("the engine stopped before run `{id}` parked");
        }
    }
}
