//! Replay checks and journal export over the operator API: the journals of runs in flight on
//! today's code, exported from its server and replayed, running nothing, on a staging server
//! that runs the next build (a renamed step, a patch); every run in flight checked before and
//! after the deploy; and the refusals of bodies that are not journals.

mod support;

use std::time::Duration;

use hodei_core::{Event, JournalFile, Outcome, RecordedEvent, SagaId, SagaRun, Timestamp};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::api::{ServedApi, code};
use support::sagas::{
    flaky, gated, journaled, parked, release, rollout, signal_wait, sled_engine, step_named,
};
use support::within;

/// `GET path` as the admin: the status, the headers and the raw body.
async fn download(api: &ServedApi, path: &str) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let response = within(api.http.get(api.url(path)).bearer_auth(&api.admin).send()).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, within(response.bytes()).await.unwrap().to_vec())
}

/// The journal file of run `id`, as the server exports it.
async fn journal_of(api: &ServedApi, id: &str) -> Vec<u8> {
    let (status, _, bytes) = download(api, &format!("/api/v1/runs/{id}/journal")).await;
    assert_eq!(status, StatusCode::OK, "the journal of {id}");
    bytes
}

/// `POST /api/v1/replay` with `body`, as the holder of `token`.
async fn replay(api: &ServedApi, token: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let request = api
        .http
        .post(api.url("/api/v1/replay"))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .body(body);
    let response = within(request.send()).await.unwrap();
    let status = response.status();
    (status, within(response.json()).await.unwrap())
}

/// A report as the API answers it.
fn report(saga: &str, definition: &str, verdict: Value, patches: Value) -> Value {
    json!({"saga": saga, "definition": definition, "version": 1, "verdict": verdict, "patches": patches})
}

const WOULD_PARK: &str = "step 1: the code now calls `publish`, but the journal recorded `release` there";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journals_exported_from_todays_build_are_checked_on_the_next_one() {
    // Today's build: runs wait at an approval gate, in a `release` step, and for `go`; one ended.
    let today_dir = tempfile::tempdir().unwrap();
    let today =
        sled_engine(today_dir.path(), [gated(), rollout(1, "release", true), release(false), flaky()]).await;
    today.start(SagaRun::new("gated", "g-1", &json!({"service": "api"})).unwrap()).await.unwrap();
    today.start(SagaRun::new("rollout", "r-1", &"api").unwrap()).await.unwrap();
    today.start(SagaRun::new("release", "p-1", &"1.4.0").unwrap()).await.unwrap();
    within(journaled(&today, "g-1", signal_wait)).await;
    within(journaled(&today, "r-1", step_named("release"))).await;
    within(journaled(&today, "p-1", signal_wait)).await;
    // Its outcome, not its final event: the outcome comes once its record says it ended too.
    let ended = today.start(SagaRun::new("flaky", "f-1", &false).unwrap()).await.unwrap();
    assert_eq!(within(ended.outcome::<u32>()).await.unwrap(), Outcome::Completed(20));
    // The handle holds the engine, whose store the deploy below reopens.
    drop(ended);
    let today_api = ServedApi::start(&today, today_dir.path()).await;

    // The export is the run's whole journal, under its id.
    let (status, headers, bytes) = download(&today_api, "/api/v1/runs/r-1/journal").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert_eq!(headers["content-disposition"], "attachment; filename=\"r-1.journal\"");
    let r1 = SagaId::new("r-1").unwrap();
    let exported = JournalFile::from_bytes(&bytes).unwrap();
    assert_eq!(exported, JournalFile { saga: r1.clone(), events: today.history(&r1).unwrap() });
    let r1_journal = bytes;
    let g1_journal = journal_of(&today_api, "g-1").await;
    let p1_journal = journal_of(&today_api, "p-1").await;

    // On the code that wrote them, every run in flight goes on; the ended one is not checked.
    let waits_for_approval = json!({"verdict": "clean", "next": "the wait for signal `approval`"});
    let in_release = json!({"verdict": "clean", "next": "step `release`"});
    let waits_for_go = json!({"verdict": "clean", "next": "the wait for signal `go`"});
    assert_eq!(
        today_api.get_ok("/api/v1/runs/r-1/replay").await,
        report("r-1", "rollout", in_release.clone(), json!([]))
    );
    assert_eq!(
        today_api.get_ok("/api/v1/check").await,
        json!({
            "runs": [
                report("g-1", "gated", waits_for_approval.clone(), json!([])),
                report("p-1", "release", waits_for_go.clone(), json!([])),
                report("r-1", "rollout", in_release, json!([])),
            ],
            "clean": 3,
            "not_clean": 0,
        })
    );

    // The next build renamed `release` to `publish` in the same version, and verifies a release
    // behind a patch. A staging server runs it, on a journal of its own; a viewer may check.
    let next_code = || [gated(), rollout(1, "publish", false), release(true), flaky()];
    let staging_dir = tempfile::tempdir().unwrap();
    let staging = sled_engine(staging_dir.path(), next_code()).await;
    let staging_api = ServedApi::start(&staging, staging_dir.path()).await;
    let (status, issued) =
        staging_api.post("/api/v1/tokens", json!({"name": "vera", "role": "viewer"})).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let viewer = issued["secret"].as_str().unwrap();
    let would_park = json!({"verdict": "would_park", "reason": WOULD_PARK});
    let old_path = json!([{"patch": "verify-before-go", "key": "1", "new_path": false}]);
    assert_eq!(
        replay(&staging_api, viewer, r1_journal).await,
        (StatusCode::OK, report("r-1", "rollout", would_park.clone(), json!([])))
    );
    assert_eq!(
        replay(&staging_api, viewer, g1_journal).await,
        (StatusCode::OK, report("g-1", "gated", waits_for_approval.clone(), json!([])))
    );
    assert_eq!(
        replay(&staging_api, viewer, p1_journal).await,
        (StatusCode::OK, report("p-1", "release", waits_for_go.clone(), old_path.clone()))
    );
    // Checked, not stored: staging holds no run.
    assert_eq!(staging_api.get_ok("/api/v1/runs").await["runs"], json!([]));

    // Bodies that are not a run's journal are the request's fault, with a stable code.
    let no_events = JournalFile { saga: SagaId::new("x").unwrap(), events: Vec::new() }.to_bytes().unwrap();
    let started = Event::SagaStarted { definition: "gated".into(), version: 1, input: b"\x01null".to_vec() };
    let gapped = JournalFile {
        saga: SagaId::new("x").unwrap(),
        events: vec![RecordedEvent { seq: 3, at: Timestamp(0), event: started }],
    }
    .to_bytes()
    .unwrap();
    for body in [b"not a journal".to_vec(), Vec::new(), no_events, gapped] {
        let (status, answer) = replay(&staging_api, &staging_api.admin, body).await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, "invalid_request"), "{answer}");
    }
    for path in ["/api/v1/runs/none-such/journal", "/api/v1/runs/none-such/replay"] {
        let (status, answer) = staging_api.get(path).await;
        assert_eq!((status, code(&answer)), (StatusCode::NOT_FOUND, "not_found"), "{path}: {answer}");
    }

    // The deploy anyway: today's server restarts on the next build. `r-1` parks, as the check
    // said it would, and the check of every run in flight says so.
    today_api.server.shutdown().await;
    // No grace: `r-1`'s step never ends by itself.
    today.shutdown(Duration::ZERO).await.unwrap();
    // Every handle on the store goes before it is opened again.
    drop(today);
    let deployed = sled_engine(today_dir.path(), next_code()).await;
    let deployed_api = ServedApi::start(&deployed, today_dir.path()).await;
    within(parked(&deployed, "r-1")).await;
    assert_eq!(
        deployed_api.get_ok("/api/v1/check").await,
        json!({
            "runs": [
                report("g-1", "gated", waits_for_approval, json!([])),
                report("p-1", "release", waits_for_go, old_path),
                report("r-1", "rollout", would_park, json!([])),
            ],
            "clean": 2,
            "not_clean": 1,
        })
    );

    // A journal over the body cap is refused before it is read whole. Last: the server then
    // closes the connection. Just over the cap, so that the client is done sending when the
    // refusal comes.
    let (status, answer) = replay(&staging_api, &staging_api.admin, vec![0; (1 << 20) + 1024]).await;
    assert_eq!((status, code(&answer)), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"), "{answer}");
}
