//! What provisioning needs on the host (the binaries, KVM, the kernel and the rootfs), checked
//! before anything is started so that a missing piece is named.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::FirecrackerProvider;
use super::errors::invalid;
use super::provider::PROVIDER;
use crate::provider::{ProviderError, WorkerSpec};

pub(super) struct HostPaths {
    pub(super) firecracker: PathBuf,
    pub(super) jailer: Option<PathBuf>,
    pub(super) rootfs: PathBuf,
}

impl FirecrackerProvider {
    /// Checks everything provisioning needs on the host, naming what is missing.
    pub(super) fn check_host(&self, spec: &WorkerSpec) -> Result<HostPaths, ProviderError> {
        let config = &self.config;
        let firecracker = find_executable(&config.firecracker_binary).ok_or_else(|| {
            invalid(format!(
                "the firecracker binary `{}` is missing or not executable (install a release from \
                 https://github.com/firecracker-microvm/firecracker/releases or set the path)",
                config.firecracker_binary.display()
            ))
        })?;
        let jailer = match &config.jailer {
            Some(jail) => Some(find_executable(&jail.jailer_binary).ok_or_else(|| {
                invalid(format!(
                    "the jailer binary `{}` is missing or not executable",
                    jail.jailer_binary.display()
                ))
            })?),
            None => None,
        };
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(&config.kvm_device) {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "it does not exist: this host has no KVM (load the kvm module, or enable nested \
                     virtualisation on a VM)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied (add this user to the `kvm` group)"
                }
                _ => "",
            };
            return Err(invalid(format!("{} cannot be opened: {e}; {why}", config.kvm_device.display())));
        }
        if !config.kernel_image.is_file() {
            return Err(invalid(format!(
                "the guest kernel `{}` is missing (an uncompressed vmlinux)",
                config.kernel_image.display()
            )));
        }
        let rootfs = match spec.image.as_deref().map(PathBuf::from).or_else(|| config.rootfs.clone()) {
            Some(rootfs) => rootfs,
            None => {
                return Err(invalid(
                    "no rootfs: the spec names no image and the provider has no default rootfs",
                ));
            }
        };
        if !rootfs.is_file() {
            return Err(ProviderError::ImageMissing {
                provider: PROVIDER.to_owned(),
                image: rootfs.display().to_string(),
                hint: "build an ext4 rootfs holding the static hodei-agent (see the README's Firecracker section)"
                    .to_owned(),
            });
        }
        Ok(HostPaths { firecracker, jailer, rootfs })
    }
}

fn find_executable(binary: &Path) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return is_executable(binary).then(|| binary.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(binary))
        .find(|path| is_executable(path))
}
