//! The job's process group: signalling it, and learning that its leader has exited without
//! reaping it.
//!
//! Not reaping at once matters: while the leader is a zombie its pid, which is also the
//! group's id, cannot be reused, so the group can still be signalled without risk of hitting an
//! unrelated process; and `/proc/<pid>/stat` still holds its final CPU times.

use std::io;

use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

use super::sentinel::Sentinel;

/// Sends `signal` to every process of the group. A group already gone is not an error.
pub(crate) fn signal_group(pgid: Pid, signal: Signal) {
    match rustix::process::kill_process_group(pgid, signal) {
        Ok(()) | Err(Errno::SRCH) => {}
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw_nonzero().get(), error = %e, "cannot signal the job's process group")
        }
    }
}

/// SIGKILLs the group when dropped unless disarmed: a job never outlives a runner that was torn
/// down (a dropped task, a runtime shutting down) before it could stop the job properly. With a
/// [`Sentinel`], not even a runner whose whole process died.
#[derive(Debug)]
pub(crate) struct GroupGuard {
    pgid: Pid,
    armed: bool,
    sentinel: Option<Sentinel>,
}

impl GroupGuard {
    pub(crate) fn new(pgid: Pid, sentinel: Option<Sentinel>) -> Self {
        Self { pgid, armed: true, sentinel }
    }

    /// Called once the group has been SIGKILLed, before the leader is reaped: the sentinel
    /// must let go while the group's id still names only this group.
    pub(crate) async fn release_sentinel(&mut self) {
        if let Some(sentinel) = self.sentinel.take() {
            sentinel.release().await;
        }
    }

    /// Called once the leader has been reaped: from then on its pid may be reused.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::KILL);
        }
    }
}

/// Waits for the leader to exit, leaving it a zombie.
///
/// A blocking `waitid(WNOWAIT)` on a thread of the blocking pool, one per running job. (A pidfd
/// would need no thread, but registering one with Tokio takes `unsafe` since Tokio 1.54, and the
/// workspace forbids it.) The thread ends when the leader exits; the [`GroupGuard`] makes sure it
/// does, even when the runner is torn down.
#[derive(Debug)]
pub(crate) struct ExitWatch {
    task: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl ExitWatch {
    pub(crate) fn new(pid: Pid) -> Self {
        let task = tokio::task::spawn_blocking(move || {
            loop {
                match rustix::process::waitid(WaitId::Pid(pid), WaitIdOptions::EXITED | WaitIdOptions::NOWAIT)
                {
                    Ok(_) => return Ok(()),
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        });
        Self { task: Some(task) }
    }

    /// Resolves once the leader has exited. Cancel-safe, and resolves at once when called again.
    pub(crate) async fn exited(&mut self) -> io::Result<()> {
        let Some(task) = self.task.as_mut() else { return Ok(()) };
        let result = task.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        self.task = None;
        result
    }
}
