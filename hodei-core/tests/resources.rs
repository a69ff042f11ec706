//! Resources registered with the engine reach every place a saga runs, as the very value that
//! was registered: a saga body, a step, a compensation, the branches of a group and child
//! sagas. A type that was not registered is a typed error naming it, and a type registered
//! twice stops the engine from starting.

use std::any::type_name;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use hodei_core::{
    Branch, CompensationContext, Engine, EngineBuilder, Error, MemoryStore, Outcome, SagaContext,
    SagaDefinition, SagaRun, StepError,
};

/// A shared resource that counts its uses, so that a test sees which value a saga reached.
#[derive(Debug, Default)]
struct Counter(AtomicU32);

impl Counter {
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    fn uses(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A resource registered by value.
#[derive(Debug)]
struct Greeting(&'static str);

/// Never registered.
#[derive(Debug)]
struct Unregistered;

fn builder(counter: &Arc<Counter>) -> EngineBuilder {
    Engine::builder().store(MemoryStore::new()).resource_arc(counter.clone()).resource(Greeting("hello"))
}

/// Whether `got` is `expected` itself; counts the use on it.
fn reaches(got: Result<Arc<Counter>, Error>, expected: &Arc<Counter>) -> Result<bool, StepError> {
    let got = got.map_err(StepError::terminal)?;
    got.bump();
    Ok(Arc::ptr_eq(&got, expected))
}

/// The body's own use of the resource, then one step's, as (body, step).
async fn body_and_step(ctx: &SagaContext, expected: &Arc<Counter>) -> Result<(bool, bool), StepError> {
    let in_body = reaches(ctx.resource::<Counter>(), expected)?;
    let in_step = ctx
        .step("reach")
        .run(|step, ()| async move { reaches(step.resource::<Counter>(), expected) })
        .await?;
    Ok((in_body, in_step))
}

#[tokio::test]
async fn a_step_and_a_saga_body_reach_the_registered_resource_itself() {
    let counter = Arc::new(Counter::default());
    let expected = counter.clone();
    let definition = SagaDefinition::new("reach", 1, move |ctx, ()| {
        let expected = expected.clone();
        async move {
            let (in_body, in_step) = body_and_step(&ctx, &expected).await?;
            let greeting = ctx
                .step("greet")
                .run(|step, ()| async move {
                    Ok::<_, StepError>(step.resource::<Greeting>().map_err(StepError::terminal)?.0.to_owned())
                })
                .await?;
            Ok((in_body, in_step, greeting))
        }
    });
    let engine = builder(&counter).register(definition).start().await.unwrap();
    let saga = engine.start(SagaRun::new("reach", "reach-1", &()).unwrap()).await.unwrap();
    assert_eq!(
        saga.outcome::<(bool, bool, String)>().await.unwrap(),
        Outcome::Completed((true, true, "hello".to_owned()))
    );
    assert_eq!(counter.uses(), 2, "the body and the step each used the registered counter");
}

#[tokio::test]
async fn a_missing_resource_is_a_typed_error_naming_its_type() {
    let missing = |found: Result<Arc<Unregistered>, Error>| match found {
        Err(Error::MissingResource { type_name }) => Ok(type_name.to_owned()),
        other => Err(StepError::terminal(format!("expected MissingResource, got {other:?}"))),
    };
    let definition = SagaDefinition::new("missing", 1, move |ctx: SagaContext, ()| async move {
        let in_body = missing(ctx.resource::<Unregistered>())?;
        let in_step = ctx.step("reach").run(|step, ()| async move { missing(step.resource()) }).await?;
        Ok((in_body, in_step))
    });
    let counter = Arc::new(Counter::default());
    let engine = builder(&counter).register(definition).start().await.unwrap();
    let saga = engine.start(SagaRun::new("missing", "missing-1", &()).unwrap()).await.unwrap();
    let name = type_name::<Unregistered>().to_owned();
    assert_eq!(saga.outcome::<(String, String)>().await.unwrap(), Outcome::Completed((name.clone(), name)));
    let message = Error::MissingResource { type_name: type_name::<Unregistered>() }.to_string();
    assert!(message.contains(type_name::<Unregistered>()), "{message}");
}

#[tokio::test]
async fn branches_and_child_sagas_see_the_same_resources() {
    let counter = Arc::new(Counter::default());
    let expected = counter.clone();
    let child = SagaDefinition::new("kid", 1, move |ctx, ()| {
        let expected = expected.clone();
        async move { body_and_step(&ctx, &expected).await }
    });
    let expected = counter.clone();
    let parent = SagaDefinition::new("parent", 1, move |ctx: SagaContext, ()| {
        let expected = expected.clone();
        async move {
            let branches = (0..2)
                .map(|_| {
                    let expected = expected.clone();
                    Branch::new(move |ctx: SagaContext| async move { body_and_step(&ctx, &expected).await })
                })
                .collect();
            let mut seen = ctx.all("fan-out", branches).await?;
            seen.push(ctx.child(SagaRun::new("kid", "parent-kid", &()).unwrap()).await?);
            Ok(seen)
        }
    });
    let engine = builder(&counter).register(child).register(parent).start().await.unwrap();
    let saga = engine.start(SagaRun::new("parent", "parent", &()).unwrap()).await.unwrap();
    assert_eq!(saga.outcome::<Vec<(bool, bool)>>().await.unwrap(), Outcome::Completed(vec![(true, true); 3]));
    assert_eq!(counter.uses(), 6, "two branches and a child, each from its body and a step");
}

#[tokio::test]
async fn a_compensation_reaches_the_resources() {
    let counter = Arc::new(Counter::default());
    let expected = counter.clone();
    let definition = SagaDefinition::new("undo", 1, move |ctx: SagaContext, ()| {
        let expected = expected.clone();
        async move {
            ctx.step("do")
                .compensate(move |c: CompensationContext<(), ()>| {
                    let expected = expected.clone();
                    async move {
                        match reaches(c.resource::<Counter>(), &expected)? {
                            true => Ok(()),
                            false => Err(StepError::terminal("another counter")),
                        }
                    }
                })
                .run(|_, ()| async { Ok::<_, StepError>(()) })
                .await?;
            ctx.step("fail").run(|_, ()| async { Err::<(), _>(StepError::terminal("no")) }).await
        }
    });
    let engine = builder(&counter).register(definition).start().await.unwrap();
    let saga = engine.start(SagaRun::new("undo", "undo-1", &()).unwrap()).await.unwrap();
    assert_eq!(saga.outcome::<()>().await.unwrap(), Outcome::Compensated { cause: "no".into() });
    assert_eq!(counter.uses(), 1, "the compensation used the registered counter");
}

#[tokio::test]
async fn a_type_registered_twice_stops_the_start() {
    let started = Engine::builder()
        .store(MemoryStore::new())
        .resource(Counter::default())
        .resource(Greeting("hello"))
        .resource_arc(Arc::new(Counter::default()))
        .start()
        .await;
    match started {
        Err(Error::DuplicateResource { type_name: duplicate }) => {
            assert_eq!(duplicate, type_name::<Counter>())
        }
        other => panic!("expected DuplicateResource, got {other:?}"),
    }
}
