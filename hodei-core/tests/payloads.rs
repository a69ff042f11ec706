//! User payloads are JSON with a codec byte: a saga's input type can gain an optional field
//! while runs are in flight, journals written with bincode payloads keep resuming, and runs and
//! signals can be given as JSON. Real engines on real sled directories.

mod support;

use std::path::Path;
use std::time::Duration;

use hodei_core::{
    Engine, EngineEventKind, Error, Event, Outcome, PayloadCodec, PayloadError, SagaDefinition, SagaHandle,
    SagaId, SagaRun, StepError, payload_codec, payload_to_json,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::{Effects, saga};

/// Turns a wait that can never end into a failure instead of a hung test run.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn id(id: &str) -> SagaId {
    SagaId::new(id).unwrap()
}

async fn open(dir: &Path, definitions: impl IntoIterator<Item = SagaDefinition>) -> Engine {
    let mut builder = Engine::builder().data_dir(dir);
    for definition in definitions {
        builder = builder.register(definition);
    }
    builder.start().await.unwrap()
}

async fn outcome_of<O: DeserializeOwned>(handle: &SagaHandle) -> Outcome<O> {
    tokio::time::timeout(HANG_GUARD, handle.outcome::<O>()).await.expect("the saga never ended").unwrap()
}

/// Waits until the engine journals an event of `saga` that `which` picks.
async fn journaled(
    events: &mut tokio::sync::broadcast::Receiver<hodei_core::EngineEvent>,
    saga: &SagaId,
    which: impl Fn(&Event) -> bool,
) {
    let wait = async {
        loop {
            let event = events.recv().await.unwrap();
            if event.saga_id == *saga
                && let EngineEventKind::Journaled(recorded) = &event.kind
                && which(&recorded.event)
            {
                return;
            }
        }
    };
    tokio::time::timeout(HANG_GUARD, wait).await.expect("the event was never journaled");
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RequestV1 {
    repo: String,
}

/// `RequestV1` after a deploy that added an optional field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RequestV2 {
    repo: String,
    branch: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Approval {
    by: String,
    ticket: u32,
}

/// Clones the repository in a step that takes the whole input, then waits for an approval.
fn clone_then_approve<I>(effects: &Effects, repo: fn(&I) -> String) -> SagaDefinition
where
    I: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let fx = effects.clone();
    saga("deploy", 1, move |ctx, input: I| {
        let fx = fx.clone();
        async move {
            let cloned = ctx
                .step("clone")
                .input(input)
                .run(|_, input: I| {
                    let fx = fx.clone();
                    async move {
                        fx.push(format!("clone {}", repo(&input)));
                        Ok::<_, StepError>(format!("cloned {}", repo(&input)))
                    }
                })
                .await?;
            let approval: Approval = ctx.wait_signal("approve").await?;
            Ok::<_, StepError>(format!("{cloned}, approved by {} in #{}", approval.by, approval.ticket))
        }
    })
}

#[tokio::test]
async fn an_input_type_that_gains_an_optional_field_resumes_its_runs_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let engine = open(dir.path(), [clone_then_approve::<RequestV1>(&effects, |r| r.repo.clone())]).await;
    let mut events = engine.subscribe();
    let run = SagaRun::new("deploy", "d1", &RequestV1 { repo: "hodei".into() }).unwrap();
    engine.start(run).await.unwrap();
    journaled(&mut events, &id("d1"), |e| matches!(e, Event::SignalWaitStarted { .. })).await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);

    let engine = open(dir.path(), [clone_then_approve::<RequestV2>(&effects, |r| r.repo.clone())]).await;
    // The same start again is the same run: the journaled input, decoded as the new type, is
    // this one.
    let same = SagaRun::new("deploy", "d1", &RequestV2 { repo: "hodei".into(), branch: None }).unwrap();
    engine.start(same).await.unwrap();
    let other =
        SagaRun::new("deploy", "d1", &RequestV2 { repo: "hodei".into(), branch: Some("main".into()) });
    match engine.start(other.unwrap()).await {
        Err(Error::IdempotencyConflict { difference, .. }) => assert_eq!(difference, "another input"),
        other => panic!("expected an idempotency conflict, got {other:?}"),
    }
    engine.signal(&id("d1"), "approve", &Approval { by: "ana".into(), ticket: 7 }).await.unwrap();
    let outcome = outcome_of::<String>(&engine.handle(&id("d1")).unwrap()).await;
    assert_eq!(outcome, Outcome::Completed("cloned hodei, approved by ana in #7".into()));
    // The step whose input is now a `RequestV2` was replayed, not run again (nor parked).
    assert_eq!(effects.take(), ["clone hodei"]);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn runs_and_signals_given_as_json_are_checked_against_the_definition_types() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let engine = open(dir.path(), [clone_then_approve::<RequestV2>(&effects, |r| r.repo.clone())]).await;

    let wrong = SagaRun::from_json("deploy", "bad", &json!({ "repository": "hodei" })).unwrap();
    match engine.start(wrong).await {
        Err(Error::InvalidInput { definition, version, reason }) => {
            assert_eq!((definition.as_str(), version), ("deploy", 1));
            assert!(reason.contains("missing field `repo`"), "{reason}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(
        matches!(engine.status(&id("bad")), Err(Error::SagaNotFound(_))),
        "a refused start writes nothing"
    );

    let run = SagaRun::from_json("deploy", "j1", &json!({ "repo": "hodei" })).unwrap();
    let handle = engine.start(run).await.unwrap();
    let history = engine.history(&id("j1")).unwrap();
    let Event::SagaStarted { input, .. } = &history[0].event else { panic!("{history:?}") };
    assert_eq!(payload_to_json(input).unwrap(), json!({ "repo": "hodei" }));

    engine.signal(&id("j1"), "approve", &json!({ "by": "bo", "ticket": 3 })).await.unwrap();
    assert_eq!(
        outcome_of::<String>(&handle).await,
        Outcome::Completed("cloned hodei, approved by bo in #3".into())
    );
    let history = engine.history(&id("j1")).unwrap();
    let Some(Event::SagaCompleted { output }) = history.last().map(|r| &r.event) else {
        panic!("{history:?}")
    };
    assert_eq!(payload_to_json(output).unwrap(), json!("cloned hodei, approved by bo in #3"));

    let definitions = engine.definitions();
    assert_eq!(definitions.iter().map(|d| (d.name.as_str(), d.version)).collect::<Vec<_>>(), [("deploy", 1)]);
    assert_eq!(definitions[0].shape, None);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_json_signal_that_does_not_fit_the_wait_fails_the_saga_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let engine = open(dir.path(), [clone_then_approve::<RequestV2>(&effects, |r| r.repo.clone())]).await;
    let run = SagaRun::from_json("deploy", "j2", &json!({ "repo": "hodei" })).unwrap();
    let handle = engine.start(run).await.unwrap();
    engine.signal(&id("j2"), "approve", &json!({ "by": "bo" })).await.unwrap();
    match outcome_of::<String>(&handle).await {
        Outcome::Failed { cause } => {
            assert!(cause.contains("signal `approve` does not decode") && cause.contains("ticket"), "{cause}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

// The journal of `tests/fixtures/legacy-v1`, written by the code of before payload codecs
// (commit 9870adb, `tests/gen_legacy.rs`), with these definitions: every record is format 1,
// every payload raw bincode. `done-1` completed; `deploy-1` took signal `approve` and waits
// for `second`.

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Done {
    summary: String,
    count: u64,
}

fn legacy_deploy(effects: &Effects) -> SagaDefinition {
    let fx = effects.clone();
    saga("legacy-deploy", 1, move |ctx, input: RequestV1| {
        let fx = fx.clone();
        async move {
            let fx1 = fx.clone();
            let sha = ctx
                .step("checkout")
                .input(input.repo.clone())
                .run(|_, repo: String| {
                    let fx = fx1.clone();
                    async move {
                        fx.push("checkout".into());
                        Ok::<_, StepError>(format!("{repo}@abc123"))
                    }
                })
                .await?;
            let first: Approval = ctx.wait_signal("approve").await?;
            let second: Approval = ctx.wait_signal("second").await?;
            ctx.step("deploy")
                .input((sha, first.by, second.by, first.ticket + second.ticket))
                .run(|_, (sha, a, b, t): (String, String, String, u32)| {
                    let fx = fx.clone();
                    async move {
                        fx.push("deploy".into());
                        Ok::<_, StepError>(Done {
                            summary: format!("{sha} approved by {a} and {b}"),
                            count: t as u64,
                        })
                    }
                })
                .await
        }
    })
}

fn legacy_done() -> SagaDefinition {
    saga("legacy-done", 1, |ctx, input: RequestV1| async move {
        let n = ctx
            .step("count")
            .input(input.repo.clone())
            .run(|_, r: String| async move { Ok::<_, StepError>(r.len() as u64) })
            .await?;
        Ok::<_, StepError>(Done { summary: format!("{} done", input.repo), count: n })
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn codecs(engine: &Engine, saga: &str) -> Vec<(&'static str, PayloadCodec)> {
    let payload = |event: &Event| -> Option<(&'static str, Vec<u8>)> {
        match event {
            Event::SagaStarted { input, .. } => Some(("SagaStarted", input.clone())),
            Event::StepStarted { input, .. } => Some(("StepStarted", input.clone())),
            Event::StepStartedAt { input, .. } => Some(("StepStartedAt", input.clone())),
            Event::StepCompleted { output, .. } => Some(("StepCompleted", output.clone())),
            Event::SignalReceived { payload, .. } => Some(("SignalReceived", payload.clone())),
            Event::SagaCompleted { output } => Some(("SagaCompleted", output.clone())),
            _ => None,
        }
    };
    let history = engine.history(&id(saga)).unwrap();
    history
        .iter()
        .filter_map(|r| payload(&r.event))
        .map(|(name, bytes)| (name, payload_codec(&bytes).unwrap()))
        .collect()
}

#[tokio::test]
async fn a_journal_written_with_bincode_payloads_resumes_and_its_payloads_decode() {
    use PayloadCodec::{Json, LegacyBincode};
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy-v1"), dir.path());
    let effects = Effects::default();
    let engine = open(dir.path(), [legacy_deploy(&effects), legacy_done()]).await;

    // A finished run: its legacy output decodes as its type, and cannot be shown as JSON.
    let done = engine.handle(&id("done-1")).unwrap();
    assert_eq!(
        outcome_of::<Done>(&done).await,
        Outcome::Completed(Done { summary: "hodei done".into(), count: 5 })
    );
    let history = engine.history(&id("done-1")).unwrap();
    let Event::SagaStarted { input, .. } = &history[0].event else { panic!("{history:?}") };
    assert!(matches!(payload_to_json(input), Err(PayloadError::NotSelfDescribing { len: 6 })));

    // Starting the waiting run again with its input is the same run, though it is journaled
    // as bincode and given as JSON now.
    let again = SagaRun::new("legacy-deploy", "deploy-1", &RequestV1 { repo: "hodei".into() }).unwrap();
    engine.start(again).await.unwrap();
    let other = SagaRun::new("legacy-deploy", "deploy-1", &RequestV1 { repo: "other".into() }).unwrap();
    assert!(matches!(engine.start(other).await, Err(Error::IdempotencyConflict { .. })));

    engine.signal(&id("deploy-1"), "second", &json!({ "by": "bo", "ticket": 2 })).await.unwrap();
    let outcome = outcome_of::<Done>(&engine.handle(&id("deploy-1")).unwrap()).await;
    let expected = Done { summary: "hodei@abc123 approved by ana and bo".into(), count: 42 };
    assert_eq!(outcome, Outcome::Completed(expected.clone()));
    // The checkout's legacy input matched and its legacy output was replayed; only the new
    // step ran.
    assert_eq!(effects.take(), ["deploy"]);
    let written = [
        ("SagaStarted", LegacyBincode),
        ("StepStarted", LegacyBincode),
        ("SignalReceived", LegacyBincode),
        ("StepCompleted", LegacyBincode),
        ("SignalReceived", Json),
        ("StepStartedAt", Json),
        ("StepCompleted", Json),
        ("SagaCompleted", Json),
    ];
    assert_eq!(codecs(&engine, "deploy-1"), written);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    drop((engine, done));

    // A journal of both formats reads back the same.
    let engine = open(dir.path(), [legacy_deploy(&effects), legacy_done()]).await;
    assert_eq!(codecs(&engine, "deploy-1"), written);
    assert_eq!(
        outcome_of::<Done>(&engine.handle(&id("deploy-1")).unwrap()).await,
        Outcome::Completed(expected)
    );
    assert!(effects.take().is_empty());
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_wait_journals_the_schema_of_its_payload_type_once_right_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let effects = Effects::default();
    let engine = open(dir.path(), [clone_then_approve::<RequestV1>(&effects, |r| r.repo.clone())]).await;
    let mut events = engine.subscribe();
    engine.start(SagaRun::new("deploy", "d3", &RequestV1 { repo: "hodei".into() }).unwrap()).await.unwrap();
    journaled(&mut events, &id("d3"), |e| matches!(e, Event::SignalWaitStarted { .. })).await;
    engine.shutdown(Duration::ZERO).await.unwrap();
    drop(engine);

    // Resumed at the wait: it is live again, but it started before, so nothing more is written.
    let engine = open(dir.path(), [clone_then_approve::<RequestV1>(&effects, |r| r.repo.clone())]).await;
    engine.signal(&id("d3"), "approve", &Approval { by: "ana".into(), ticket: 7 }).await.unwrap();
    outcome_of::<String>(&engine.handle(&id("d3")).unwrap()).await;
    let history: Vec<Event> = engine.history(&id("d3")).unwrap().into_iter().map(|r| r.event).collect();
    let expects: Vec<usize> =
        (0..history.len()).filter(|&i| matches!(history[i], Event::SignalWaitExpects { .. })).collect();
    assert_eq!(expects.len(), 1, "one schema for the one wait: {history:?}");
    let (Event::SignalWaitExpects { key, schema }, Event::SignalWaitStarted { key: started, .. }) =
        (&history[expects[0]], &history[expects[0] + 1])
    else {
        panic!("the schema is not right before its wait: {history:?}");
    };
    assert_eq!(key, started);
    let schema: serde_json::Value = serde_json::from_str(schema).unwrap();
    assert_eq!(
        schema["$defs"]["Approval"],
        json!({
            "title": "Approval",
            "type": "object",
            "properties": {
                "by": { "type": "string" },
                "ticket": { "type": "integer", "minimum": 0, "maximum": u32::MAX },
            },
            "required": ["by", "ticket"],
        })
    );
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_wait_for_a_type_that_cannot_be_traced_journals_no_schema() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(
        dir.path(),
        [saga("free-form", 1, |ctx, (): ()| async move {
            let payload: serde_json::Value = ctx.wait_signal("anything").await?;
            Ok::<_, StepError>(payload)
        })],
    )
    .await;
    let handle = engine.start(SagaRun::new("free-form", "f1", &()).unwrap()).await.unwrap();
    engine.signal(&id("f1"), "anything", &json!({ "any": ["shape"] })).await.unwrap();
    assert_eq!(
        outcome_of::<serde_json::Value>(&handle).await,
        Outcome::Completed(json!({ "any": ["shape"] }))
    );
    let history = engine.history(&id("f1")).unwrap();
    assert!(history.iter().any(|r| matches!(r.event, Event::SignalWaitStarted { .. })));
    assert!(!history.iter().any(|r| matches!(r.event, Event::SignalWaitExpects { .. })), "{history:?}");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}
