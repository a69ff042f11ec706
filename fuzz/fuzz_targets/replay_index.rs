//! The journal's replay index, and the replay check built on it, on arbitrary journals: a
//! journal indexes or is refused with a reason, never a panic; a replay check of it answers
//! with a verdict or a typed error, and runs nothing.
//!
//! Input: the body of a journal file (bincode of its run id and events), sealed here with a
//! checksum that matches so that the bytes reach the decoder. The committed seeds are the
//! bodies of the journal fixtures (`hodei-core/tests/fixtures/journals`), and the sagas below
//! have the fixtures' names and shapes, so that mutated fixtures replay deep into their code.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use hodei_core::__fuzz::{RECORD_FORMAT_V2, index_for_replay, seal_record};
use hodei_core::{
    Branch, CompensationContext, Engine, JournalFile, MemoryStore, RetryPolicy, SagaContext, SagaDefinition,
    SagaFilter, SagaRun, StepContext, StepError,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A replay check runs no step: a body reached means the check went live.
async fn never_run<O>(_: StepContext, _: ()) -> Result<O, StepError> {
    panic!("a replay check ran a step")
}

async fn step<O>(ctx: &SagaContext, name: &str) -> Result<O, StepError>
where
    O: Serialize + DeserializeOwned + Send + 'static,
{
    ctx.step(name).run(never_run::<O>).await
}

fn compensation<O>(_: CompensationContext<(), O>) -> std::future::Ready<Result<(), StepError>> {
    panic!("a replay check ran a compensation")
}

/// The fixtures' sagas, by name, shape and types.
fn definitions() -> Vec<SagaDefinition> {
    vec![
        SagaDefinition::new("steps", 1, |ctx, _: u32| async move {
            step::<u32>(&ctx, "a").await?;
            step::<u32>(&ctx, "b").await
        }),
        SagaDefinition::new("retries", 1, |ctx, _: ()| async move {
            ctx.step("flaky")
                .retry(RetryPolicy::attempts(3).initial_backoff(Duration::from_secs(60)).jitter(0.0))
                .run(never_run::<u32>)
                .await
        }),
        SagaDefinition::new("compensation", 1, |ctx, _: ()| async move {
            ctx.step("reserve").compensate(compensation::<String>).run(never_run::<String>).await?;
            step::<()>(&ctx, "charge").await
        }),
        SagaDefinition::new("timers", 1, |ctx, _: ()| async move {
            ctx.sleep(Duration::from_secs(3600)).await;
            step::<()>(&ctx, "after").await
        }),
        SagaDefinition::new("signals", 1, |ctx, _: ()| async move {
            let approver: String = ctx.wait_signal("approve").await?;
            let second: Option<bool> = ctx.wait_signal_timeout("second", Duration::from_secs(600)).await?;
            Ok(format!("{approver} {second:?}"))
        }),
        SagaDefinition::new("branches", 1, |ctx, _: ()| async move {
            let builds = (0..2u32).map(|i| {
                Branch::new(
                    move |ctx: SagaContext| async move { step::<u32>(&ctx, &format!("build-{i}")).await },
                )
            });
            let all = ctx.all("build", builds.collect()).await?;
            let mirrors = vec![
                Branch::new(|ctx: SagaContext| async move { step::<u32>(&ctx, "fast").await }),
                Branch::new(|ctx: SagaContext| async move { step::<u32>(&ctx, "slow").await }),
            ];
            let (winner, _) = ctx.first("mirror", mirrors).await?;
            Ok(all.iter().sum::<u32>() + winner as u32)
        }),
        SagaDefinition::new("child", 1, |ctx, _: u32| async move { step::<u32>(&ctx, "double").await }),
        SagaDefinition::new("child-parent", 1, |ctx, _: ()| async move {
            let run = SagaRun::new("child", "child", &21u32).map_err(StepError::terminal)?;
            ctx.child::<u32>(run).await
        }),
        SagaDefinition::new("cancel", 1, |ctx, _: ()| async move {
            ctx.step("lock").compensate(compensation::<()>).run(never_run::<()>).await?;
            ctx.wait_signal::<bool>("never").await?;
            Ok(())
        }),
        SagaDefinition::new("fork", 1, |ctx, _: ()| async move {
            step::<u32>(&ctx, "prepare").await?;
            step::<u32>(&ctx, "release").await
        }),
        SagaDefinition::new("patch", 1, |ctx, _: ()| async move {
            if ctx.patched("extra-check").await {
                step::<()>(&ctx, "check").await?;
            }
            step::<()>(&ctx, "ship").await
        }),
    ]
}

struct Checker {
    runtime: tokio::runtime::Runtime,
    engine: Engine,
}

fn checker() -> &'static Checker {
    static CHECKER: OnceLock<Checker> = OnceLock::new();
    CHECKER.get_or_init(|| {
        // On a paused clock, which moves on whenever every task waits: a check that stalls
        // (a journal whose operations the code cannot reach) waits out its 10 s limit at once.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a Tokio runtime");
        let engine = runtime.block_on(async {
            let mut builder = Engine::builder().store(MemoryStore::new());
            for definition in definitions() {
                builder = builder.register(definition);
            }
            builder.start().await.expect("an engine")
        });
        Checker { runtime, engine }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(journal) = JournalFile::from_bytes(&seal_record(RECORD_FORMAT_V2, data)) else { return };
    let _ = index_for_replay(&journal.events);
    let Checker { runtime, engine } = checker();
    let _ = runtime.block_on(engine.check_journal(&journal.saga, &journal.events));
    let written = engine.list(&SagaFilter::default()).expect("the engine lists its runs");
    assert!(written.is_empty(), "a replay check wrote a run: {written:?}");
});
