//! The runner's cgroup v2 path, run for real.
//!
//! Machines whose cgroup v2 hierarchy hands no cpu or memory controller to the tests (CI's, and
//! most containers) measure every job through `/proc`, and the runner's cgroup tests are
//! ignored there. This test boots a stock Debian kernel under qemu, in software emulation (no
//! KVM needed), from an initramfs it builds: a static busybox for the tools, this machine's
//! `/bin/sh` with its libraries (the tests' jobs run it, and some check what that shell does),
//! `tests/qemu/init`, and the runner's tests built static. The init mounts cgroup v2, enables
//! `cpu memory pids` for children of the root, and runs every runner test, the ignored cgroup
//! ones included, with `HODEI_CGROUP_VM=1`, which makes the tests that would accept
//! `/proc` demand the cgroup.
//! This test then reads the serial console and checks that each one passed.
//!
//! Opt-in, since it downloads a kernel package (kept in `target/tmp/qemu-cgroup/`) and takes
//! minutes; on a Debian host with `qemu-system-x86` and `busybox-static` installed:
//!
//! ```sh
//! HODEI_QEMU_CGROUP=1 cargo test -p hodei-agent --test cgroup_qemu -- --ignored --nocapture
//! ```

// The VM is Debian's amd64 kernel, and the tests run in it are built for this machine.
#![cfg(target_arch = "x86_64")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// The tests built static, for the machine the VM emulates.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// From `busybox-static`: the initramfs has no libc to link against.
const BUSYBOX: &str = "/bin/busybox";
/// The whole run under emulation: boot, every runner test, power-off. A hang guard only; the
/// run ends when the VM powers itself off.
const VM_TIMEOUT_SECS: &str = "1200";
/// What marks the init's own lines on the console.
const MARK: &str = "hodei-qemu: ";

#[test]
#[ignore = "boots a Debian kernel under qemu, minutes: HODEI_QEMU_CGROUP=1 cargo test -p hodei-agent --test cgroup_qemu -- --ignored --nocapture"]
fn every_runner_test_passes_on_a_cgroup_v2_with_its_controllers() {
    assert!(
        std::env::var_os("HODEI_QEMU_CGROUP").is_some_and(|v| v == "1"),
        "opt-in: set HODEI_QEMU_CGROUP=1 to download a Debian kernel and boot it under qemu"
    );
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-cgroup");
    std::fs::create_dir_all(&work).unwrap();

    let tests = static_runner_tests();
    let expected = test_names(&tests);
    let kernel = debian_kernel(&work);
    let initrd = work.join("initramfs.cpio");
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu/init");
    let mut files = vec![
        ("init".to_owned(), init),
        ("bin/busybox".to_owned(), PathBuf::from(BUSYBOX)),
        ("bin/runner-tests".to_owned(), tests),
        ("bin/sh".to_owned(), PathBuf::from("/bin/sh")),
    ];
    files.extend(shared_libraries(Path::new("/bin/sh")).into_iter().map(|lib| (relative(&lib), lib)));
    write_initramfs(&initrd, &files);

    let booted = Instant::now();
    let console = boot(&kernel, &initrd);
    let took = booted.elapsed();
    // Kept for the record: the tests' own output, and the kernel's OOM report.
    std::fs::write(work.join("console.log"), &console).unwrap();
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let fail = |what: &str| -> ! { panic!("{what}\n--- console ---\n{console}") };

    // Found anywhere in a line: the first one follows the firmware's terminal escapes.
    let marked: Vec<&str> = lines.iter().filter_map(|l| Some(l.split_once(MARK)?.1)).collect();
    if !marked.iter().any(|l| l.starts_with("runner tests exited with 0 ")) {
        fail("the runner tests did not all pass in the VM");
    }
    if !marked.iter().any(|l| l.starts_with("cgroup.subtree_control cpu memory pids")) {
        fail("the VM's root cgroup did not enable cpu, memory and pids for its children");
    }
    let summary =
        lines.iter().find(|l| l.starts_with("test result: ")).unwrap_or_else(|| fail("no test summary"));
    let want = format!("test result: ok. {} passed; 0 failed; 0 ignored;", expected.len());
    if !summary.starts_with(&want) {
        fail(&format!("expected {want:?}, got {summary:?}"));
    }
    for name in
        ["cgroup_metrics_of_a_job_holding_memory", "a_job_past_its_memory_limit_is_killed_in_its_cgroup"]
    {
        assert!(expected.iter().any(|t| t == name), "{name} is not a runner test any more");
    }
    let figures: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("cgroup metrics: ") || l.contains("memory-limited job: "))
        .collect();
    if figures.len() != 2 {
        fail("the cgroup tests' figures are missing");
    }

    println!(
        "qemu ran {:.1} s (boot, {} runner tests, power-off) under software emulation; console in {}",
        took.as_secs_f64(),
        expected.len(),
        work.join("console.log").display()
    );
    for line in marked.iter().chain(&figures).chain([summary]) {
        println!("  {line}");
    }
}

/// Builds the runner's tests with a static C runtime, so that they run with no libc in the
/// VM, and returns the executable cargo names.
fn static_runner_tests() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // Only the target's artifacts see RUSTFLAGS once `--target` is given: build scripts and proc
    // macros stay as they are, and the static artifacts go to a directory of their own.
    let output = Command::new(env!("CARGO"))
        .current_dir(workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["test", "--no-run", "--message-format=json", "-p", "hodei-agent", "--test", "runner"])
        .args(["--target", TARGET])
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "building the static runner tests failed: {:?}", output.status);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "runner")
        .find(|m| m["profile"]["test"] == true)
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the runner tests' executable")
}

/// Every test in the binary, ignored ones included, as libtest lists them.
fn test_names(tests: &Path) -> Vec<String> {
    let listed =
        checked(Command::new(tests).args(["--list", "--format", "terse"]), "listing the runner tests");
    let names: Vec<String> =
        listed.lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_owned).collect();
    assert!(!names.is_empty(), "no tests listed:\n{listed}");
    names
}

/// The kernel of Debian's `linux-image-amd64`, downloaded once into `work`. Its config has
/// cgroup v2, the memory and cpu controllers, devtmpfs and the serial console built in, so it
/// boots from an initramfs with no module.
fn debian_kernel(work: &Path) -> PathBuf {
    let kernel = work.join("vmlinuz");
    if kernel.is_file() {
        return kernel;
    }
    // The metapackage only depends on the current image package, whose name carries the ABI.
    let depends =
        checked(Command::new("apt-cache").args(["depends", "linux-image-amd64"]), "apt-cache depends");
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")))
        .unwrap_or_else(|| panic!("no kernel image package behind linux-image-amd64:\n{depends}"));
    let download = work.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).unwrap();
    checked(Command::new("apt-get").args(["download", package]).current_dir(&download), "apt-get download");
    let deb = only_file(&download, |name| name.ends_with(".deb"));
    let tree = download.join("tree");
    checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree), "dpkg-deb -x");
    let boot = tree.join("boot");
    let config = std::fs::read_to_string(only_file(&boot, |name| name.starts_with("config-"))).unwrap();
    for option in ["CONFIG_CGROUPS=y", "CONFIG_MEMCG=y", "CONFIG_CGROUP_SCHED=y", "CONFIG_DEVTMPFS=y"] {
        assert!(config.lines().any(|l| l == option), "{package} lacks {option}");
    }
    // Moved into place last: a kernel present means a finished download.
    std::fs::rename(only_file(&boot, |name| name.starts_with("vmlinuz-")), &kernel).unwrap();
    std::fs::remove_dir_all(&download).unwrap();
    kernel
}

fn only_file(dir: &Path, wanted: impl Fn(&str) -> bool) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&wanted))
        .collect();
    assert_eq!(found.len(), 1, "expected one such file in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

/// Runs `command` and returns its stdout, failing with its stderr.
fn checked(command: &mut Command, what: &str) -> String {
    let Output { status, stdout, stderr } = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(status.success(), "{what}: {status}\n{}", String::from_utf8_lossy(&stderr));
    String::from_utf8_lossy(&stdout).into_owned()
}

/// The shared libraries `program` loads, the dynamic loader included, as `ldd` resolves them.
fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let listed = checked(Command::new("ldd").arg(program), "ldd");
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`
    listed
        .lines()
        .filter_map(|l| l.split("=>").last()?.split_whitespace().next())
        .filter(|path| path.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

fn relative(path: &Path) -> String {
    path.strip_prefix("/").unwrap_or(path).to_string_lossy().into_owned()
}

/// Writes an uncompressed `newc` cpio archive, the format the kernel unpacks as its initramfs:
/// `/dev/console` for init's stdio, then `files` (executables all, symbolic links followed)
/// with their directories.
fn write_initramfs(path: &Path, files: &[(String, PathBuf)]) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut entries: Vec<(String, u32, u32, Vec<u8>)> = vec![
        ("dev".into(), 0o040_755, 0, Vec::new()),
        // Character device 5:1.
        ("dev/console".into(), 0o020_600, 0x0501, Vec::new()),
    ];
    for (name, source) in files {
        // Parents first: the kernel makes no directory on its own.
        for dir in Path::new(name).ancestors().skip(1).collect::<Vec<_>>().into_iter().rev() {
            let dir = dir.to_string_lossy().into_owned();
            if !dir.is_empty() && !entries.iter().any(|(n, ..)| *n == dir) {
                entries.push((dir, 0o040_755, 0, Vec::new()));
            }
        }
        let data = std::fs::read(source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        entries.push((name.clone(), 0o100_755, 0, data));
    }
    entries.push(("TRAILER!!!".into(), 0, 0, Vec::new()));
    for (ino, (name, mode, rdev, data)) in (1u32..).zip(&entries) {
        let fields = [ino, *mode, 0, 0, 1, 0, data.len().try_into().unwrap(), 0, 0, rdev >> 8, rdev & 0xff];
        let mut header: String =
            std::iter::once("070701".to_owned()).chain(fields.map(|f| format!("{f:08x}"))).collect();
        header.push_str(&format!("{:08x}{:08x}", name.len() + 1, 0));
        out.write_all(header.as_bytes()).unwrap();
        out.write_all(name.as_bytes()).unwrap();
        out.write_all(&[0]).unwrap();
        // The name and the data each end on a 4-byte boundary.
        out.write_all(&[0; 3][..(4 - (header.len() + name.len() + 1) % 4) % 4]).unwrap();
        out.write_all(data).unwrap();
        out.write_all(&[0; 3][..(4 - data.len() % 4) % 4]).unwrap();
    }
    out.flush().unwrap();
}

/// Boots the VM and returns everything it wrote to its serial console. No network device: the
/// tests need none.
fn boot(kernel: &Path, initrd: &Path) -> String {
    let output = Command::new("timeout")
        .args([
            "--kill-after=10",
            VM_TIMEOUT_SECS,
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "2",
        ])
        .args(["-nographic", "-nic", "none", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1: a dead init reboots, which -no-reboot turns into qemu's exit.
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64 (package qemu-system-x86) and timeout run");
    let console = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "qemu: {} (124: timed out after {VM_TIMEOUT_SECS} s)\n{}\n--- console ---\n{console}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    console
}
