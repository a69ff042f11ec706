//! Booting a worker's microVM: starting its VMM, waiting for its API socket, then configuring
//! the machine, kernel, root drive, network and MMDS, and starting the instance.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::errors::infra;
use super::host::HostPaths;
use super::jailer::{jailer_args, link_into};
use super::provider::PROVIDER;
use super::state_dir::{CONSOLE_FILE, PID_FILE, WorkerRecord};
use super::{
    Action, ApiError, BootSource, Drive, FirecrackerClient, FirecrackerProvider, MachineConfig, MmdsConfig,
    NetworkInterface,
};
use crate::provider::{ProviderError, WorkerSpec};

const ROOT_DRIVE_ID: &str = "rootfs";
const GUEST_IFACE_ID: &str = "eth0";
pub(super) const MIB: u64 = 1024 * 1024;

/// The kernel and rootfs as Firecracker sees them (inside the chroot under the jailer).
pub(super) struct GuestPaths {
    kernel: String,
    rootfs: String,
}

impl FirecrackerProvider {
    pub(super) async fn launch(
        &self,
        record: &WorkerRecord,
        host: &HostPaths,
        dir: &Path,
    ) -> Result<(Child, GuestPaths), ProviderError> {
        let console =
            std::fs::File::create(dir.join(CONSOLE_FILE)).map_err(|e| infra(format!("console log: {e}")))?;
        let console_err = console.try_clone().map_err(|e| infra(format!("console log: {e}")))?;
        let mut guest = GuestPaths {
            kernel: self.config.kernel_image.display().to_string(),
            rootfs: host.rootfs.display().to_string(),
        };
        if self.config.copy_rootfs {
            let copy = dir.join("rootfs");
            tokio::fs::copy(&host.rootfs, &copy)
                .await
                .map_err(|e| infra(format!("copying the rootfs: {e}")))?;
            guest.rootfs = copy.display().to_string();
        }
        let mut command = match (&self.config.jailer, &host.jailer, &record.jail_dir) {
            (Some(jail), Some(jailer), Some(jail_dir)) => {
                let root = jail_dir.join("root");
                std::fs::create_dir_all(root.join("run"))
                    .map_err(|e| infra(format!("jail {}: {e}", root.display())))?;
                link_into(&self.config.kernel_image, &root.join("vmlinux"))?;
                link_into(Path::new(&guest.rootfs), &root.join("rootfs.ext4"))?;
                guest = GuestPaths { kernel: "/vmlinux".to_owned(), rootfs: "/rootfs.ext4".to_owned() };
                let mut command = Command::new(jailer);
                command.args(jailer_args(jail, &host.firecracker, &record.worker_id));
                command
            }
            _ => Command::new(&host.firecracker),
        };
        command
            .args(&self.config.firecracker_args)
            .arg("--api-sock")
            .arg(&record.api_sock_arg)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            // A VM outlives a crash of this process; the next run finds and reaps it.
            .kill_on_drop(false)
            // Its own group, so a terminal's Ctrl-C meant for the control plane spares it.
            .process_group(0);
        let child = command.spawn().map_err(|e| {
            infra(format!("cannot start {}: {e}", command.as_std().get_program().to_string_lossy()))
        })?;
        if let Some(pid) = child.id() {
            std::fs::write(dir.join(PID_FILE), pid.to_string())
                .map_err(|e| infra(format!("pid file: {e}")))?;
        }
        Ok((child, guest))
    }

    /// Waits until the API socket answers, retrying the connection with a short backoff until
    /// `api_timeout`, and gives up as soon as the VMM exits.
    pub(super) async fn wait_for_api(
        &self,
        child: &mut Child,
        record: &WorkerRecord,
    ) -> Result<FirecrackerClient, ProviderError> {
        let deadline = Instant::now() + self.config.api_timeout;
        let mut backoff = Duration::from_millis(1);
        loop {
            let last_error = match FirecrackerClient::connect(&record.api_socket).await {
                Ok(client) => match client.describe_instance().await {
                    Ok(_) => return Ok(client),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ProviderError::Unreachable {
                    provider: PROVIDER.to_owned(),
                    endpoint: record.api_socket.display().to_string(),
                    reason: format!("no answer within {:?}: {last_error}", self.config.api_timeout),
                });
            }
            tokio::select! {
                status = child.wait() => {
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    return Err(ProviderError::ExitedBeforeRegistering {
                        provider: PROVIDER.to_owned(),
                        worker_id: record.worker_id.clone(),
                        status: format!("firecracker exited ({status}) before its API socket answered"),
                        output: self.console_tail(&record.worker_id),
                    });
                }
                () = tokio::time::sleep(backoff.min(deadline - now)) => {}
            }
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    pub(super) async fn configure_and_start(
        &self,
        client: &FirecrackerClient,
        spec: &WorkerSpec,
        record: &WorkerRecord,
        guest: &GuestPaths,
    ) -> Result<(), ApiError> {
        client.put_machine_config(&self.machine_config(spec)).await?;
        let mut boot_args = self.config.boot_args.clone();
        if let Some(ip) = spec.provider_config.get("kernel_ip") {
            boot_args.push_str(" ip=");
            boot_args.push_str(ip);
        }
        client.put_boot_source(&BootSource::new(&guest.kernel, boot_args)).await?;
        client.put_drive(&Drive::root(ROOT_DRIVE_ID, &guest.rootfs, !self.config.copy_rootfs)).await?;
        client.put_network_interface(&NetworkInterface::new(GUEST_IFACE_ID, &record.tap_name)).await?;
        client.put_mmds_config(&MmdsConfig::v2(vec![GUEST_IFACE_ID.to_owned()])).await?;
        client.put_mmds(&registration_metadata(spec)).await?;
        client.action(Action::InstanceStart).await
    }

    pub(super) fn machine_config(&self, spec: &WorkerSpec) -> MachineConfig {
        let vcpus = spec.resources.cpu_millis.map_or(self.config.default_vcpus, |millis| {
            u32::try_from(millis.div_ceil(1000).max(1)).unwrap_or(u32::MAX)
        });
        let mem_mib =
            spec.resources.memory_bytes.map_or(self.config.default_mem_mib, |bytes| bytes.div_ceil(MIB));
        MachineConfig::new(vcpus, mem_mib)
    }
}

/// The MMDS store: the agent's environment, its CA and its labels. The token is only here.
fn registration_metadata(spec: &WorkerSpec) -> serde_json::Value {
    let env: serde_json::Map<String, serde_json::Value> = spec
        .agent
        .variables(&spec.worker_id)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), serde_json::Value::String(value)))
        .collect();
    serde_json::json!({
        "hodei": {
            "worker_id": spec.worker_id,
            "env": env,
            "ca_bundle_pem": spec.agent.ca_bundle_pem,
            "labels": spec.all_labels(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firecracker::FirecrackerConfig;
    use crate::firecracker::test_support::spec;

    #[test]
    fn resources_round_up_to_whole_vcpus_and_mib() {
        let provider = FirecrackerProvider::new(FirecrackerConfig::new("/k").default_machine(1, 128));
        assert_eq!(provider.machine_config(&spec(Some(1500), Some(300_000_000))), MachineConfig::new(2, 287));
        assert_eq!(provider.machine_config(&spec(Some(1), Some(MIB))), MachineConfig::new(1, 1));
        assert_eq!(provider.machine_config(&spec(Some(0), None)), MachineConfig::new(1, 128));
        assert_eq!(provider.machine_config(&spec(None, None)), MachineConfig::new(1, 128));
    }

    #[test]
    fn the_token_is_in_the_metadata_and_nowhere_in_the_boot_args() {
        let spec = spec(None, None);
        let metadata = registration_metadata(&spec);
        assert_eq!(metadata["hodei"]["env"]["HODEI_TOKEN"], "secret-token");
        assert_eq!(metadata["hodei"]["env"]["HODEI_WORKER_ID"], "w-1");
        assert_eq!(metadata["hodei"]["labels"][crate::WORKER_ID_LABEL], "w-1");
        assert!(!FirecrackerConfig::new("/k").boot_args.contains("secret-token"));
    }
}
