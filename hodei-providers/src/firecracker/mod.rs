//! Workers as Firecracker microVMs (cargo feature `firecracker`).
//!
//! [`FirecrackerProvider`] starts one `firecracker` process per worker (directly, or through
//! the `jailer`) with its API socket in a per-worker state directory, waits until that socket
//! answers, then configures the VM through [`FirecrackerClient`] and boots it:
//!
//! 1. `PUT /machine-config`: vCPUs are the spec's `cpu_millis` rounded up to whole cores,
//!    memory its `memory_bytes` rounded up to MiB;
//! 2. `PUT /boot-source`: the configured kernel and boot args;
//! 3. `PUT /drives/rootfs`: the root drive, the spec's `image` or the configured rootfs;
//! 4. `PUT /network-interfaces/eth0`: a host TAP device (see below);
//! 5. `PUT /mmds/config` and `PUT /mmds`: the agent's registration data;
//! 6. `PUT /actions` `InstanceStart`.
//!
//! # How the agent gets its token
//!
//! Through MMDS, Firecracker's metadata service, not the kernel command line: boot args are
//! readable by every host user in `/proc/<pid>/cmdline`, while MMDS contents only cross the
//! API socket, which lives in a `0700` directory. MMDS version 2 is used, so the guest must
//! fetch a session token (`PUT /latest/api/token`) before it can read anything. The store
//! holds `{"hodei": {"worker_id", "env": {HODEI_*...}, "ca_bundle_pem", "labels"}}`; the
//! rootfs's init reads it from `169.254.169.254` and starts the agent with that environment.
//!
//! # Network: a TAP, not vsock
//!
//! The agent dials the hub over TCP (gRPC + mTLS) and MMDS is only reachable through a
//! network interface, so a TAP device serves both; vsock would need a proxy on each side to
//! carry the agent's TCP. Creating TAPs needs `CAP_NET_ADMIN`, so by default the provider
//! uses a TAP someone else made ([`TapDevice::Existing`]); [`TapDevice::Create`] makes one per
//! worker with `ip tuntap`, attaches it to a bridge, and deletes it on destroy.
//!
//! # State and orphans
//!
//! Each worker has `<state_dir>/<worker_id>/` holding `worker.json` (its labels and
//! resources), `firecracker.pid`, the API socket and `console.log` (the VMM's output, which
//! carries the guest's serial console). [`Provider::list`] reads these directories, so VMs a
//! previous run left behind are found; a pid is only signalled after `/proc/<pid>/cmdline`
//! shows it is the VMM of that worker's socket.
//!
//! Nothing here can boot a guest without KVM: the tests drive a fake VMM that checks every
//! request against Firecracker's swagger spec.
//!
//! [`Provider::list`]: crate::Provider::list

mod api;
mod boot;
mod config;
mod errors;
mod host;
mod jailer;
mod process;
mod provider;
mod state_dir;
mod tap;
mod teardown;
#[cfg(test)]
mod test_support;
mod vmm;

pub use api::{
    Action, ApiError, BootSource, Drive, FirecrackerClient, InstanceInfo, MachineConfig, MmdsConfig,
    NetworkInterface,
};
pub use config::FirecrackerConfig;
pub use jailer::JailerConfig;
pub use provider::FirecrackerProvider;
pub use tap::TapDevice;
