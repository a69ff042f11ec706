//! The Firecracker provider against a fake VMM that checks every request against
//! Firecracker's swagger spec.
//!
//! The fake VMM is this test binary itself: the provider is pointed at `current_exe()` with
//! arguments that make libtest run only [`fake_firecracker_vmm`], which finds `--api-sock` on
//! its command line and serves the fake API there, like `firecracker --api-sock` would.
#![cfg(feature = "firecracker")]

mod firecracker_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use firecracker_support::{ApiSpec, FakeFirecracker, FakeOptions, Recorded};
use hodei_providers::firecracker::{
    Action, ApiError, BootSource, Drive, FirecrackerClient, FirecrackerConfig, FirecrackerProvider,
    MachineConfig, MmdsConfig, NetworkInterface, TapDevice,
};
use hodei_providers::{
    AgentEnv, MANAGED_BY_LABEL, Provider, ProviderError, WORKER_ID_LABEL, WorkerSpec, WorkerState,
};
use hodei_server::jobs::Resources;
use serde_json::json;

const CHILD_TEST: &str = "fake_firecracker_vmm";
const TOKEN: &str = "one-time-token-7f3a9c";
const TAP: &str = "tap-hodei0";

/// The fake VMM's entry point when the provider starts this binary as `firecracker`. Run as a
/// plain test, it checks that the spec it serves has every call the client makes.
#[test]
fn fake_firecracker_vmm() {
    let args: Vec<String> = std::env::args().collect();
    let Some(socket) = args.iter().position(|a| a == "--api-sock").and_then(|i| args.get(i + 1)) else {
        let spec = ApiSpec::load();
        for (method, template) in [
            ("GET", "/"),
            ("PUT", "/machine-config"),
            ("PUT", "/boot-source"),
            ("PUT", "/drives/{drive_id}"),
            ("PUT", "/network-interfaces/{iface_id}"),
            ("PUT", "/mmds/config"),
            ("PUT", "/mmds"),
            ("PUT", "/actions"),
        ] {
            assert!(spec.has_operation(method, template), "{method} {template} is not in the spec");
        }
        assert!(!spec.has_operation("DELETE", "/machine-config"));
        return;
    };
    let options = FakeOptions {
        ignore_ctrl_alt_del: args.iter().any(|a| a == "--fake-ignore-ctrl-alt-del"),
        log: args.iter().find_map(|a| a.strip_prefix("--fake-log=")).map(PathBuf::from),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let mut fake = FakeFirecracker::serve(Path::new(socket), options).expect("the fake API socket");
        println!("fake firecracker: API on {socket}");
        let _ = fake.shutdown.wait_for(|stopped| *stopped).await;
        println!("fake firecracker: guest shut down");
    });
    // Exits the way Firecracker does when its guest reboots, without libtest's summary.
    std::process::exit(0);
}

/// A host with a kernel, a rootfs and a KVM device that are plain files, and a state dir.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        for file in ["vmlinux", "rootfs.ext4", "kvm"] {
            std::fs::write(dir.path().join(file), b"not really").expect("a host file");
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> PathBuf {
        self.path("requests.jsonl")
    }

    fn config_with(&self, fake_args: &[&str]) -> FirecrackerConfig {
        let log = format!("--fake-log={}", self.log().display());
        let mut args = vec!["--exact", CHILD_TEST, "--nocapture", "--test-threads=1", "--", log.as_str()];
        args.extend(fake_args);
        FirecrackerConfig::new(self.path("vmlinux"))
            .firecracker_binary(std::env::current_exe().expect("the test binary"))
            .firecracker_args(args)
            .kvm_device(self.path("kvm"))
            .rootfs(self.path("rootfs.ext4"))
            .tap(TapDevice::Existing { default_name: Some(TAP.to_owned()) })
            .state_dir(self.path("state"))
            // The fake VMM is this test binary, which a busy machine may be slow to start.
            .api_timeout(Duration::from_secs(60))
            .shutdown_timeout(Duration::from_secs(60))
    }

    fn config(&self) -> FirecrackerConfig {
        self.config_with(&[])
    }

    /// Every request the fake VMMs answered, in order.
    fn requests(&self) -> Vec<Recorded> {
        match std::fs::read_to_string(self.log()) {
            Ok(text) => text.lines().map(Recorded::from_json).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn socket(&self, worker_id: &str) -> PathBuf {
        self.path("state").join(worker_id).join("api.socket")
    }
}

fn spec(worker_id: &str) -> WorkerSpec {
    let mut spec = WorkerSpec::new(
        worker_id,
        AgentEnv::new("10.0.0.1:7001", "10.0.0.1:7002", TOKEN, "-----BEGIN CA-----"),
    );
    spec.resources = Resources::new(Some(1500), Some(512 * 1024 * 1024));
    spec.saga_id = Some("release-42".to_owned());
    spec.labels = BTreeMap::from([("team".to_owned(), "ci".to_owned())]);
    spec
}

fn cmdline(pid: &str) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn is_vmm_of(pid: &str, socket: &Path) -> bool {
    cmdline(pid).contains(&socket.display().to_string())
}

fn reason(error: &ProviderError) -> String {
    error.to_string()
}

#[tokio::test]
async fn provision_boots_the_vm_with_spec_conformant_requests_in_order() {
    let host = Host::new();
    let provider = FirecrackerProvider::new(host.config());
    let info = provider.provision(&spec("w-boot")).await.expect("provision");
    assert_eq!(info.state, WorkerState::Running);
    assert!(is_vmm_of(&info.handle, &host.socket("w-boot")), "the handle is the VMM's pid: {}", info.handle);

    let requests = host.requests();
    let calls: Vec<(&str, &str, u16)> =
        requests.iter().map(|r| (r.method.as_str(), r.path.as_str(), r.status)).collect();
    assert_eq!(
        calls,
        [
            ("GET", "/", 200),
            ("PUT", "/machine-config", 204),
            ("PUT", "/boot-source", 204),
            ("PUT", "/drives/rootfs", 204),
            ("PUT", "/network-interfaces/eth0", 204),
            ("PUT", "/mmds/config", 204),
            ("PUT", "/mmds", 204),
            ("PUT", "/actions", 204),
        ]
    );
    let body = |i: usize| requests[i].body.clone().expect("a body");
    assert_eq!(body(1), json!({ "vcpu_count": 2, "mem_size_mib": 512 }));
    assert_eq!(body(2)["kernel_image_path"], host.path("vmlinux").display().to_string());
    assert!(body(2)["boot_args"].as_str().expect("boot args").contains("console=ttyS0"));
    assert_eq!(
        body(3),
        json!({
            "drive_id": "rootfs",
            "path_on_host": host.path("rootfs.ext4").display().to_string(),
            "is_root_device": true,
            "is_read_only": true,
        })
    );
    assert_eq!(body(4), json!({ "iface_id": "eth0", "host_dev_name": TAP }));
    assert_eq!(body(5), json!({ "version": "V2", "network_interfaces": ["eth0"] }));
    let metadata = &body(6)["hodei"];
    assert_eq!(metadata["env"]["HODEI_TOKEN"], TOKEN);
    assert_eq!(metadata["env"]["HODEI_WORKER_ID"], "w-boot");
    assert_eq!(metadata["env"]["HODEI_REGISTRATION_ADDR"], "10.0.0.1:7001");
    assert_eq!(metadata["ca_bundle_pem"], "-----BEGIN CA-----");
    assert_eq!(metadata["labels"]["hodei.dev/saga-id"], "release-42");
    assert_eq!(body(7), json!({ "action_type": "InstanceStart" }));

    // The token travels in the MMDS body only: not in boot args, not on the VMM's command line.
    for (index, request) in requests.iter().enumerate().filter(|(_, r)| r.path != "/mmds") {
        let text = request.body.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(!text.contains(TOKEN), "request {index} carries the token: {text}");
    }
    assert!(!cmdline(&info.handle).contains(TOKEN));

    assert_eq!(provider.state("w-boot").await.expect("state"), WorkerState::Running);
    let output = provider.output("w-boot").await.expect("output");
    assert!(output.contains("fake firecracker: API on"), "the VMM's output: {output}");
    let listed = provider.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].labels[WORKER_ID_LABEL], "w-boot");
    assert_eq!(listed[0].labels["team"], "ci");
    provider.destroy("w-boot").await.expect("destroy");
}

#[tokio::test]
async fn destroy_asks_the_guest_to_shut_down_then_removes_the_socket() {
    let host = Host::new();
    // Never reached: were the guest not to go down on Ctrl-Alt-Del, the test would hang instead.
    let provider = FirecrackerProvider::new(host.config().shutdown_timeout(Duration::from_secs(3600)));
    let info = provider.provision(&spec("w-stop")).await.expect("provision");
    let socket = host.socket("w-stop");
    assert!(socket.exists());

    tokio::time::timeout(Duration::from_secs(60), provider.destroy("w-stop"))
        .await
        .expect("hung: the guest did not shut down on Ctrl-Alt-Del")
        .expect("destroy");
    let last = host.requests().pop().expect("requests");
    assert_eq!((last.method.as_str(), last.path.as_str(), last.status), ("PUT", "/actions", 204));
    assert_eq!(last.body, Some(json!({ "action_type": "SendCtrlAltDel" })));
    assert!(!socket.exists(), "the API socket is removed");
    assert!(!host.path("state/w-stop").exists(), "the state directory is removed");
    assert!(!is_vmm_of(&info.handle, &socket), "the VMM is gone");
    assert_eq!(provider.state("w-stop").await.expect("state"), WorkerState::Gone);
    assert!(matches!(provider.output("w-stop").await, Err(ProviderError::NotFound { .. })));
    provider.destroy("w-stop").await.expect("destroying a gone worker succeeds");
    assert!(provider.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn destroy_kills_a_guest_that_ignores_ctrl_alt_del() {
    let host = Host::new();
    let config =
        host.config_with(&["--fake-ignore-ctrl-alt-del"]).shutdown_timeout(Duration::from_millis(300));
    let provider = FirecrackerProvider::new(config);
    let info = provider.provision(&spec("w-stubborn")).await.expect("provision");

    provider.destroy("w-stubborn").await.expect("destroy");
    let last = host.requests().pop().expect("requests");
    assert_eq!(last.body, Some(json!({ "action_type": "SendCtrlAltDel" })));
    assert_eq!(last.status, 204, "the VMM accepted the shutdown but its guest ignored it");
    assert!(!is_vmm_of(&info.handle, &host.socket("w-stubborn")), "the VMM was killed");
    assert!(!host.socket("w-stubborn").exists());
    assert_eq!(provider.state("w-stubborn").await.expect("state"), WorkerState::Gone);
}

#[tokio::test]
async fn a_missing_firecracker_binary_is_named() {
    let host = Host::new();
    for binary in ["/nonexistent/bin/firecracker", "hodei-no-such-firecracker"] {
        let provider = FirecrackerProvider::new(host.config().firecracker_binary(binary));
        let error = provider.provision(&spec("w-nobin")).await.expect_err("no binary");
        assert!(matches!(error, ProviderError::InvalidSpec { .. }), "{error:?}");
        assert!(!error.is_retryable());
        assert!(reason(&error).contains(binary) && reason(&error).contains("missing"), "{error}");
    }
    assert!(!host.path("state/w-nobin").exists());
    assert!(host.requests().is_empty(), "no VMM was started");
}

#[tokio::test]
async fn an_unopenable_kvm_device_is_named() {
    let host = Host::new();
    let kvm = host.path("no-kvm-here");
    let provider = FirecrackerProvider::new(host.config().kvm_device(&kvm));
    let error = provider.provision(&spec("w-nokvm")).await.expect_err("no KVM");
    assert!(matches!(error, ProviderError::InvalidSpec { .. }), "{error:?}");
    assert!(reason(&error).contains(&kvm.display().to_string()), "{error}");
    assert!(reason(&error).contains("no KVM"), "{error}");
    assert!(host.requests().is_empty(), "no VMM was started");
}

#[tokio::test]
async fn a_missing_kernel_or_rootfs_is_named() {
    let host = Host::new();
    let kernel = host.path("no-vmlinux");
    let provider = FirecrackerProvider::new(host.config().kernel_image(&kernel));
    let error = provider.provision(&spec("w-nokernel")).await.expect_err("no kernel");
    assert!(matches!(error, ProviderError::InvalidSpec { .. }), "{error:?}");
    assert!(
        reason(&error).contains(&kernel.display().to_string()) && reason(&error).contains("kernel"),
        "{error}"
    );

    let provider = FirecrackerProvider::new(host.config());
    let mut missing_rootfs = spec("w-norootfs");
    let rootfs = host.path("no-rootfs.ext4").display().to_string();
    missing_rootfs.image = Some(rootfs.clone());
    match provider.provision(&missing_rootfs).await {
        Err(ProviderError::ImageMissing { image, hint, .. }) => {
            assert_eq!(image, rootfs);
            assert!(hint.contains("rootfs"), "{hint}");
        }
        other => panic!("expected ImageMissing, got {other:?}"),
    }
    assert!(provider.list().await.expect("list").is_empty(), "nothing is left behind");
    assert!(host.requests().is_empty(), "no VMM was started");
}

#[tokio::test]
async fn the_vmms_fault_message_is_surfaced_and_the_vm_cleaned_up() {
    let host = Host::new();
    let provider = FirecrackerProvider::new(host.config().shutdown_timeout(Duration::from_secs(5)));
    let mut too_big = spec("w-toobig");
    too_big.resources = Resources::new(Some(64_000), None);
    let error = provider.provision(&too_big).await.expect_err("64 vCPUs are refused");
    assert!(matches!(error, ProviderError::InvalidSpec { .. }), "{error:?}");
    let text = reason(&error);
    assert!(text.contains("PUT /machine-config") && text.contains("64 is above the maximum of 32"), "{text}");

    let requests = host.requests();
    let machine = requests.iter().find(|r| r.path == "/machine-config").expect("the machine config request");
    assert_eq!(machine.status, 400);
    assert!(!requests.iter().any(|r| r.path == "/boot-source"), "the sequence stopped at the fault");
    // Ctrl-Alt-Del is refused before boot, so the VMM was killed instead.
    let last = requests.last().expect("requests");
    assert_eq!((last.path.as_str(), last.status), ("/actions", 400));
    assert_eq!(provider.state("w-toobig").await.expect("state"), WorkerState::Gone);
    assert!(!host.socket("w-toobig").exists());
}

#[tokio::test]
async fn orphans_left_by_a_previous_run_are_listed_and_reaped() {
    let host = Host::new();
    let previous_run = FirecrackerProvider::new(host.config());
    let orphan = previous_run.provision(&spec("w-orphan")).await.expect("provision");
    // A worker whose pid file now names a process that is not its VMM (a recycled pid).
    previous_run.provision(&spec("w-stale")).await.expect("provision");
    let stale_dir = host.path("state/w-stale");
    let record = std::fs::read(stale_dir.join("worker.json")).expect("the worker record");
    previous_run.destroy("w-stale").await.expect("destroy");
    let mut unrelated = std::process::Command::new("sleep").arg("600").spawn().expect("sleep");
    std::fs::create_dir(&stale_dir).expect("the stale dir");
    std::fs::write(stale_dir.join("worker.json"), record).expect("the record");
    std::fs::write(stale_dir.join("firecracker.pid"), unrelated.id().to_string()).expect("the pid file");
    drop(previous_run);

    let provider = FirecrackerProvider::new(host.config());
    let listed = provider.list().await.expect("list");
    let summary: Vec<(&str, &WorkerState)> =
        listed.iter().map(|w| (w.worker_id.as_str(), &w.state)).collect();
    assert_eq!(summary.len(), 2, "{listed:?}");
    assert_eq!(summary[0], ("w-orphan", &WorkerState::Running));
    assert_eq!(summary[1].0, "w-stale");
    assert!(matches!(summary[1].1, WorkerState::Exited { .. }), "{listed:?}");
    assert_eq!(listed[0].handle, orphan.handle);
    assert_eq!(listed[0].labels[MANAGED_BY_LABEL], "hodei");

    let reaped = provider.reap_orphans().await.expect("reap");
    assert_eq!(reaped, ["w-orphan", "w-stale"]);
    assert!(provider.list().await.expect("list").is_empty());
    assert!(!is_vmm_of(&orphan.handle, &host.socket("w-orphan")), "the orphan VMM is gone");
    let last = host.requests().pop().expect("requests");
    assert_eq!(last.body, Some(json!({ "action_type": "SendCtrlAltDel" })));
    assert!(unrelated.try_wait().expect("sleep").is_none(), "a process that is not a VMM was not signalled");
    unrelated.kill().expect("kill sleep");
    unrelated.wait().expect("reap sleep");
}

/// An `ip` stand-in that records its arguments and fails when told to.
fn fake_ip(host: &Host, fail_with: Option<&str>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = host.path("ip");
    let log = host.path("ip.log");
    let tail = match fail_with {
        Some(message) => format!("echo '{message}' >&2; exit 2"),
        None => "exit 0".to_owned(),
    };
    std::fs::write(&script, format!("#!/bin/sh\necho \"$*\" >> '{}'\n{tail}\n", log.display()))
        .expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

fn ip_calls(host: &Host) -> Vec<String> {
    std::fs::read_to_string(host.path("ip.log"))
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_tap_the_provider_creates_is_attached_to_the_bridge_and_deleted_on_destroy() {
    let host = Host::new();
    let tap = TapDevice::Create {
        ip_binary: fake_ip(&host, None),
        name_prefix: "hfc-".to_owned(),
        bridge: Some("br-hodei".to_owned()),
    };
    let provider = FirecrackerProvider::new(host.config().tap(tap));
    provider.provision(&spec("w-tap")).await.expect("provision");
    let iface = host.requests().into_iter().find(|r| r.path == "/network-interfaces/eth0").expect("iface");
    let name = iface.body.expect("body")["host_dev_name"].as_str().expect("a TAP name").to_owned();
    assert!(name.starts_with("hfc-") && name.len() <= 15, "{name}");
    let calls = ip_calls(&host);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].starts_with(&format!("tuntap add dev {name} mode tap user ")), "{calls:?}");
    assert_eq!(calls[1], format!("link set dev {name} master br-hodei up"));

    provider.destroy("w-tap").await.expect("destroy");
    assert_eq!(ip_calls(&host).last(), Some(&format!("link del dev {name}")));
}

#[tokio::test]
async fn a_tap_that_cannot_be_created_says_so_and_starts_no_vm() {
    let host = Host::new();
    let ip_binary = fake_ip(&host, Some("ioctl(TUNSETIFF): Operation not permitted"));
    let tap = TapDevice::Create { ip_binary, name_prefix: "hfc-".to_owned(), bridge: None };
    let provider = FirecrackerProvider::new(host.config().tap(tap));
    let error = provider.provision(&spec("w-notap")).await.expect_err("no CAP_NET_ADMIN");
    assert!(matches!(error, ProviderError::Infrastructure { .. }), "{error:?}");
    let text = reason(&error);
    assert!(text.contains("Operation not permitted") && text.contains("CAP_NET_ADMIN"), "{text}");
    assert!(host.requests().is_empty(), "no VMM was started");
    assert!(provider.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn a_created_tap_is_deleted_when_the_vmm_cannot_start() {
    use std::os::unix::fs::PermissionsExt;
    let host = Host::new();
    // Executable, but exec fails: its interpreter does not exist.
    let broken = host.path("firecracker");
    std::fs::write(&broken, "#!/nonexistent/interpreter\n").expect("script");
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let tap =
        TapDevice::Create { ip_binary: fake_ip(&host, None), name_prefix: "hfc-".to_owned(), bridge: None };
    let provider = FirecrackerProvider::new(host.config().firecracker_binary(&broken).tap(tap));
    let error = provider.provision(&spec("w-noexec")).await.expect_err("exec fails");
    assert!(matches!(error, ProviderError::Infrastructure { .. }), "{error:?}");
    assert!(reason(&error).contains("cannot start"), "{error}");
    let calls = ip_calls(&host);
    assert!(calls[0].starts_with("tuntap add dev hfc-"), "{calls:?}");
    assert!(calls.last().is_some_and(|c| c.starts_with("link del dev hfc-")), "{calls:?}");
    assert!(provider.list().await.expect("list").is_empty());
}

#[test]
fn the_spec_checker_refuses_what_firecracker_refuses() {
    let spec = ApiSpec::load();
    let check = |method: &str, path: &str, body: serde_json::Value| {
        let bytes = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        spec.check(method, path, &bytes)
    };
    let ok = check("PUT", "/drives/rootfs", json!({"drive_id": "rootfs", "is_root_device": true}));
    assert_eq!(ok.expect("a valid drive").template, "/drives/{drive_id}");
    let cases = [
        ("PUT", "/no-such-path", json!({}), "Invalid request method and/or path"),
        ("DELETE", "/machine-config", json!(null), "Invalid request method and/or path"),
        ("PUT", "/machine-config", json!({"vcpu_count": 1}), "missing field `mem_size_mib`"),
        ("PUT", "/machine-config", json!({"vcpu_count": 1, "mem_size_mib": "512"}), "expected an integer"),
        ("PUT", "/machine-config", json!({"vcpu_count": 0, "mem_size_mib": 512}), "below the minimum of 1"),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 5, "gpus": 1}),
            "unknown field `gpus`",
        ),
        ("PUT", "/actions", json!({"action_type": "Reboot"}), "is not one of"),
        ("PUT", "/actions", json!(null), "The body of the request is missing"),
        ("PUT", "/boot-source", json!({"kernel_image_path": 7}), "expected a string"),
        (
            "PUT",
            "/drives/a",
            json!({"drive_id": "b", "is_root_device": true}),
            "does not match the id from the body",
        ),
        (
            "PUT",
            "/drives/",
            json!({"drive_id": "", "is_root_device": true}),
            "Invalid request method and/or path",
        ),
        ("PUT", "/mmds/config", json!({"network_interfaces": [1]}), "expected a string"),
    ];
    for (method, path, body, expected) in cases {
        let fault =
            check(method, path, body.clone()).expect_err(&format!("{method} {path} {body} is refused"));
        assert!(fault.contains(expected), "{method} {path} {body}: {fault}");
    }
    // MMDS contents are free-form JSON.
    check("PUT", "/mmds", json!({"anything": {"nested": [1, 2]}})).expect("free-form MMDS");
}

#[tokio::test]
async fn the_client_surfaces_the_vmms_fault_message_and_boot_rules() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let socket = dir.path().join("api.socket");
    let fake = FakeFirecracker::serve(&socket, FakeOptions::default()).expect("the fake");
    let client = FirecrackerClient::connect(&socket).await.expect("connect");

    match client.action(Action::InstanceStart).await {
        Err(ApiError::Rejected { status, fault_message, .. }) => {
            assert_eq!(status.as_u16(), 400);
            assert_eq!(fault_message, "Cannot start microvm without kernel configuration.");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let mmds =
        client.put_mmds_config(&MmdsConfig::v2(vec!["eth0".to_owned()])).await.expect_err("no eth0 yet");
    assert!(mmds.to_string().contains("does not correspond to any existing network interface"), "{mmds}");

    client.put_machine_config(&MachineConfig::new(1, 128)).await.expect("machine config");
    client.put_boot_source(&BootSource::new("/vmlinux", "console=ttyS0")).await.expect("boot source");
    client.put_drive(&Drive::root("rootfs", "/rootfs.ext4", true)).await.expect("drive");
    client.put_network_interface(&NetworkInterface::new("eth0", TAP)).await.expect("iface");
    client.put_mmds_config(&MmdsConfig::v2(vec!["eth0".to_owned()])).await.expect("mmds config");
    client.action(Action::InstanceStart).await.expect("start");
    assert_eq!(client.describe_instance().await.expect("describe").state, "Running");
    let late = client.put_machine_config(&MachineConfig::new(2, 128)).await.expect_err("pre-boot only");
    assert!(late.to_string().contains("not supported after starting the microVM"), "{late}");
    assert!(fake.requests().iter().all(|r| r.method == "GET" || r.body.is_some()));

    drop(fake);
    let gone = FirecrackerClient::connect(dir.path().join("nothing.socket")).await.expect_err("no socket");
    assert!(matches!(gone, ApiError::Connect { .. }), "{gone:?}");
}

/// Boots a real guest, on a host with `/dev/kvm`: `HODEI_FC_KERNEL` and `HODEI_FC_ROOTFS` (and
/// optionally `HODEI_FC_BINARY`, `HODEI_FC_TAP`). Ignored unless asked for, so that it is
/// counted as ignored, never as passed; asked for, a missing piece fails it.
#[tokio::test]
#[ignore = "needs /dev/kvm: HODEI_FC_KERNEL=vmlinux HODEI_FC_ROOTFS=rootfs.ext4 cargo test -p hodei-providers --features firecracker --test firecracker -- --ignored a_real_firecracker"]
async fn a_real_firecracker_boots_and_shuts_down() {
    let kernel = std::env::var("HODEI_FC_KERNEL").expect("HODEI_FC_KERNEL: a guest kernel");
    let rootfs = std::env::var("HODEI_FC_ROOTFS").expect("HODEI_FC_ROOTFS: a root filesystem with the agent");
    let state = tempfile::tempdir().expect("a temp dir");
    let config = FirecrackerConfig::new(kernel)
        .firecracker_binary(std::env::var("HODEI_FC_BINARY").unwrap_or_else(|_| "firecracker".to_owned()))
        .rootfs(rootfs)
        .copy_rootfs(true)
        .tap(TapDevice::Existing {
            default_name: Some(std::env::var("HODEI_FC_TAP").unwrap_or_else(|_| "tap0".into())),
        })
        .state_dir(state.path())
        .shutdown_timeout(Duration::from_secs(10));
    let provider = FirecrackerProvider::new(config);
    let started = Instant::now();
    let info = provider.provision(&spec("w-real")).await.expect("a real microVM boots");
    println!("real firecracker: provisioned in {:?} (VMM pid {})", started.elapsed(), info.handle);
    assert_eq!(provider.state("w-real").await.expect("state"), WorkerState::Running);
    provider.destroy("w-real").await.expect("destroy");
    assert_eq!(provider.state("w-real").await.expect("state"), WorkerState::Gone);
}
