//! How the provider starts and configures its VMs: binaries, kernel, rootfs, network, state
//! directory, default machine and timeouts.

use std::path::PathBuf;
use std::time::Duration;

use super::{JailerConfig, TapDevice};

/// How [`FirecrackerProvider`](super::FirecrackerProvider) starts and configures its VMs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FirecrackerConfig {
    /// The `firecracker` binary: a path, or a name looked up in `PATH`.
    pub firecracker_binary: PathBuf,
    /// Arguments given to Firecracker before `--api-sock` (e.g. `--level`, `--boot-timer`).
    pub firecracker_args: Vec<String>,
    /// Start Firecracker through the jailer when set.
    pub jailer: Option<JailerConfig>,
    /// The KVM device, which must open read-write.
    pub kvm_device: PathBuf,
    /// The uncompressed guest kernel (vmlinux).
    pub kernel_image: PathBuf,
    /// The kernel command line. `ip=` is appended from a spec's `provider_config["kernel_ip"]`.
    pub boot_args: String,
    /// The rootfs holding the agent, when the spec's `image` names none.
    pub rootfs: Option<PathBuf>,
    /// Give each VM a private copy of the rootfs (writable) instead of sharing it read-only.
    pub copy_rootfs: bool,
    /// The guest's network interface.
    pub tap: TapDevice,
    /// Where per-worker state lives (created `0700`).
    pub state_dir: PathBuf,
    /// vCPUs when the spec sets no CPU limit.
    pub default_vcpus: u32,
    /// Guest memory in MiB when the spec sets no memory limit.
    pub default_mem_mib: u64,
    /// How long the VMM may take to answer on its API socket after it starts.
    pub api_timeout: Duration,
    /// How long a guest gets to shut down after Ctrl-Alt-Del before its VMM is killed.
    pub shutdown_timeout: Duration,
}

impl FirecrackerConfig {
    /// Boot `kernel_image`, with `firecracker` from `PATH`, `/dev/kvm`, an existing TAP and
    /// state in `$XDG_RUNTIME_DIR/hodei-firecracker` (or `/tmp/hodei-firecracker-<uid>`).
    pub fn new(kernel_image: impl Into<PathBuf>) -> Self {
        let state_dir = match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(runtime) => PathBuf::from(runtime).join("hodei-firecracker"),
            None => {
                std::env::temp_dir().join(format!("hodei-firecracker-{}", rustix::process::getuid().as_raw()))
            }
        };
        Self {
            firecracker_binary: PathBuf::from("firecracker"),
            firecracker_args: Vec::new(),
            jailer: None,
            kvm_device: PathBuf::from("/dev/kvm"),
            kernel_image: kernel_image.into(),
            boot_args: "console=ttyS0 reboot=k panic=1 pci=off".to_owned(),
            rootfs: None,
            copy_rootfs: false,
            tap: TapDevice::Existing { default_name: None },
            state_dir,
            default_vcpus: 1,
            default_mem_mib: 256,
            api_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
        }
    }

    /// Sets [`FirecrackerConfig::firecracker_binary`].
    pub fn firecracker_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.firecracker_binary = binary.into();
        self
    }

    /// Sets [`FirecrackerConfig::firecracker_args`].
    pub fn firecracker_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.firecracker_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`FirecrackerConfig::jailer`].
    pub fn jailer(mut self, jailer: JailerConfig) -> Self {
        self.jailer = Some(jailer);
        self
    }

    /// Sets [`FirecrackerConfig::kvm_device`].
    pub fn kvm_device(mut self, device: impl Into<PathBuf>) -> Self {
        self.kvm_device = device.into();
        self
    }

    /// Sets [`FirecrackerConfig::kernel_image`].
    pub fn kernel_image(mut self, kernel: impl Into<PathBuf>) -> Self {
        self.kernel_image = kernel.into();
        self
    }

    /// Sets [`FirecrackerConfig::boot_args`].
    pub fn boot_args(mut self, boot_args: impl Into<String>) -> Self {
        self.boot_args = boot_args.into();
        self
    }

    /// Sets [`FirecrackerConfig::rootfs`].
    pub fn rootfs(mut self, rootfs: impl Into<PathBuf>) -> Self {
        self.rootfs = Some(rootfs.into());
        self
    }

    /// Sets [`FirecrackerConfig::copy_rootfs`].
    pub fn copy_rootfs(mut self, copy: bool) -> Self {
        self.copy_rootfs = copy;
        self
    }

    /// Sets [`FirecrackerConfig::tap`].
    pub fn tap(mut self, tap: TapDevice) -> Self {
        self.tap = tap;
        self
    }

    /// Sets [`FirecrackerConfig::state_dir`].
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// Sets [`FirecrackerConfig::default_vcpus`] and [`FirecrackerConfig::default_mem_mib`].
    pub fn default_machine(mut self, vcpus: u32, mem_mib: u64) -> Self {
        self.default_vcpus = vcpus;
        self.default_mem_mib = mem_mib;
        self
    }

    /// Sets [`FirecrackerConfig::api_timeout`].
    pub fn api_timeout(mut self, timeout: Duration) -> Self {
        self.api_timeout = timeout;
        self
    }

    /// Sets [`FirecrackerConfig::shutdown_timeout`].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }
}
