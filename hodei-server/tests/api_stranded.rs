//! Moving stranded runs over the operator API: runs parked by a deploy that changed their code,
//! forked onto a new version from their last good step, cancelled, and the refusals' codes.

mod support;

use std::time::Duration;

use hodei_core::{Outcome, SagaId, SagaRun};
use reqwest::StatusCode;
use serde_json::json;
use support::api::{ServedApi, code};
use support::sagas::{journaled, parked, rollout, sled_engine, step_named};
use support::within;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_runs_are_forked_onto_a_new_version_or_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let first = sled_engine(dir.path(), [rollout(1, "release", true)]).await;
    for id in ["r1", "r2"] {
        first.start(SagaRun::new("rollout", id, &"api").unwrap()).await.unwrap();
        within(journaled(&first, id, step_named("release"))).await;
    }
    first.shutdown(Duration::ZERO).await.unwrap();
    drop(first);

    // The deploy renamed the last step of version 1, and brought version 2.
    let engine = sled_engine(dir.path(), [rollout(1, "publish", false), rollout(2, "publish", false)]).await;
    let api = ServedApi::start(&engine, dir.path()).await;
    within(parked(&engine, "r1")).await;
    within(parked(&engine, "r2")).await;
    let run = api.get_ok("/api/v1/runs/r1").await;
    assert_eq!(run["status"], "parked", "{run}");

    // Onto version 2 from its last good step: `stage` is reused, `publish` runs live.
    let (status, fork) = api.post("/api/v1/runs/r1/fork", json!({"id": "r1-moved", "version": 2})).await;
    assert_eq!(status, StatusCode::CREATED, "{fork}");
    assert_eq!((fork["id"].as_str(), fork["version"].as_u64()), (Some("r1-moved"), Some(2)), "{fork}");
    let moved = within(engine.handle(&SagaId::new("r1-moved").unwrap()).unwrap().outcome::<String>()).await;
    assert_eq!(moved.unwrap(), Outcome::Completed("api staged, publish".into()));
    let fork = api.get_ok("/api/v1/runs/r1-moved").await;
    assert_eq!(fork["forked_from"], json!({"run": "r1", "step": 1}), "{fork}");
    assert_eq!(fork["steps"][0]["state"], "completed", "{fork}");
    let source = api.get_ok("/api/v1/runs/r1").await;
    assert_eq!(source["status"], "failed", "{source}");
    assert_eq!(source["forks"], json!([{"run": "r1-moved", "step": 1}]), "{source}");

    // Refusals keep their stable codes, and create nothing.
    let (status, body) = api.post("/api/v1/runs/r2/fork", json!({"id": "r2-x", "version": 9})).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"), "{body}");
    let (status, body) = api.post("/api/v1/runs/r2/fork", json!({"id": "r1-moved"})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");
    let (status, body) = api.post("/api/v1/runs/r2/fork", json!({"id": "r2-x", "from_step": 5})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "invalid_state"), "{body}");
    let (status, body) = api.post("/api/v1/runs/nope/fork", json!({"id": "r2-x"})).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"), "{body}");
    assert_eq!(api.get_ok("/api/v1/runs/r2").await["status"], "parked");

    // Cancel ends the parked run at once; `stage` is left undone, for lack of matching code.
    let (status, run) = api.post("/api/v1/runs/r2/cancel", json!({"reason": "withdrawn"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    assert_eq!(run["status"], "compensation_failed", "{run}");
    let run = api.get_ok("/api/v1/runs/r2").await;
    assert_eq!(run["requests"][0]["action"], "cancel", "{run}");
    assert_eq!(run["requests"][0]["by"], "admin", "{run}");
    let (status, body) = api.post("/api/v1/runs/r2/cancel", json!({})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "invalid_state"), "{body}");
}
