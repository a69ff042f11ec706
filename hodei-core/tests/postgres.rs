//! The engine on `PostgresStore`, on a real PostgreSQL: each test has a schema of its own,
//! dropped at its end (the store's own tests are its unit tests, in `src/store/postgres/`). Skipped (with a line saying so) without
//! `HODEI_TEST_POSTGRES_URL`; `eval "$(bash .ci/postgres)"` starts one and sets it.
#![cfg(feature = "postgres")]

mod support;

#[path = "../src/store/postgres/test_database.rs"]
mod test_database;

use std::sync::Arc;
use std::time::Duration;

use hodei_core::{Engine, Outcome, PostgresOptions, PostgresStore, SagaId, SagaRun, StepError};
use support::{Effects, saga};
use test_database::TestDatabase;
use tokio::sync::Notify;

/// A three-step saga whose middle step hangs in the first engine.
fn release(effects: &Effects, hang: bool, reached: Arc<Notify>) -> hodei_core::SagaDefinition {
    let effects = effects.clone();
    saga("release", 1, move |ctx, version: u32| {
        let (effects, reached) = (effects.clone(), reached.clone());
        async move {
            let mut total = version;
            for name in ["compile", "package", "publish"] {
                let (effects, reached) = (effects.clone(), reached.clone());
                total = ctx
                    .step(name)
                    .input(total)
                    .run(move |_, n: u32| {
                        let (effects, reached) = (effects.clone(), reached.clone());
                        async move {
                            effects.push(name.to_string());
                            if name == "package" && hang {
                                reached.notify_one();
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, StepError>(n * 10)
                        }
                    })
                    .await?;
            }
            Ok(total)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_on_postgres_resumes_a_saga_without_rerunning_its_journaled_steps() {
    let Some(db) = TestDatabase::new("engine") else { return };
    let effects = Effects::default();
    let reached = Arc::new(Notify::new());
    let engine = Engine::builder()
        .store(PostgresStore::connect_with(&db.url, db.options()).await.unwrap())
        .register(release(&effects, true, reached.clone()))
        .start()
        .await
        .unwrap();
    engine.start(SagaRun::new("release", "r1", &7u32).unwrap()).await.unwrap();
    reached.notified().await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);
    assert_eq!(effects.take(), ["compile", "package"]);

    let store = PostgresStore::connect_with(&db.url, PostgresOptions::default().schema(db.schema.clone()))
        .await
        .unwrap();
    let engine = Engine::builder()
        .store(store)
        .register(release(&effects, false, Arc::new(Notify::new())))
        .start()
        .await
        .unwrap();
    let run = engine.handle(&SagaId::new("r1").unwrap()).unwrap();
    assert_eq!(run.outcome::<u32>().await.unwrap(), Outcome::Completed(7_000));
    assert_eq!(effects.take(), ["package", "publish"], "compile was journaled: it did not run again");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}
