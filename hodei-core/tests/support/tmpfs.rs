//! A small tmpfs for a test's data directory, so that it fills within seconds: mounted on a
//! directory of its own, resized or filled by the test, and unmounted when the guard drops,
//! whether the test passed or not. hodei-server's tests reach this file by `#[path]`.
//!
//! Mounting takes root (or `CAP_SYS_ADMIN`). Where the test may not mount, it prints that it
//! was skipped and passes, unless `HODEI_REQUIRE_MOUNT=1` (set by `.ci/run`) makes it fail.
#![allow(dead_code)] // each test crate uses its own subset

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    // Dropped after the unmount, which empties it.
    root: tempfile::TempDir,
    mount: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on a new directory, or returns `None` (having printed why)
    /// when this process may not mount one and `HODEI_REQUIRE_MOUNT` is not `1`.
    pub fn mount(bytes: u64) -> Option<Self> {
        let root = tempfile::tempdir().expect("a directory for the mount point");
        let mount = root.path().join("mnt");
        fs::create_dir(&mount).expect("the mount point");
        let size = format!("size={bytes}");
        match Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(&mount).output() {
            Ok(out) if out.status.success() => Some(Self { root, mount }),
            Ok(out) => {
                let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                let denied = ["permission denied", "not permitted", "only root", "must be superuser"]
                    .iter()
                    .any(|phrase| why.to_lowercase().contains(phrase));
                if !denied {
                    panic!("mounting a tmpfs on {} failed: {why}", mount.display());
                }
                skip(&why)
            }
            Err(e) => skip(&format!("cannot run `mount`: {e}")),
        }
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Gives the filesystem a new size, with what it holds.
    pub fn resize(&self, bytes: u64) {
        let options = format!("remount,size={bytes}");
        run(Command::new("mount").args(["-o", &options]).arg(&self.mount));
    }

    /// Writes a file of `bytes` bytes at `name`, taking that much of the filesystem: what a
    /// test deletes to free space.
    pub fn fill(&self, name: &str, bytes: usize) -> PathBuf {
        let path = self.mount.join(name);
        let mut file = fs::File::create(&path).expect("the filler file");
        // Not zeros only: a filesystem may keep runs of zeros sparse.
        let block: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len());
            file.write_all(&block[..n]).expect("writing the filler file");
            left -= n;
        }
        path
    }

    /// Writes a file at `name` until the filesystem is full, and returns its length: no block
    /// is left for anyone else (only the unused end of a file's last block takes a write).
    pub fn fill_up(&self, name: &str) -> u64 {
        let path = self.mount.join(name);
        let mut file = fs::File::create(&path).expect("the filler file");
        let block = vec![0x5a_u8; 4096];
        let mut written = 0;
        loop {
            match file.write(&block) {
                Ok(0) => return written,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return written,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A test that failed may leave a file open on it: detached then, and gone once closed.
        let unmounted = Command::new("umount").arg(&self.mount).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

fn skip(why: &str) -> Option<Tmpfs> {
    if std::env::var("HODEI_REQUIRE_MOUNT").is_ok_and(|v| v == "1") {
        panic!("HODEI_REQUIRE_MOUNT=1 but this process cannot mount a tmpfs: {why}");
    }
    println!("skipped: this process cannot mount a tmpfs ({why})");
    None
}

fn run(command: &mut Command) {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
}
