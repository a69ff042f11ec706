//! The guest's network interface: a host TAP device, either one made beforehand or one per
//! worker that the provider creates and deletes.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::FirecrackerProvider;
use super::errors::{infra, invalid};
use crate::provider::{ProviderError, WorkerSpec};

/// Linux interface names hold 15 bytes.
pub(super) const MAX_TAP_NAME: usize = 15;

/// Where the guest's network interface comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TapDevice {
    /// A TAP device made beforehand (e.g. `ip tuntap add dev fc0 mode tap user $USER`). A
    /// spec's `provider_config["tap_device"]` names it, else `default_name`. A TAP carries one
    /// VM at a time; Hodei neither creates nor deletes it.
    Existing {
        /// The TAP used when the spec names none.
        default_name: Option<String>,
    },
    /// One TAP per worker, made with `ip tuntap add` and deleted on destroy. Needs
    /// `CAP_NET_ADMIN` (root, or `setcap cap_net_admin+ep` on the binary running the provider).
    Create {
        /// The `ip` tool (iproute2).
        ip_binary: PathBuf,
        /// The TAP's name is this prefix and a hash of the worker id, 15 bytes at most.
        name_prefix: String,
        /// A bridge to attach each TAP to, which holds the host's address on the guests'
        /// network; unattached when `None`.
        bridge: Option<String>,
    },
}

impl FirecrackerProvider {
    pub(super) fn tap_for(&self, spec: &WorkerSpec) -> Result<(String, bool), ProviderError> {
        let (name, created) = match &self.config.tap {
            TapDevice::Existing { default_name } => {
                match spec.provider_config.get("tap_device").cloned().or_else(|| default_name.clone()) {
                    Some(name) => (name, false),
                    None => {
                        return Err(invalid(
                            "no TAP device: set provider_config `tap_device` or a default TAP in the provider",
                        ));
                    }
                }
            }
            TapDevice::Create { name_prefix, .. } => {
                let hash = format!("{:08x}", fnv1a(spec.worker_id.as_bytes()) as u32);
                let keep = MAX_TAP_NAME.saturating_sub(hash.len()).min(name_prefix.len());
                (format!("{}{hash}", &name_prefix[..keep]), true)
            }
        };
        if name.is_empty() || name.len() > MAX_TAP_NAME || name.contains(['/', ' ']) {
            return Err(invalid(format!("TAP name `{name}` is not a valid interface name (1 to 15 bytes)")));
        }
        Ok((name, created))
    }

    pub(super) async fn create_tap(&self, name: &str) -> Result<(), ProviderError> {
        let TapDevice::Create { ip_binary, bridge, .. } = &self.config.tap else { return Ok(()) };
        let user = rustix::process::getuid().as_raw().to_string();
        run_ip(ip_binary, &["tuntap", "add", "dev", name, "mode", "tap", "user", &user]).await?;
        let mut up = vec!["link", "set", "dev", name];
        if let Some(bridge) = bridge {
            up.extend(["master", bridge.as_str()]);
        }
        up.push("up");
        if let Err(e) = run_ip(ip_binary, &up).await {
            let _ = run_ip(ip_binary, &["link", "del", "dev", name]).await;
            return Err(e);
        }
        Ok(())
    }
}

pub(super) async fn run_ip(ip_binary: &Path, args: &[&str]) -> Result<(), ProviderError> {
    let output = Command::new(ip_binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| infra(format!("cannot run {}: {e}", ip_binary.display())))?;
    if output.status.success() {
        return Ok(());
    }
    Err(infra(format!(
        "`{} {}` failed ({}): {} (creating TAPs needs CAP_NET_ADMIN)",
        ip_binary.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// A stable, dependency-free hash for TAP names (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firecracker::FirecrackerConfig;
    use crate::firecracker::test_support::spec;

    #[test]
    fn created_tap_names_fit_an_interface_name_and_differ_per_worker() {
        let tap = TapDevice::Create { ip_binary: "ip".into(), name_prefix: "hodei-fc-".into(), bridge: None };
        let provider = FirecrackerProvider::new(FirecrackerConfig::new("/k").tap(tap));
        let (first, created) = provider.tap_for(&spec(None, None)).expect("tap");
        let mut other = spec(None, None);
        other.worker_id = "w-2".into();
        let (second, _) = provider.tap_for(&other).expect("tap");
        assert!(created);
        assert!(first.len() <= MAX_TAP_NAME && first.starts_with("hodei-"), "{first}");
        assert_ne!(first, second);
    }
}
