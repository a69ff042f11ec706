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

/// Where the middle step of `release` holds: it says it was reached, then waits to resume.
#[derive(Clone, Default)]
struct Hold {
    reached: Arc<Notify>,
    resume: Arc<Notify>,
}

/// A three-step saga whose middle step holds when given a `hold`.
fn release(effects: &Effects, hold: Option<Hold>) -> hodei_core::SagaDefinition {
    let effects = effects.clone();
    saga("release", 1, move |ctx, version: u32| {
        let (effects, hold) = (effects.clone(), hold.clone());
        async move {
            let mut total = version;
            for name in ["compile", "package", "publish"] {
                let (effects, hold) = (effects.clone(), hold.clone());
                total = ctx
                    .step(name)
                    .input(total)
                    .run(move |_, n: u32| {
                        let (effects, hold) = (effects.clone(), hold.clone());
                        async move {
                            effects.push(name.to_string());
                            if let Some(hold) = hold.filter(|_| name == "package") {
                                hold.reached.notify_one();
                                hold.resume.notified().await;
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
    let hold = Hold::default();
    let engine = Engine::builder()
        .store(PostgresStore::connect_with(&db.url, db.options()).await.unwrap())
        .register(release(&effects, Some(hold.clone())))
        .start()
        .await
        .unwrap();
    engine.start(SagaRun::new("release", "r1", &7u32).unwrap()).await.unwrap();
    hold.reached.notified().await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);
    assert_eq!(effects.take(), ["compile", "package"]);

    let store = PostgresStore::connect_with(&db.url, PostgresOptions::default().schema(db.schema.clone()))
        .await
        .unwrap();
    let engine = Engine::builder().store(store).register(release(&effects, None)).start().await.unwrap();
    let run = engine.handle(&SagaId::new("r1").unwrap()).unwrap();
    assert_eq!(run.outcome::<u32>().await.unwrap(), Outcome::Completed(7_000));
    assert_eq!(effects.take(), ["package", "publish"], "compile was journaled: it did not run again");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Two engines on one database. The first stalls in a step past its lease (here: its lease is
/// ended by hand, and it is too long for the engine to renew it meanwhile); the second takes
/// the saga over at its next beat and finishes it, without running the journaled step again.
/// When the stalled step of the first returns, its write is refused and it stops driving the
/// saga. Along the journal the epochs never go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_of_a_stalled_engine_is_finished_by_another_and_the_zombie_is_fenced() {
    let Some(db) = TestDatabase::new("takeover") else { return };
    let (stalled_effects, heir_effects) = (Effects::default(), Effects::default());
    let hold = Hold::default();
    let stalled_store =
        PostgresStore::connect_with(&db.url, db.options().lease(Duration::from_secs(86_400))).await.unwrap();
    let stalled_id = stalled_store.engine_id().to_owned();
    let stalled = Engine::builder()
        .store(stalled_store)
        .register(release(&stalled_effects, Some(hold.clone())))
        .start()
        .await
        .unwrap();
    let heir = Engine::builder()
        .store(
            PostgresStore::connect_with(&db.url, db.options().lease(Duration::from_millis(500)))
                .await
                .unwrap(),
        )
        .register(release(&heir_effects, None))
        .start()
        .await
        .unwrap();
    let id = SagaId::new("r1").unwrap();
    stalled.start(SagaRun::new("release", "r1", &7u32).unwrap()).await.unwrap();
    hold.reached.notified().await;

    db.lapse(&stalled_id).await;
    let admin = db.admin().await;
    let outcome = heir.handle(&id).unwrap().outcome::<u32>().await;
    assert_eq!(outcome.unwrap(), Outcome::Completed(7_000));
    assert_eq!(heir_effects.take(), ["package", "publish"], "compile was journaled: it did not run again");

    // The zombie's step returns; its write is refused, and it lets the saga go. Its handle
    // then finds the outcome the heir journaled.
    let on_stalled = stalled.handle(&id).unwrap();
    hold.resume.notify_one();
    assert_eq!(on_stalled.outcome::<u32>().await.unwrap(), Outcome::Completed(7_000));
    assert_eq!(stalled_effects.take(), ["compile", "package"]);
    assert!(stalled.census().runs.is_empty(), "{:?}", stalled.census());
    let rows = admin
        .query("SELECT seq, epoch FROM hodei_events WHERE saga_id = 'r1' ORDER BY seq", &[])
        .await
        .unwrap();
    let epochs: Vec<i64> = rows.iter().map(|row| row.get(1)).collect();
    assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "epochs went back: {epochs:?}");
    assert_eq!((epochs.first(), epochs.last()), (Some(&1), Some(&2)), "{epochs:?}");
    let completed = heir.history(&id).unwrap();
    let steps_done =
        completed.iter().filter(|r| matches!(r.event, hodei_core::Event::StepCompleted { .. })).count();
    assert_eq!(steps_done, 3, "each step completed once: the zombie's completion was refused");
    heir.shutdown(Duration::from_secs(5)).await.unwrap();
    stalled.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Operators' requests reach a saga from any engine: a signal and a pause sent through an
/// engine that does not drive the saga are posted for its owner, which applies each exactly
/// once (the request is deleted by the very write that journals it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_through_another_engine_reach_the_saga_once() {
    let Some(db) = TestDatabase::new("requests") else { return };
    let approval = || {
        saga("approval", 1, |ctx, (): ()| async move {
            let approver: String = ctx.wait_signal("approve").await?;
            Ok(approver)
        })
    };
    let engine = |lease| {
        let options = db.options().lease(lease);
        let url = db.url.clone();
        async move {
            Engine::builder()
                .store(PostgresStore::connect_with(&url, options).await.unwrap())
                .register(approval())
                .start()
                .await
                .unwrap()
        }
    };
    // The owner's beat is a day: only the notification can bring the request in time.
    let owner = engine(Duration::from_secs(86_400)).await;
    // The other's beats bring what it follows of a run driven elsewhere.
    let other = engine(Duration::from_millis(500)).await;
    let id = SagaId::new("a1").unwrap();
    owner.start(SagaRun::new("approval", "a1", &()).unwrap()).await.unwrap();

    // Followed from the engine that does not drive it: the journal as it grows, to its end.
    let mut follower = other.follow(&id, 0).unwrap();
    let followed = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(recorded) = follower.next().await {
            seen.push(recorded.unwrap());
        }
        seen
    });
    other.pause(&id, "ops").await.unwrap();
    other.resume(&id, "ops").await.unwrap();
    other.signal_as(&id, "approve", &"alice".to_string(), "alice").await.unwrap();
    let outcome = owner.handle(&id).unwrap().outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Completed("alice".to_string()));

    let history = owner.history(&id).unwrap();
    let applied: Vec<&'static str> = history
        .iter()
        .filter_map(|r| match &r.event {
            hodei_core::Event::Paused { .. } => Some("paused"),
            hodei_core::Event::Resumed { .. } => Some("resumed"),
            hodei_core::Event::SignalReceivedBy { by, .. } if by == "alice" => Some("signal"),
            _ => None,
        })
        .collect();
    assert_eq!(applied, ["paused", "resumed", "signal"], "each request once, in order");
    assert_eq!(followed.await.unwrap(), history, "the other engine followed every event to the end");
    let admin = db.admin().await;
    let left: i64 = admin.query_one("SELECT count(*) FROM hodei_requests", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "every applied request was deleted with its write");
    let err = other.signal(&id, "approve", &"late".to_string()).await.unwrap_err();
    assert!(matches!(err, hodei_core::Error::SagaFinished(_)), "{err:?}");
    other.shutdown(Duration::from_secs(5)).await.unwrap();
    owner.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A durable timer survives a takeover: the saga's new owner fires it at its journaled time,
/// and the stalled owner's own firing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_fires_on_the_new_owner_at_its_journaled_time() {
    let Some(db) = TestDatabase::new("timer takeover") else { return };
    let soak = || {
        saga("soak", 1, |ctx, (): ()| async move {
            ctx.sleep(Duration::from_millis(1_500)).await;
            Ok(())
        })
    };
    let stalled_store =
        PostgresStore::connect_with(&db.url, db.options().lease(Duration::from_secs(86_400))).await.unwrap();
    let stalled_id = stalled_store.engine_id().to_owned();
    let stalled = Engine::builder().store(stalled_store).register(soak()).start().await.unwrap();
    let mut journaled = stalled.subscribe();
    let id = SagaId::new("s1").unwrap();
    stalled.start(SagaRun::new("soak", "s1", &()).unwrap()).await.unwrap();
    let due = loop {
        let event = journaled.recv().await.unwrap();
        if let hodei_core::EngineEventKind::Journaled(recorded) = event.kind
            && let hodei_core::Event::TimerStarted { due, .. } = recorded.event
        {
            break due;
        }
    };

    db.lapse(&stalled_id).await;
    let admin = db.admin().await;
    let heir_store =
        PostgresStore::connect_with(&db.url, db.options().lease(Duration::from_millis(500))).await.unwrap();
    let heir = Engine::builder().store(heir_store).register(soak()).start().await.unwrap();
    assert_eq!(heir.handle(&id).unwrap().outcome::<()>().await.unwrap(), Outcome::Completed(()));

    let history = heir.history(&id).unwrap();
    let fired = history.iter().find(|r| matches!(r.event, hodei_core::Event::TimerFired { .. })).unwrap();
    assert!(fired.at >= due, "fired at {:?}, before its journaled due time {due:?}", fired.at);
    let epoch: i64 = admin
        .query_one("SELECT epoch FROM hodei_events WHERE saga_id = 's1' AND seq = $1", &[&(fired.seq as i64)])
        .await
        .unwrap()
        .get(0);
    assert_eq!(epoch, 2, "the heir journaled the firing");
    // The stalled engine's own firing is refused; its handle finds the heir's outcome.
    assert_eq!(stalled.handle(&id).unwrap().outcome::<()>().await.unwrap(), Outcome::Completed(()));
    heir.shutdown(Duration::from_secs(5)).await.unwrap();
    stalled.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The database drops the engine's connections (as in a restart) while a step runs: the step's
/// completion cannot be written, and the saga is not parked for it. It is resumed from the
/// journal the database holds at the next beat; the step whose end was lost runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_write_failed_resumes_once_the_database_answers_again() {
    let Some(db) = TestDatabase::new("db restart") else { return };
    // A name of its own, so that the test ends only its own engine's connections.
    let application = db.schema.clone();
    let url = format!("{}?application_name={application}", db.url);
    let effects = Effects::default();
    let hold = Hold::default();
    let engine = Engine::builder()
        .store(
            PostgresStore::connect_with(&url, db.options().lease(Duration::from_millis(500))).await.unwrap(),
        )
        .register(release(&effects, Some(hold.clone())))
        .start()
        .await
        .unwrap();
    let id = SagaId::new("r1").unwrap();
    engine.start(SagaRun::new("release", "r1", &7u32).unwrap()).await.unwrap();
    hold.reached.notified().await;

    let admin = db.admin().await;
    let ended = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&application],
        )
        .await
        .unwrap();
    assert!(!ended.is_empty(), "the engine's connections were found");
    hold.resume.notify_one();
    // The step's end was not written: it runs again once the saga resumes.
    hold.reached.notified().await;
    hold.resume.notify_one();
    assert_eq!(engine.handle(&id).unwrap().outcome::<u32>().await.unwrap(), Outcome::Completed(7_000));
    assert_eq!(effects.take(), ["compile", "package", "package", "publish"]);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A parent and the child it waits for, each taken over by a different engine: the parent's
/// heir re-attaches to the child (one child, never a second), waits for its outcome journaled
/// by the other heir, and goes on. Two heirs claim the stalled engine's two sagas by share;
/// which heir takes which is theirs to race, so the scenario is run until the pair was split
/// between them (each run asserting the whole outcome), at most five times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_and_its_child_taken_over_by_two_engines_finish_together() {
    let mut split = 0;
    for attempt in 0..5 {
        let Some(db) = TestDatabase::new(&format!("child takeover {attempt}")) else { return };
        split += usize::from(parent_and_child_taken_over(&db).await);
        if split > 0 {
            println!("the pair split between the heirs in run {}", attempt + 1);
            break;
        }
    }
    assert!(split > 0, "in five runs, one heir took both the parent and the child each time");
}

/// One run of the scenario above; true if the parent and the child ended on different heirs.
async fn parent_and_child_taken_over(db: &TestDatabase) -> bool {
    let (reached_tx, mut reached) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Each run of the parent's body, on whichever engine: the stalled one's, then its heir's.
    let (parent_runs_tx, mut parent_runs) = tokio::sync::mpsc::unbounded_channel::<()>();
    let gate = tokio::sync::watch::Sender::new(false);
    let definitions = |effects: &Effects| {
        let (child_effects, parent_effects) = (effects.clone(), effects.clone());
        let (gate, reached_tx, parent_runs_tx) = (gate.clone(), reached_tx.clone(), parent_runs_tx.clone());
        let child = saga("unit", 1, move |ctx, n: u32| {
            let (effects, gate, reached_tx) = (child_effects.clone(), gate.clone(), reached_tx.clone());
            async move {
                ctx.step("inner")
                    .run(move |_, ()| {
                        let (effects, gate, reached_tx) = (effects.clone(), gate.clone(), reached_tx.clone());
                        async move {
                            effects.push(format!("inner {n}"));
                            let _ = reached_tx.send(());
                            let _ = gate.subscribe().wait_for(|open| *open).await;
                            Ok::<_, StepError>(n * 10)
                        }
                    })
                    .await
            }
        });
        let parent = saga("suite", 1, move |ctx, n: u32| {
            let (effects, parent_runs_tx) = (parent_effects.clone(), parent_runs_tx.clone());
            async move {
                let _ = parent_runs_tx.send(());
                let record = |name: &'static str| {
                    let effects = effects.clone();
                    move |_, ()| {
                        effects.push(format!("{name} {n}"));
                        std::future::ready(Ok::<_, StepError>(()))
                    }
                };
                ctx.step("before").run(record("before")).await?;
                let built: u32 = ctx.child(SagaRun::new("unit", format!("c-{n}"), &n).unwrap()).await?;
                ctx.step("after").run(record("after")).await?;
                Ok(built + 1)
            }
        });
        [parent, child]
    };
    let engine = |lease, effects: &Effects| {
        let (options, url, [parent, child]) =
            (db.options().lease(lease), db.url.clone(), definitions(effects));
        async move {
            let store = PostgresStore::connect_with(&url, options).await.unwrap();
            let id = store.engine_id().to_owned();
            (Engine::builder().store(store).register(parent).register(child).start().await.unwrap(), id)
        }
    };
    let effects = [Effects::default(), Effects::default(), Effects::default()];
    let (stalled, stalled_id) = engine(Duration::from_secs(86_400), &effects[0]).await;
    let heirs = [
        engine(Duration::from_millis(500), &effects[1]).await.0,
        engine(Duration::from_millis(500), &effects[2]).await.0,
    ];
    let parent = SagaId::new("p-1").unwrap();
    stalled.start(SagaRun::new("suite", "p-1", &1u32).unwrap()).await.unwrap();
    reached.recv().await.unwrap();
    parent_runs.recv().await.unwrap();

    db.lapse(&stalled_id).await;
    // A heir claimed the child and reached its step again, and a heir claimed the parent and
    // runs it: only now may the stalled engine's step return, and its write is refused. Were
    // the parent still the stalled engine's when the child finished, that engine would go on
    // to the parent's next step, whose start it could still journal.
    reached.recv().await.unwrap();
    parent_runs.recv().await.unwrap();
    gate.send_replace(true);
    let outcome = heirs[0].handle(&parent).unwrap().outcome::<u32>().await.unwrap();
    assert_eq!(outcome, Outcome::Completed(11));
    let child = SagaId::new("c-1").unwrap();
    assert_eq!(heirs[1].handle(&child).unwrap().outcome::<u32>().await.unwrap(), Outcome::Completed(10));

    let [on_stalled, first, second] = effects.each_ref().map(Effects::take);
    assert_eq!(on_stalled, ["before 1", "inner 1"], "the stalled engine got as far as the child's step");
    let ran = |effect: &str| [&first, &second].map(|heir| heir.iter().filter(|e| *e == effect).count());
    assert_eq!(ran("before 1"), [0, 0], "the parent's journaled step did not run again");
    let inner = ran("inner 1");
    let after = ran("after 1");
    assert_eq!(inner.iter().sum::<usize>(), 1, "the child's step ran again once, on one heir: {inner:?}");
    assert_eq!(after.iter().sum::<usize>(), 1, "the parent's last step ran once: {after:?}");
    // One child, started once: the heir re-attached to it rather than starting another.
    let history = heirs[0].history(&parent).unwrap();
    let children_started =
        history.iter().filter(|r| r.event.step_start().is_some_and(|(_, name)| name == "child unit")).count();
    assert_eq!(children_started, 1, "{history:?}");
    let child_history = heirs[0].history(&child).unwrap();
    let finals = child_history.iter().filter(|r| r.event.is_final()).count();
    assert_eq!(finals, 1, "{child_history:?}");
    for heir in heirs {
        heir.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    stalled.shutdown(Duration::from_secs(5)).await.unwrap();
    inner != after
}
