//! Starting Firecracker through its jailer: the jailer's arguments, and the kernel and rootfs
//! hard-linked into the chroot.

use std::path::{Path, PathBuf};

use super::errors::infra;
use super::state_dir::remove_if_present;
use crate::provider::ProviderError;

/// Starting Firecracker through its `jailer` (chroot, uid/gid drop, cgroups). The kernel and
/// rootfs are hard-linked into the chroot, so they must be on the same filesystem as
/// `chroot_base_dir`, and readable by `uid`/`gid`. The jailer itself must run as root.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JailerConfig {
    /// The `jailer` binary.
    pub jailer_binary: PathBuf,
    /// The uid Firecracker runs as.
    pub uid: u32,
    /// The gid Firecracker runs as.
    pub gid: u32,
    /// `--chroot-base-dir`; the chroot is `<base>/<firecracker file name>/<worker id>/root`.
    pub chroot_base_dir: PathBuf,
}

impl JailerConfig {
    /// Jail Firecracker with `jailer_binary` as `uid`:`gid` under `chroot_base_dir`.
    pub fn new(
        jailer_binary: impl Into<PathBuf>,
        uid: u32,
        gid: u32,
        chroot_base_dir: impl Into<PathBuf>,
    ) -> Self {
        Self { jailer_binary: jailer_binary.into(), uid, gid, chroot_base_dir: chroot_base_dir.into() }
    }
}

/// The jailer's own arguments; Firecracker's follow the `--`.
pub(super) fn jailer_args(
    jail: &JailerConfig,
    firecracker: &Path,
    worker_id: &str,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--id".into(), worker_id.into(), "--exec-file".into()];
    args.push(firecracker.into());
    args.extend(["--uid".into(), jail.uid.to_string().into(), "--gid".into(), jail.gid.to_string().into()]);
    args.extend(["--chroot-base-dir".into(), jail.chroot_base_dir.clone().into_os_string(), "--".into()]);
    args
}

pub(super) fn link_into(source: &Path, target: &Path) -> Result<(), ProviderError> {
    remove_if_present(target)?;
    std::fs::hard_link(source, target).map_err(|e| {
        infra(format!(
            "cannot hard-link {} into the jail as {} (it must be on the same filesystem): {e}",
            source.display(),
            target.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jailer_gets_the_id_exec_file_ids_and_chroot_before_firecrackers_arguments() {
        let jail = JailerConfig::new("/usr/bin/jailer", 123, 456, "/srv/jail");
        let args = jailer_args(&jail, Path::new("/usr/bin/firecracker"), "w-1");
        let expected = [
            "--id",
            "w-1",
            "--exec-file",
            "/usr/bin/firecracker",
            "--uid",
            "123",
            "--gid",
            "456",
            "--chroot-base-dir",
            "/srv/jail",
            "--",
        ];
        assert_eq!(args, expected.map(std::ffi::OsString::from));
    }
}
