//! The trip-booking saga of issue 12, as a new user wrote it: car, hotel, flight, the hotel with
//! a single attempt, and a saga body that awaits something unjournaled after the hotel step has
//! returned. The process is SIGKILLed there, with the body blocked, and restarted.
//!
//! A step that returned is never run again, and its finished attempt is never reported as
//! interrupted: the trip completes with one hotel booking, or, when the flight fails for good,
//! the hotel's compensation gets the booking the step returned.
#![cfg(unix)]

// The engine's test support, shared with its own crash tests.
#[path = "../hodei-core/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hodei::{
    CompensationContext, Engine, Event, EventStore, Outcome, SagaContext, SagaId, SledStore, StepContext,
    StepError, saga, step,
};
use support::crash::{DONE, EFFECT, READY, Run, append_line, read_lines, run_child, wait_for_parent};

const CHILD_ENV: &str = "HODEI_TRIP_CRASH_CHILD";
const FLIGHT_ENV: &str = "HODEI_TRIP_FLIGHT";
const CHILD_TEST: &str = "trip_crash_child";

fn root() -> PathBuf {
    PathBuf::from(std::env::var(CHILD_ENV).expect("child env"))
}

/// A side effect: written to the effects file, then reported to the parent, which may kill the
/// process right here.
fn effect(line: &str) {
    append_line(&root().join("effects"), line).expect("effects file");
    println!("{EFFECT} {line}");
    wait_for_parent();
}

#[step(compensate = cancel_car)]
async fn book_car(_ctx: StepContext, city: String) -> Result<String, StepError> {
    effect("book car");
    Ok(format!("car in {city}"))
}

#[step(compensate = cancel_hotel, retry(max_attempts = 1))]
async fn book_hotel(_ctx: StepContext, city: String) -> Result<String, StepError> {
    effect("book hotel");
    Ok(format!("hotel in {city}"))
}

#[step(compensate = cancel_flight, retry(max_attempts = 1))]
async fn book_flight(_ctx: StepContext, city: String) -> Result<String, StepError> {
    effect("book flight");
    match std::env::var(FLIGHT_ENV).as_deref() {
        Ok("full") => Err(StepError::terminal("the flight is full")),
        _ => Ok(format!("flight to {city}")),
    }
}

async fn cancel_car(c: CompensationContext<String, String>) -> Result<(), StepError> {
    append_line(&root().join("effects"), &format!("cancel car {:?}", c.output))?;
    Ok(())
}

async fn cancel_hotel(c: CompensationContext<String, String>) -> Result<(), StepError> {
    append_line(&root().join("effects"), &format!("cancel hotel {:?}", c.output))?;
    Ok(())
}

async fn cancel_flight(c: CompensationContext<String, String>) -> Result<(), StepError> {
    append_line(&root().join("effects"), &format!("cancel flight {:?}", c.output))?;
    Ok(())
}

#[saga(name = "trip")]
async fn trip(ctx: SagaContext, city: String) -> Result<Vec<String>, StepError> {
    let car = book_car(&ctx, city.clone()).await?;
    let hotel = book_hotel(&ctx, city.clone()).await?;
    // Not journaled: the body blocks on another thread while the parent decides to kill.
    tokio::task::spawn_blocking(|| effect("body awaits after the hotel"))
        .await
        .map_err(|e| StepError::terminal(e.to_string()))?;
    let flight = book_flight(&ctx, city).await?;
    Ok(vec![car, hotel, flight])
}

/// The child: starts (or, after a kill, resumes) the trip and writes its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trip_crash_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    let root = Path::new(&root);
    let engine =
        Engine::builder().data_dir(root.join("db")).register(trip::definition()).start().await.unwrap();
    println!("{READY}");
    let run = trip::start(&engine, "trip-1", &"Lisbon".to_string()).await.unwrap();
    let outcome = format!("{:?}", run.outcome().await.unwrap());
    append_line(&root.join("outcome"), &outcome).unwrap();
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    println!("{DONE}");
}

/// Kills the child when the body reports that it awaits after the hotel (the third effect line),
/// then runs it to its end. Returns the effect lines, the outcome and the journal.
fn kill_after_the_hotel_then_finish(flight: &str) -> (Vec<String>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let env = [(CHILD_ENV, dir.path().display().to_string()), (FLIGHT_ENV, flight.to_string())];
    assert_eq!(run_child(CHILD_TEST, &env, 3), Run::Killed);
    let effects = read_lines(&dir.path().join("effects"));
    assert_eq!(effects, ["book car", "book hotel", "body awaits after the hotel"], "before the kill");
    assert_eq!(run_child(CHILD_TEST, &env, u64::MAX), Run::Finished);
    let store = SledStore::open(dir.path().join("db")).unwrap();
    let history = store.history(&SagaId::new("trip-1").unwrap()).unwrap();
    let journal = support::crash::format_journal(&history);
    assert!(
        !history.iter().any(|r| format!("{:?}", r.event).contains("interrupted")),
        "a finished attempt reported as interrupted:\n{journal}"
    );
    assert!(history.iter().any(|r| matches!(r.event, Event::StepCompleted { step: 1, .. })), "{journal}");
    let outcome = read_lines(&dir.path().join("outcome")).concat();
    (read_lines(&dir.path().join("effects")), outcome, journal)
}

#[test]
fn a_returned_step_is_not_run_again_after_a_kill_in_the_saga_body() {
    let (effects, outcome, journal) = kill_after_the_hotel_then_finish("free");
    assert_eq!(
        effects,
        [
            "book car",
            "book hotel",
            "body awaits after the hotel",
            "body awaits after the hotel",
            "book flight"
        ],
        "journal:\n{journal}"
    );
    let expected = Outcome::Completed(vec![
        "car in Lisbon".to_string(),
        "hotel in Lisbon".to_string(),
        "flight to Lisbon".to_string(),
    ]);
    assert_eq!(outcome, format!("{expected:?}"), "journal:\n{journal}");
}

#[test]
fn a_returned_step_is_compensated_with_its_output_after_a_kill_in_the_saga_body() {
    let (effects, outcome, journal) = kill_after_the_hotel_then_finish("full");
    assert_eq!(
        effects,
        [
            "book car",
            "book hotel",
            "body awaits after the hotel",
            "body awaits after the hotel",
            "book flight",
            "cancel flight None",
            "cancel hotel Some(\"hotel in Lisbon\")",
            "cancel car Some(\"car in Lisbon\")",
        ],
        "journal:\n{journal}"
    );
    assert!(outcome.starts_with("Compensated") && outcome.contains("the flight is full"), "{outcome}");
}
