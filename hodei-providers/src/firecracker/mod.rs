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

mod api;
mod process;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

pub use api::{
    Action, ApiError, BootSource, Drive, FirecrackerClient, InstanceInfo, MachineConfig, MmdsConfig,
    NetworkInterface,
};
use process::VmmProcess;

use crate::provider::{Provider, ProviderError, WorkerInfo, WorkerSpec, WorkerState};

const PROVIDER: &str = "firecracker";
const RECORD_FILE: &str = "worker.json";
const PID_FILE: &str = "firecracker.pid";
const SOCKET_FILE: &str = "api.socket";
const CONSOLE_FILE: &str = "console.log";
const ROOT_DRIVE_ID: &str = "rootfs";
const GUEST_IFACE_ID: &str = "eth0";
/// The most of a worker's console that [`Provider::output`] returns.
const OUTPUT_TAIL_BYTES: u64 = 64 * 1024;
/// `sun_path` holds 108 bytes, NUL included.
const MAX_SOCKET_PATH: usize = 107;
const MIB: u64 = 1024 * 1024;
/// Linux interface names hold 15 bytes.
const MAX_TAP_NAME: usize = 15;

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

/// How [`FirecrackerProvider`] starts and configures its VMs.
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

/// What `worker.json` holds: enough to find, list and tear down a worker without this
/// process's memory of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkerRecord {
    worker_id: String,
    labels: BTreeMap<String, String>,
    /// The API socket as seen from the host.
    api_socket: PathBuf,
    /// The `--api-sock` value on the VMM's command line (inside the chroot under the jailer).
    api_sock_arg: String,
    /// The TAP, and whether Hodei created it (and so deletes it).
    tap_name: String,
    tap_created: bool,
    /// The jail's directory, removed with the worker.
    jail_dir: Option<PathBuf>,
}

/// Workers as Firecracker microVMs; see the [module docs](self).
#[derive(Debug)]
pub struct FirecrackerProvider {
    config: FirecrackerConfig,
    /// The VMMs this process spawned, so that their exit codes are known and they are reaped.
    children: Mutex<HashMap<String, Child>>,
}

impl FirecrackerProvider {
    /// A provider with `config`.
    pub fn new(config: FirecrackerConfig) -> Self {
        Self { config, children: Mutex::new(HashMap::new()) }
    }

    /// Its configuration.
    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    /// Destroys every worker in the state directory that this provider did not start (those a
    /// previous run left behind) and returns their ids.
    pub async fn reap_orphans(&self) -> Result<Vec<String>, ProviderError> {
        let mut reaped = Vec::new();
        for worker in self.list().await? {
            if !self.children.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&worker.worker_id) {
                self.destroy(&worker.worker_id).await?;
                reaped.push(worker.worker_id);
            }
        }
        Ok(reaped)
    }

    fn worker_dir(&self, worker_id: &str) -> PathBuf {
        self.config.state_dir.join(worker_id)
    }

    fn read_record(&self, worker_id: &str) -> Option<WorkerRecord> {
        let bytes = std::fs::read(self.worker_dir(worker_id).join(RECORD_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The worker's VMM, if it still runs.
    fn running_vmm(&self, record: &WorkerRecord) -> Option<VmmProcess> {
        let pid = process::read_pid_file(&self.worker_dir(&record.worker_id).join(PID_FILE))?;
        let mut markers = vec![record.api_sock_arg.as_str()];
        if record.jail_dir.is_some() {
            markers.push(&record.worker_id);
        }
        VmmProcess::open_if_ours(pid, &markers)
    }

    fn worker_state(&self, record: &WorkerRecord) -> WorkerState {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = children.get_mut(&record.worker_id) {
            return match child.try_wait() {
                Ok(None) => WorkerState::Running,
                Ok(Some(status)) => {
                    WorkerState::Exited { code: status.code(), reason: Some(status.to_string()) }
                }
                Err(e) => WorkerState::Exited { code: None, reason: Some(e.to_string()) },
            };
        }
        drop(children);
        match self.running_vmm(record) {
            Some(_) => WorkerState::Running,
            None => WorkerState::Exited { code: None, reason: Some("the VMM is not running".to_owned()) },
        }
    }

    /// Checks everything provisioning needs on the host, naming what is missing.
    fn check_host(&self, spec: &WorkerSpec) -> Result<HostPaths, ProviderError> {
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

    fn tap_for(&self, spec: &WorkerSpec) -> Result<(String, bool), ProviderError> {
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

    async fn launch(
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
    async fn wait_for_api(
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

    async fn configure_and_start(
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

    fn machine_config(&self, spec: &WorkerSpec) -> MachineConfig {
        let vcpus = spec.resources.cpu_millis.map_or(self.config.default_vcpus, |millis| {
            u32::try_from(millis.div_ceil(1000).max(1)).unwrap_or(u32::MAX)
        });
        let mem_mib =
            spec.resources.memory_bytes.map_or(self.config.default_mem_mib, |bytes| bytes.div_ceil(MIB));
        MachineConfig::new(vcpus, mem_mib)
    }

    fn console_tail(&self, worker_id: &str) -> String {
        let path = self.worker_dir(worker_id).join(CONSOLE_FILE);
        let Ok(mut file) = std::fs::File::open(path) else { return String::new() };
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(OUTPUT_TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    async fn create_tap(&self, name: &str) -> Result<(), ProviderError> {
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

    /// Stops the worker's VMM (Ctrl-Alt-Del, then SIGKILL after `shutdown_timeout`) and removes
    /// its socket, TAP, jail and state directory. Safe on a half-provisioned worker.
    async fn tear_down(&self, record: &WorkerRecord, mut child: Option<Child>) -> Result<(), ProviderError> {
        if let Some(vmm) = self.running_vmm(record) {
            // A guest that was never started, or has no i8042 driver, ignores this: the
            // deadline below is the fallback.
            let asked = match FirecrackerClient::connect(&record.api_socket).await {
                Ok(client) => client.action(Action::SendCtrlAltDel).await.is_ok(),
                Err(_) => false,
            };
            let exited = asked && vmm.wait_exit(self.config.shutdown_timeout).await.unwrap_or(false);
            if !exited {
                vmm.kill().map_err(|e| infra(format!("cannot kill the VMM (pid {}): {e}", vmm.pid())))?;
                if !vmm.wait_exit(self.config.shutdown_timeout).await.unwrap_or(false) {
                    return Err(infra(format!("the VMM (pid {}) survived SIGKILL", vmm.pid())));
                }
            }
        } else if let Some(child) = child.as_mut() {
            // Spawned, but its pid file or command line is not there yet: kill it directly.
            let _ = child.start_kill();
        }
        if let Some(mut child) = child {
            let _ = child.wait().await;
        }
        remove_if_present(&record.api_socket)?;
        if record.tap_created
            && let TapDevice::Create { ip_binary, .. } = &self.config.tap
        {
            run_ip(ip_binary, &["link", "del", "dev", &record.tap_name]).await?;
        }
        if let Some(jail) = &record.jail_dir {
            remove_dir_if_present(jail)?;
        }
        remove_dir_if_present(&self.worker_dir(&record.worker_id))
    }

    async fn provision_in(
        &self,
        spec: &WorkerSpec,
        dir: &Path,
        record: &WorkerRecord,
    ) -> Result<(), ProviderError> {
        let host = self.check_host(spec)?;
        write_record(dir, record)?;
        if record.tap_created {
            self.create_tap(&record.tap_name).await?;
        }
        let (mut child, guest) = match self.launch(record, &host, dir).await {
            Ok(launched) => launched,
            Err(e) => {
                // The TAP (and jail) may already exist.
                if let Err(cleanup) = self.tear_down(record, None).await {
                    tracing::warn!(worker_id = %spec.worker_id, %cleanup, "cleaning up a microVM that did not start");
                }
                return Err(e);
            }
        };
        let booted = match self.wait_for_api(&mut child, record).await {
            Ok(client) => self.configure_and_start(&client, spec, record, &guest).await.map_err(api_error),
            Err(e) => Err(e),
        };
        match booted {
            Ok(()) => {
                self.children.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.worker_id.clone(), child);
                Ok(())
            }
            Err(e) => {
                if let Err(cleanup) = self.tear_down(record, Some(child)).await {
                    tracing::warn!(worker_id = %spec.worker_id, %cleanup, "cleaning up a failed microVM");
                }
                Err(e)
            }
        }
    }
}

struct HostPaths {
    firecracker: PathBuf,
    jailer: Option<PathBuf>,
    rootfs: PathBuf,
}

/// The kernel and rootfs as Firecracker sees them (inside the chroot under the jailer).
struct GuestPaths {
    kernel: String,
    rootfs: String,
}

#[async_trait::async_trait]
impl Provider for FirecrackerProvider {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("os".to_owned(), "linux".to_owned()),
            ("isolation".to_owned(), "microvm".to_owned()),
        ])
    }

    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        validate_worker_id(&spec.worker_id)?;
        let dir = self.worker_dir(&spec.worker_id);
        let (api_socket, api_sock_arg, jail_dir) = match &self.config.jailer {
            Some(jail) => {
                // The jailer's `--id` takes only letters, digits and hyphens.
                if !spec.worker_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    return Err(invalid(format!(
                        "worker id `{}` cannot be a jailer id (letters, digits and `-` only)",
                        spec.worker_id
                    )));
                }
                let exec_name = self.config.firecracker_binary.file_name().unwrap_or_default();
                let jail_dir = jail.chroot_base_dir.join(exec_name).join(&spec.worker_id);
                let socket = jail_dir.join("root/run").join(SOCKET_FILE);
                (socket, format!("/run/{SOCKET_FILE}"), Some(jail_dir))
            }
            None => {
                let socket = dir.join(SOCKET_FILE);
                let arg = socket.display().to_string();
                (socket, arg, None)
            }
        };
        if api_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(format!(
                "the API socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); \
                 choose a shorter state directory",
                api_socket.display()
            )));
        }
        let (tap_name, tap_created) = self.tap_for(spec)?;
        let record = WorkerRecord {
            worker_id: spec.worker_id.clone(),
            labels: spec.all_labels(),
            api_socket,
            api_sock_arg,
            tap_name,
            tap_created,
            jail_dir,
        };
        create_private_dir(&self.config.state_dir)?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(invalid(format!(
                    "worker `{}` already exists in {} (destroy it first)",
                    spec.worker_id,
                    self.config.state_dir.display()
                )));
            }
            Err(e) => return Err(infra(format!("cannot create {}: {e}", dir.display()))),
        }
        if let Err(e) = self.provision_in(spec, &dir, &record).await {
            // Tear-down already ran if a VMM was started; this covers failures before it.
            let _ = remove_dir_if_present(&dir);
            return Err(e);
        }
        let pid = process::read_pid_file(&dir.join(PID_FILE)).map(|p| p.to_string()).unwrap_or_default();
        Ok(WorkerInfo::new(&spec.worker_id, pid, record.labels, WorkerState::Running))
    }

    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        Ok(self.read_record(worker_id).map_or(WorkerState::Gone, |record| self.worker_state(&record)))
    }

    async fn output(&self, worker_id: &str) -> Result<String, ProviderError> {
        if self.read_record(worker_id).is_none() {
            return Err(ProviderError::NotFound {
                provider: PROVIDER.to_owned(),
                worker_id: worker_id.to_owned(),
            });
        }
        Ok(self.console_tail(worker_id))
    }

    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        let child = self.children.lock().unwrap_or_else(|p| p.into_inner()).remove(worker_id);
        match self.read_record(worker_id) {
            Some(record) => self.tear_down(&record, child).await,
            None => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        let entries = match std::fs::read_dir(&self.config.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(infra(format!("cannot read {}: {e}", self.config.state_dir.display()))),
        };
        let mut workers = Vec::new();
        for entry in entries.flatten() {
            let Some(record) = entry.file_name().to_str().and_then(|id| self.read_record(id)) else {
                continue;
            };
            if record.labels.get(crate::MANAGED_BY_LABEL).map(String::as_str) != Some(crate::MANAGED_BY_VALUE)
            {
                continue;
            }
            let pid = process::read_pid_file(&entry.path().join(PID_FILE))
                .map(|p| p.to_string())
                .unwrap_or_default();
            let state = self.worker_state(&record);
            workers.push(WorkerInfo::new(record.worker_id, pid, record.labels, state));
        }
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(workers)
    }
}

/// The jailer's own arguments; Firecracker's follow the `--`.
fn jailer_args(jail: &JailerConfig, firecracker: &Path, worker_id: &str) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--id".into(), worker_id.into(), "--exec-file".into()];
    args.push(firecracker.into());
    args.extend(["--uid".into(), jail.uid.to_string().into(), "--gid".into(), jail.gid.to_string().into()]);
    args.extend(["--chroot-base-dir".into(), jail.chroot_base_dir.clone().into_os_string(), "--".into()]);
    args
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

fn api_error(error: ApiError) -> ProviderError {
    match &error {
        ApiError::Rejected { status, .. } if status.is_client_error() => invalid(error.to_string()),
        ApiError::Connect { socket, source } => ProviderError::Unreachable {
            provider: PROVIDER.to_owned(),
            endpoint: socket.display().to_string(),
            reason: source.to_string(),
        },
        _ => infra(error.to_string()),
    }
}

fn invalid(reason: impl Into<String>) -> ProviderError {
    ProviderError::InvalidSpec { provider: PROVIDER.to_owned(), reason: reason.into() }
}

fn infra(reason: impl Into<String>) -> ProviderError {
    ProviderError::Infrastructure { provider: PROVIDER.to_owned(), reason: reason.into() }
}

/// Worker ids become directory names, jailer ids and parts of TAP names.
fn validate_worker_id(worker_id: &str) -> Result<(), ProviderError> {
    let valid = !worker_id.is_empty()
        && worker_id.len() <= 64
        && !worker_id.starts_with(['.', '-'])
        && worker_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "worker id `{worker_id}` must be 1 to 64 of [A-Za-z0-9._-], not starting with `.` or `-`"
        )))
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

fn create_private_dir(dir: &Path) -> Result<(), ProviderError> {
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(infra(format!("cannot create {}: {e}", dir.display()))),
    }
    let metadata = std::fs::metadata(dir).map_err(|e| infra(format!("{}: {e}", dir.display())))?;
    // The sockets in here accept the registration token: nobody else may reach them.
    if metadata.uid() != rustix::process::getuid().as_raw() || metadata.mode() & 0o077 != 0 {
        return Err(invalid(format!(
            "the state directory {} must be owned by this user with mode 0700",
            dir.display()
        )));
    }
    Ok(())
}

fn write_record(dir: &Path, record: &WorkerRecord) -> Result<(), ProviderError> {
    let json = serde_json::to_vec_pretty(record).map_err(|e| infra(format!("worker record: {e}")))?;
    std::fs::write(dir.join(RECORD_FILE), json).map_err(|e| infra(format!("worker record: {e}")))
}

fn link_into(source: &Path, target: &Path) -> Result<(), ProviderError> {
    remove_if_present(target)?;
    std::fs::hard_link(source, target).map_err(|e| {
        infra(format!(
            "cannot hard-link {} into the jail as {} (it must be on the same filesystem): {e}",
            source.display(),
            target.display()
        ))
    })
}

fn remove_if_present(path: &Path) -> Result<(), ProviderError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(infra(format!("cannot remove {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

fn remove_dir_if_present(path: &Path) -> Result<(), ProviderError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(infra(format!("cannot remove {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

async fn run_ip(ip_binary: &Path, args: &[&str]) -> Result<(), ProviderError> {
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
    use crate::AgentEnv;
    use hodei_agent::jobs::Resources;

    fn spec(cpu_millis: Option<u64>, memory_bytes: Option<u64>) -> WorkerSpec {
        let mut spec =
            WorkerSpec::new("w-1", AgentEnv::new("127.0.0.1:1", "127.0.0.1:2", "secret-token", "PEM"));
        spec.resources = Resources::new(cpu_millis, memory_bytes);
        spec
    }

    #[test]
    fn resources_round_up_to_whole_vcpus_and_mib() {
        let provider = FirecrackerProvider::new(FirecrackerConfig::new("/k").default_machine(1, 128));
        assert_eq!(provider.machine_config(&spec(Some(1500), Some(300_000_000))), MachineConfig::new(2, 287));
        assert_eq!(provider.machine_config(&spec(Some(1), Some(MIB))), MachineConfig::new(1, 1));
        assert_eq!(provider.machine_config(&spec(Some(0), None)), MachineConfig::new(1, 128));
        assert_eq!(provider.machine_config(&spec(None, None)), MachineConfig::new(1, 128));
    }

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

    #[test]
    fn worker_ids_that_are_not_path_safe_are_refused() {
        for bad in ["", "../x", ".hidden", "a/b", "-flag", "sp ace"] {
            assert!(matches!(validate_worker_id(bad), Err(ProviderError::InvalidSpec { .. })), "{bad:?}");
        }
        validate_worker_id("build-42_a.b").expect("a path-safe id");
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
