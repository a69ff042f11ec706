//! What the Firecracker provider adds on top of the API calls it has to make.
//!
//! - client sequence: [`FirecrackerClient`] making the provider's boot sequence (`GET /`, then
//!   machine config, boot source, root drive, network interface, MMDS config, MMDS and
//!   `InstanceStart`) against an in-process fake VMM on a Unix socket;
//! - the limit: the same 8 requests, bytes written by hand, over one raw `UnixStream` to the
//!   same fake;
//! - provision: `FirecrackerProvider::provision` end to end (host checks, state directory,
//!   spawning the VMM, waiting for its socket, the sequence), with this binary re-executed as
//!   the fake `firecracker`, against spawning that same fake and making the raw requests.
//!
//! Runs alternate, so that both sides see the same load. Real boot times need a KVM host:
//! `HODEI_FC_KERNEL=... HODEI_FC_ROOTFS=... cargo test -p hodei-providers --features
//! firecracker --test firecracker -- --ignored --nocapture a_real_firecracker` prints them.
//!
//! `cargo bench --bench providers --features firecracker`. `HODEI_BENCH_SCALE` multiplies the
//! runs (2,000 sequences after 100 unmeasured, 40 provisions; at least 1 each).

#[cfg(feature = "firecracker")]
#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

#[cfg(feature = "firecracker")]
fn main() {
    bench::main();
}

#[cfg(not(feature = "firecracker"))]
fn main() {
    println!("providers bench skipped: run `cargo bench --bench providers --features firecracker`");
}

#[cfg(feature = "firecracker")]
mod bench {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use hodei_providers::firecracker::{
        Action, BootSource, Drive, FirecrackerClient, FirecrackerConfig, FirecrackerProvider, MachineConfig,
        MmdsConfig, NetworkInterface, TapDevice,
    };
    use hodei_providers::{AgentEnv, Provider, WorkerSpec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    const SEQUENCES: usize = 2000;
    const PROVISIONS: usize = 40;
    const INSTANCE_INFO: &str = r#"{"app_name":"Firecracker","id":"anonymous-instance","state":"Not started","vmm_version":"1.17.0-dev"}"#;

    pub fn main() {
        let args: Vec<String> = std::env::args().collect();
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        if let Some(socket) = args.iter().position(|a| a == "--api-sock").and_then(|i| args.get(i + 1)) {
            runtime.block_on(serve_until_shutdown(Path::new(socket)));
            std::process::exit(0);
        }
        runtime.block_on(async {
            sequences().await;
            provisions().await;
        });
    }

    /// One HTTP/1.1 message: its head and its body, by Content-Length.
    async fn read_message(stream: &mut UnixStream, buffer: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
        loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buffer.len() >= end + 4 + length {
                    let body = buffer[end + 4..end + 4 + length].to_vec();
                    buffer.drain(..end + 4 + length);
                    return Some((head, body));
                }
            }
            let mut chunk = [0_u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Answers like the VMM: 200 with its InstanceInfo for `GET /`, 204 for every PUT. True if
    /// the connection carried a Ctrl-Alt-Del.
    async fn serve_connection(mut stream: UnixStream) -> bool {
        let mut buffer = Vec::new();
        let mut asked_to_stop = false;
        while let Some((head, body)) = read_message(&mut stream, &mut buffer).await {
            asked_to_stop |= String::from_utf8_lossy(&body).contains("SendCtrlAltDel");
            let reply = if head.starts_with("GET / ") {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{INSTANCE_INFO}",
                    INSTANCE_INFO.len()
                )
            } else {
                "HTTP/1.1 204 No Content\r\n\r\n".to_owned()
            };
            if stream.write_all(reply.as_bytes()).await.is_err() {
                break;
            }
        }
        asked_to_stop
    }

    fn serve(socket: &Path) -> tokio::sync::mpsc::Receiver<()> {
        let listener = UnixListener::bind(socket).expect("bind the fake API socket");
        let (stopped, stop) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    if serve_connection(stream).await {
                        let _ = stopped.send(()).await;
                    }
                });
            }
        });
        stop
    }

    /// The fake `firecracker`: serves until a Ctrl-Alt-Del's connection closes.
    async fn serve_until_shutdown(socket: &Path) {
        let mut stop = serve(socket);
        stop.recv().await;
    }

    fn spec(worker_id: &str) -> WorkerSpec {
        WorkerSpec::new(worker_id, AgentEnv::new("10.0.0.1:7001", "10.0.0.1:7002", "token", "PEM"))
    }

    async fn client_sequence(socket: &Path) {
        let client = FirecrackerClient::connect(socket).await.expect("connect");
        client.describe_instance().await.expect("describe");
        client.put_machine_config(&MachineConfig::new(2, 512)).await.expect("machine");
        client
            .put_boot_source(&BootSource::new("/vmlinux", "console=ttyS0 reboot=k panic=1 pci=off"))
            .await
            .expect("boot");
        client.put_drive(&Drive::root("rootfs", "/rootfs.ext4", true)).await.expect("drive");
        client.put_network_interface(&NetworkInterface::new("eth0", "tap0")).await.expect("iface");
        client.put_mmds_config(&MmdsConfig::v2(vec!["eth0".to_owned()])).await.expect("mmds config");
        client.put("/mmds", &Metadata::sample()).await.expect("mmds");
        client.action(Action::InstanceStart).await.expect("start");
    }

    /// An MMDS store shaped like the provider's.
    #[derive(serde::Serialize)]
    struct Metadata {
        hodei: Registration,
    }

    #[derive(serde::Serialize)]
    struct Registration {
        worker_id: &'static str,
        env: std::collections::BTreeMap<&'static str, &'static str>,
        ca_bundle_pem: &'static str,
    }

    impl Metadata {
        fn sample() -> Self {
            let env = [
                ("HODEI_REGISTRATION_ADDR", "10.0.0.1:7001"),
                ("HODEI_SESSION_ADDR", "10.0.0.1:7002"),
                ("HODEI_TOKEN", "token"),
                ("HODEI_WORKER_ID", "bench"),
            ];
            Self {
                hodei: Registration {
                    worker_id: "bench",
                    env: env.into_iter().collect(),
                    ca_bundle_pem: "PEM",
                },
            }
        }
    }

    const METADATA_TEXT: &str = r#"{"hodei":{"worker_id":"bench","env":{"HODEI_REGISTRATION_ADDR":"10.0.0.1:7001","HODEI_SESSION_ADDR":"10.0.0.1:7002","HODEI_TOKEN":"token","HODEI_WORKER_ID":"bench"},"ca_bundle_pem":"PEM"}}"#;

    /// The same requests as `client_sequence`, by hand.
    fn raw_requests() -> Vec<Vec<u8>> {
        let put = |path: &str, body: &str| {
            format!(
                "PUT {path} HTTP/1.1\r\nhost: localhost\r\naccept: application/json\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        vec![
            b"GET / HTTP/1.1\r\nhost: localhost\r\naccept: application/json\r\n\r\n".to_vec(),
            put("/machine-config", r#"{"vcpu_count":2,"mem_size_mib":512}"#),
            put(
                "/boot-source",
                r#"{"kernel_image_path":"/vmlinux","boot_args":"console=ttyS0 reboot=k panic=1 pci=off"}"#,
            ),
            put(
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","path_on_host":"/rootfs.ext4","is_root_device":true,"is_read_only":true}"#,
            ),
            put("/network-interfaces/eth0", r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#),
            put("/mmds/config", r#"{"version":"V2","network_interfaces":["eth0"]}"#),
            put("/mmds", METADATA_TEXT),
            put("/actions", r#"{"action_type":"InstanceStart"}"#),
        ]
    }

    async fn raw_sequence(socket: &Path, requests: &[Vec<u8>]) {
        let mut stream = UnixStream::connect(socket).await.expect("connect");
        let mut buffer = Vec::new();
        for request in requests {
            stream.write_all(request).await.expect("write");
            let (head, _) = read_message(&mut stream, &mut buffer).await.expect("a reply");
            assert!(head.starts_with("HTTP/1.1 2"), "{head}");
        }
    }

    fn median(mut samples: Vec<Duration>) -> Duration {
        samples.sort();
        samples[samples.len() / 2]
    }

    fn us(d: Duration) -> f64 {
        d.as_secs_f64() * 1e6
    }

    async fn sequences() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.socket");
        let _stop = serve(&socket);
        let requests = raw_requests();
        for _ in 0..super::common::scaled(100) {
            client_sequence(&socket).await;
            raw_sequence(&socket, &requests).await;
        }
        let runs = super::common::scaled(SEQUENCES);
        let (mut client, mut raw) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
        for _ in 0..runs {
            let started = Instant::now();
            client_sequence(&socket).await;
            client.push(started.elapsed());
            let started = Instant::now();
            raw_sequence(&socket, &requests).await;
            raw.push(started.elapsed());
        }
        let (client, raw) = (median(client), median(raw));
        println!("firecracker boot sequence, 8 requests on one connection, in-process fake, {runs} runs:");
        println!("  FirecrackerClient  median {:>8.1} us", us(client));
        println!("  raw UnixStream     median {:>8.1} us", us(raw));
        println!("  ratio              {:>8.2}x", client.as_secs_f64() / raw.as_secs_f64());
    }

    async fn provisions() {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in ["vmlinux", "rootfs.ext4", "kvm"] {
            std::fs::write(dir.path().join(file), b"fake").expect("host file");
        }
        let exe = std::env::current_exe().expect("this binary");
        let config = FirecrackerConfig::new(dir.path().join("vmlinux"))
            .firecracker_binary(&exe)
            .kvm_device(dir.path().join("kvm"))
            .rootfs(dir.path().join("rootfs.ext4"))
            .tap(TapDevice::Existing { default_name: Some("tap0".to_owned()) })
            .state_dir(dir.path().join("state"));
        let provider = FirecrackerProvider::new(config);
        let requests = raw_requests();
        let (mut provision, mut bare) = (Vec::new(), Vec::new());
        let runs = super::common::scaled(PROVISIONS);
        for run in 0..runs {
            let worker = format!("bench-{run}");
            let started = Instant::now();
            provider.provision(&spec(&worker)).await.expect("provision");
            provision.push(started.elapsed());
            provider.destroy(&worker).await.expect("destroy");

            let socket = dir.path().join(format!("bare-{run}.socket"));
            let started = Instant::now();
            let mut child = spawn_fake(&exe, &socket);
            wait_for_socket(&socket, &mut child).await;
            raw_sequence(&socket, &requests).await;
            bare.push(started.elapsed());
            shut_down(&socket, &mut child).await;
        }
        let (provision, bare) = (median(provision), median(bare));
        println!("provision against a fake VMM process (this binary re-executed), {runs} runs:");
        println!("  FirecrackerProvider::provision  median {:>8.2} ms", us(provision) / 1e3);
        println!("  spawn + socket wait + raw reqs  median {:>8.2} ms", us(bare) / 1e3);
        println!("  ratio                           {:>8.2}x", provision.as_secs_f64() / bare.as_secs_f64());
    }

    fn spawn_fake(exe: &Path, socket: &Path) -> tokio::process::Child {
        tokio::process::Command::new(exe)
            .arg("--api-sock")
            .arg(socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn the fake")
    }

    /// The same wait the provider does: connect retries with a short backoff, ended by the
    /// child's exit.
    async fn wait_for_socket(socket: &Path, child: &mut tokio::process::Child) {
        let mut backoff = Duration::from_millis(1);
        while UnixStream::connect(socket).await.is_err() {
            tokio::select! {
                status = child.wait() => panic!("the fake exited: {status:?}"),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    async fn shut_down(socket: &Path, child: &mut tokio::process::Child) {
        let body = r#"{"action_type":"SendCtrlAltDel"}"#;
        let request = format!(
            "PUT /actions HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        {
            let mut stream = UnixStream::connect(socket).await.expect("connect");
            stream.write_all(request.as_bytes()).await.expect("write");
            read_message(&mut stream, &mut Vec::new()).await.expect("a reply");
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        let _ = std::fs::remove_file(socket);
    }
}
