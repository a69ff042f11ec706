//! The sagas the operator API's tests (and the CLI's, through `#[path]`) run: a deploy gated by
//! an approval, and a saga that fails when told to, to fork it from its failure.

use hodei_core::{CompensationContext, SagaContext, SagaDefinition, StepError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Deploy {
    pub service: String,
    /// Added in a later release of the saga: runs started before it read `None`.
    #[serde(default)]
    pub region: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Approval {
    pub comment: String,
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
