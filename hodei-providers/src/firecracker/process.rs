//! The VMM processes: identifying, signalling and awaiting them through a pidfd, which works
//! the same for a process this one spawned and for an orphan a previous run left behind, and
//! which cannot hit a recycled pid once opened.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal};

/// An open handle on a live process that is one of ours.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    pid: u32,
    pidfd: OwnedFd,
}

impl VmmProcess {
    /// Opens `pid` if it runs and its command line carries every one of `markers` (the
    /// `--api-sock` value and, under the jailer, the `--id`), so that a pid reused by an
    /// unrelated process is never signalled. The pidfd is opened before the check: from then
    /// on it refers to the process checked.
    pub(crate) fn open_if_ours(pid: u32, markers: &[&str]) -> Option<Self> {
        let raw = Pid::from_raw(i32::try_from(pid).ok()?)?;
        let pidfd = rustix::process::pidfd_open(raw, PidfdFlags::empty()).ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours =
            markers.iter().all(|marker| cmdline.split(|byte| *byte == 0).any(|arg| arg == marker.as_bytes()));
        ours.then_some(Self { pid, pidfd })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGKILL. A process that already exited is not an error.
    pub(crate) fn kill(&self) -> std::io::Result<()> {
        match rustix::process::pidfd_send_signal(&self.pidfd, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(errno) => Err(errno.into()),
        }
    }

    /// Waits until the process exits or `timeout` passes; true if it exited. A pidfd becomes
    /// readable when its process ends (zombie or reaped), so this waits on the exit itself.
    pub(crate) async fn wait_exit(&self, timeout: Duration) -> std::io::Result<bool> {
        let pidfd = self.pidfd.try_clone()?;
        tokio::task::spawn_blocking(move || {
            let timeout = rustix::event::Timespec {
                tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(timeout.subsec_nanos()),
            };
            let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
            loop {
                match rustix::event::poll(&mut fds, Some(&timeout)) {
                    Ok(ready) => return Ok(ready > 0),
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(errno) => return Err(std::io::Error::from(errno)),
                }
            }
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Reads a pid file; `None` if it is missing or unreadable.
pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}
