//! The `hodei-agent` program for tests that run it as a process. Cargo gives a package's tests
//! only its own binaries (`CARGO_BIN_EXE_*`), and the agent's is in `hodei-agent`, so the tests
//! of the control plane and of the providers find it in their target directory, built once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The `hodei-agent` binary of this target directory (tests run from `<target>/debug/deps`),
/// built once if it is not there yet.
pub fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir =
            exe.parent().and_then(Path::parent).expect("tests run from <target>/<profile>/deps");
        let binary = profile_dir.join("hodei-agent");
        if !binary.exists() {
            let target_dir = profile_dir.parent().expect("a target directory");
            let status = std::process::Command::new(option_env!("CARGO").unwrap_or("cargo"))
                .args(["build", "-p", "hodei-agent", "--bin", "hodei-agent"])
                .env("CARGO_TARGET_DIR", target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .unwrap();
            assert!(status.success() && binary.exists(), "building hodei-agent failed");
        }
        binary
    })
}
