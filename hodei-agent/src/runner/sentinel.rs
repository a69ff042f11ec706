//! A watcher outside this process that kills a job's process group if this process dies first.
//!
//! A job runs in its own process group, so when the process that supervises it is SIGKILLed
//! (an agent running inside the user's own program, which dies with the control plane), its
//! processes are orphaned and go on: a retry after the restart would run beside them. The
//! sentinel is a `/bin/sh` in a process group of its own (terminal signals do not reach it),
//! reading a pipe whose only writer is this process. The kernel closes that pipe when this
//! process dies, however it dies; the sentinel then reads end-of-file and SIGKILLs the job's
//! group. When the job ends normally, this process writes `done` first, while the group's
//! leader is still an unreaped zombie, so the group's id cannot have been reused.

use std::io;
use std::process::Stdio;

use rustix::process::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};

/// `$1` is the job's process group id.
const SCRIPT: &str = r#"read line; [ "$line" = done ] || kill -s KILL -- "-$1""#;

/// The sentinel of one job. Dropped without [`release`](Self::release), it kills the job's
/// group: the same as the runner's own guard does when it is torn down.
#[derive(Debug)]
pub(crate) struct Sentinel {
    stdin: ChildStdin,
    // Held so that it is reaped once it exits (Tokio reaps dropped children in the background).
    _child: Child,
}

impl Sentinel {
    /// Starts the watcher of `pgid`.
    pub(crate) fn watch(pgid: Pid) -> io::Result<Self> {
        let mut child = Command::new("/bin/sh")
            .args(["-c", SCRIPT, "hodei-job-sentinel", &pgid.as_raw_nonzero().to_string()])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| io::Error::other("the sentinel has no stdin"))?;
        Ok(Self { stdin, _child: child })
    }

    /// The job is over (its group SIGKILLed, its leader not yet reaped): the sentinel exits
    /// without killing anything.
    pub(crate) async fn release(mut self) {
        if let Err(e) = self.stdin.write_all(b"done\n").await {
            tracing::warn!(error = %e, "could not release the job's sentinel");
        }
    }
}
