//! The time-skipping test environment: a day-long saga in milliseconds, its journal on the
//! virtual clock, stand-ins for steps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hodei_core::testing::TestEnv;
use hodei_core::{
    CompensationContext, Error, Event, Outcome, RecordedEvent, RetryPolicy, SagaDefinition, SagaRun,
    StepError,
};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

/// 2030-01-01T00:00:00Z: a fixed start, so the journal's times are the same in every run.
fn epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_893_456_000)
}

/// A release: an approval within a day, a deploy retried three times an hour apart, a
/// fifteen-minute soak, then a check. The deploy is compensated by a rollback.
fn release(rollbacks: Arc<AtomicU32>) -> SagaDefinition {
    SagaDefinition::new("release", 1, move |ctx, version: String| {
        let rollbacks = rollbacks.clone();
        async move {
            let approved: Option<String> = ctx.wait_signal_timeout("approval", 24 * HOUR).await?;
            let Some(approver) = approved else {
                return Err(StepError::terminal("nobody approved the release within a day"));
            };
            let deployed = ctx
                .step("deploy")
                .input(version.clone())
                .retry(
                    RetryPolicy::attempts(3)
                        .initial_backoff(HOUR)
                        .max_backoff(HOUR)
                        .multiplier(1.0)
                        .jitter(0.0),
                )
                .compensate(move |_: CompensationContext<String, String>| {
                    let rollbacks = rollbacks.clone();
                    async move {
                        rollbacks.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                })
                .run(|_, v: String| async move {
                    Err::<String, _>(StepError::retryable(format!("no deploy target for {v} in a test")))
                })
                .await?;
            ctx.sleep(15 * MINUTE).await;
            let healthy = ctx
                .step("check")
                .input(deployed.clone())
                .run(|_, d: String| async move { Ok::<_, StepError>(!d.is_empty()) })
                .await?;
            if !healthy {
                return Err(StepError::terminal("unhealthy after the soak"));
            }
            Ok(format!("{deployed} approved by {approver}"))
        }
    })
}

/// Each event's virtual time since the start, with what it is.
fn offsets(history: &[RecordedEvent]) -> Vec<(Duration, String)> {
    let start = history[0].at.0;
    history
        .iter()
        .map(|r| {
            let kind = format!("{:?}", r.event);
            let kind = kind.split([' ', '{', '(']).next().unwrap_or_default().to_string();
            (Duration::from_millis(r.at.0 - start), kind)
        })
        .collect()
}

#[tokio::test]
async fn a_day_long_release_runs_in_virtual_time_and_its_journal_shows_it() {
    let real = Instant::now();
    let attempts = Arc::new(AtomicU32::new(0));
    let rollbacks = Arc::new(AtomicU32::new(0));
    let env = TestEnv::builder()
        .start_at(epoch())
        .register(release(rollbacks.clone()))
        .stand_in("deploy", {
            let attempts = attempts.clone();
            move |_, version: String| {
                let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    match attempt {
                        1 | 2 => {
                            Err(StepError::retryable(format!("registry unavailable (attempt {attempt})")))
                        }
                        _ => Ok(format!("app-{version}")),
                    }
                }
            }
        })
        .start()
        .await
        .unwrap();
    let run = env.start(SagaRun::new("release", "release-1", &"1.2.0").unwrap()).await.unwrap();
    env.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    env.advance(3 * HOUR).await;
    env.signal(run.id(), "approval", &"alice").await.unwrap();
    let outcome = run.outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Completed("app-1.2.0 approved by alice".into()));
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "the stand-in ran for each of the three attempts");
    assert_eq!(rollbacks.load(Ordering::SeqCst), 0);

    // The approval came at +3 h; the deploy failed then and at +4 h, succeeded at +5 h; the
    // soak ended at +5 h 15 min, when the check ran and the saga completed.
    let history = env.history(run.id()).unwrap();
    let h = |hours: u64, minutes: u64| HOUR * hours as u32 + MINUTE * minutes as u32;
    let timeline: Vec<_> = offsets(&history)
        .into_iter()
        .filter(|(_, kind)| kind != "SignalWaitExpects" && kind != "TraceStarted")
        .collect();
    let expected = [
        (h(0, 0), "SagaStarted"),
        (h(0, 0), "SignalWaitStarted"),
        (h(3, 0), "SignalReceived"),
        (h(3, 0), "SignalConsumed"),
        (h(3, 0), "StepStartedAt"),
        (h(3, 0), "StepAttemptFailed"),
        (h(4, 0), "StepRetried"),
        (h(4, 0), "StepAttemptFailed"),
        (h(5, 0), "StepRetried"),
        (h(5, 0), "StepCompleted"),
        (h(5, 0), "TimerStarted"),
        (h(5, 15), "TimerFired"),
        (h(5, 15), "StepStartedAt"),
        (h(5, 15), "StepCompleted"),
        (h(5, 15), "SagaCompleted"),
    ];
    let expected: Vec<_> = expected.iter().map(|(at, kind)| (*at, kind.to_string())).collect();
    assert_eq!(timeline, expected, "\n{}", hodei_core::Timeline(&history));
    let Some(Event::SignalWaitStarted { timeout_at: Some(deadline), .. }) =
        history.iter().map(|r| &r.event).find(|e| matches!(e, Event::SignalWaitStarted { .. }))
    else {
        panic!("the journal has no signal wait with a deadline: {history:?}");
    };
    assert_eq!(deadline.as_system_time(), epoch() + 24 * HOUR, "the deadline is a day after the start");
    assert_eq!(history[0].at.as_system_time(), epoch());
    assert_eq!(env.elapsed(), h(5, 15));
    assert!(
        real.elapsed() < Duration::from_secs(1),
        "five hours of saga took {:?} of real time",
        real.elapsed()
    );
}

#[tokio::test]
async fn an_approval_that_never_comes_times_out_a_day_later_and_compensates_nothing_unstarted() {
    let real = Instant::now();
    let rollbacks = Arc::new(AtomicU32::new(0));
    let env =
        TestEnv::builder().start_at(epoch()).register(release(rollbacks.clone())).start().await.unwrap();
    let run = env.start(SagaRun::new("release", "release-2", &"1.3.0").unwrap()).await.unwrap();
    // Nobody advances time: every task waits, so Tokio's paused clock skips to the deadline.
    let outcome = run.outcome::<String>().await.unwrap();
    assert_eq!(outcome, Outcome::Failed { cause: "nobody approved the release within a day".into() });
    let history = env.history(run.id()).unwrap();
    let timed_out = history.iter().find(|r| matches!(r.event, Event::SignalWaitTimedOut { .. })).unwrap();
    assert_eq!(timed_out.at.as_system_time(), epoch() + 24 * HOUR);
    assert_eq!(env.elapsed(), 24 * HOUR);
    assert_eq!(rollbacks.load(Ordering::SeqCst), 0, "no step started, so none is rolled back");
    assert!(
        real.elapsed() < Duration::from_secs(1),
        "a day of waiting took {:?} of real time",
        real.elapsed()
    );
}

#[tokio::test]
async fn a_step_whose_attempts_run_out_is_compensated_on_the_virtual_clock() {
    let rollbacks = Arc::new(AtomicU32::new(0));
    // No stand-in: the deploy's own body runs, and fails every attempt.
    let env =
        TestEnv::builder().start_at(epoch()).register(release(rollbacks.clone())).start().await.unwrap();
    let run = env.start(SagaRun::new("release", "release-3", &"1.4.0").unwrap()).await.unwrap();
    env.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    env.signal(run.id(), "approval", &"bob").await.unwrap();
    let outcome = run.outcome::<String>().await.unwrap();
    let Outcome::Compensated { cause } = outcome else { panic!("the deploy never succeeds: {outcome:?}") };
    assert!(cause.contains("no deploy target for 1.4.0"), "{cause}");
    assert_eq!(rollbacks.load(Ordering::SeqCst), 1, "the started deploy is rolled back");
    // Three attempts an hour apart: the last failed two hours after the approval.
    let history = env.history(run.id()).unwrap();
    let failed = history.iter().find(|r| matches!(r.event, Event::StepFailed { .. })).unwrap();
    assert_eq!(failed.at.as_system_time(), epoch() + 2 * HOUR);
}

#[tokio::test]
async fn a_stand_in_of_other_types_fails_its_step_naming_both() {
    let env = TestEnv::builder()
        .register(release(Arc::default()))
        .stand_in("deploy", |_, _: u64| async move { Ok::<_, StepError>(7u64) })
        .start()
        .await
        .unwrap();
    let run = env.start(SagaRun::new("release", "release-4", &"1.5.0").unwrap()).await.unwrap();
    env.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    env.signal(run.id(), "approval", &"carol").await.unwrap();
    let outcome = run.outcome::<String>().await.unwrap();
    assert_eq!(
        outcome,
        Outcome::Failed {
            cause: "the stand-in body for step `deploy` takes `u64` and returns `u64`, but the step takes \
                    `alloc::string::String` and returns `alloc::string::String`"
                .into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_thread_runtime_is_refused_with_a_typed_error() {
    let refused = TestEnv::builder().start().await.unwrap_err();
    assert!(matches!(refused, Error::TestEnvironment { .. }), "{refused:?}");
    assert_eq!(
        refused.to_string(),
        "the test environment needs a current-thread Tokio runtime (`#[tokio::test]`): only its clock can be paused"
    );
}

#[tokio::test]
async fn a_stand_in_compensation_runs_instead_of_the_steps_own() {
    let rollbacks = Arc::new(AtomicU32::new(0));
    let stood_in = Arc::new(std::sync::Mutex::new(Vec::new()));
    let env = TestEnv::builder()
        .start_at(epoch())
        .register(release(rollbacks.clone()))
        .stand_in_compensation("deploy", {
            let stood_in = stood_in.clone();
            move |c: CompensationContext<String, String>| {
                stood_in.lock().unwrap().push((c.input.clone(), c.output.clone()));
                async { Ok(()) }
            }
        })
        .start()
        .await
        .unwrap();
    let run = env.start(SagaRun::new("release", "release-5", &"1.6.0").unwrap()).await.unwrap();
    env.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    env.signal(run.id(), "approval", &"dave").await.unwrap();
    let outcome = run.outcome::<String>().await.unwrap();
    assert!(matches!(outcome, Outcome::Compensated { .. }), "{outcome:?}");
    assert_eq!(rollbacks.load(Ordering::SeqCst), 0, "the step's own compensation did not run");
    assert_eq!(
        *stood_in.lock().unwrap(),
        [("1.6.0".to_string(), None)],
        "the stand-in got the step's input, no output"
    );
}

#[tokio::test]
async fn a_stand_in_compensation_for_a_step_without_one_fails_that_step() {
    let env = TestEnv::builder()
        .register(release(Arc::default()))
        .stand_in("deploy", |_, v: String| async move { Ok::<_, StepError>(v) })
        .stand_in_compensation("check", |_: CompensationContext<String, bool>| async { Ok(()) })
        .start()
        .await
        .unwrap();
    let run = env.start(SagaRun::new("release", "release-6", &"1.7.0").unwrap()).await.unwrap();
    env.wait_for(run.id(), |e| matches!(e, Event::SignalWaitStarted { .. })).await.unwrap();
    env.signal(run.id(), "approval", &"erin").await.unwrap();
    let Outcome::Compensated { cause } = run.outcome::<String>().await.unwrap() else {
        panic!("the check fails, and the deploy before it is compensated");
    };
    assert_eq!(cause, "a stand-in compensation is registered for step `check`, which has none");
}
