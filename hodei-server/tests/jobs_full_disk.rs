//! The hub over a log store on a full disk (a small tmpfs): a job whose output meets it is not
//! failed. Its session ends, as when the store fails, so the agent keeps the job's output and
//! result and sends them again on its next session; once space is freed they are stored whole,
//! and the step's next attempt takes the job's result instead of running it again.
//!
//! Apart from `tests/logstore_full_disk.rs`: the jobs here start processes, which hold a copy
//! of every descriptor until they exec, so a log store reopened there would find its
//! directory's lock held a moment longer.
//!
//! Mounting takes root: without it the test prints that it was skipped, unless
//! `HODEI_REQUIRE_MOUNT=1` (set by `.ci/run`). `cargo test -p hodei-server --test jobs_full_disk`.
#![cfg(target_os = "linux")]

mod support;

#[path = "../../hodei-core/tests/support/tmpfs.rs"]
mod tmpfs;

use hodei_agent::protocol::v1::job_result::Outcome;
use hodei_server::hub::HubError;
use hodei_server::logstore::LogStream;
use support::{Setup, WORKER, shell, within};
use tmpfs::Tmpfs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_output_meets_a_full_disk_is_sent_again_once_there_is_room_not_failed() {
    let Some(disk) = Tmpfs::mount(2 << 20) else { return };
    let mut setup = Setup::with_logs_in(&disk.path().join("store")).await;
    disk.fill("filler", 512 << 10);
    disk.fill_up("rest");
    // One batch of output, then the result: the batch is refused, and the result must not be
    // taken in the same session (it was: the job failed for good, its log empty).
    let (job, script) = ("saga-1/build#1", "seq 1 2000");
    let error = within(setup.hub.run_job(WORKER, shell(job, script))).await.unwrap_err();
    assert!(matches!(&error, HubError::WorkerLost { .. }), "{error:?}");
    assert!(error.is_retryable());

    // Room again: the agent's next session stores the output, then the result, which closes
    // the log and ends the follower.
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    let mut follower = setup.logs.follow(job, LogStream::Stdout, 0).await.unwrap();
    let mut stored = Vec::new();
    within(async {
        while let Some(chunk) = follower.next().await {
            stored.extend_from_slice(&chunk.unwrap().bytes);
        }
    })
    .await;
    let expected: String = (1..=2000).map(|i| format!("{i}\n")).collect();
    assert_eq!(stored, expected.as_bytes());

    // The step's next attempt takes the stored result.
    let previous = [job.to_owned()];
    let result =
        within(setup.hub.resume_job(WORKER, shell("saga-1/build#2", script), &previous)).await.unwrap();
    assert_eq!(result.outcome, Some(Outcome::ExitCode(0)), "{result:?}");
    setup.stop_agent().await;
}
