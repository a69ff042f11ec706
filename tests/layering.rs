//! The crates depend one way, by side of the wire: the worker side (`hodei-agent`) links
//! neither the engine nor the control plane, the engine links no other Hodei crate, providers
//! know the agent but not the control plane. Read from `cargo metadata` (what each manifest
//! declares) and `cargo tree` (what the `hodei-agent` binary is built from), so a dependency
//! added in the wrong direction fails here, not in a review.

use std::collections::BTreeMap;
use std::process::Command;

/// What each workspace crate may depend on (normal dependencies, not dev or build ones).
const ALLOWED: &[(&str, &[&str])] = &[
    ("hodei-core", &[]),
    ("hodei-macros", &[]),
    ("hodei-agent", &[]),
    ("hodei-providers", &["hodei-agent"]),
    ("hodei-server", &["hodei-core", "hodei-agent", "hodei-providers"]),
    // A client of the operator API over HTTP: it must not build the engine or control plane.
    ("hodei-cli", &[]),
];

fn cargo(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "cargo {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("cargo prints UTF-8")
}

/// Each workspace package's Hodei dependencies of the normal kind, as its manifest declares them.
fn hodei_dependencies() -> BTreeMap<String, Vec<String>> {
    let metadata: serde_json::Value =
        serde_json::from_str(&cargo(&["metadata", "--no-deps", "--format-version", "1", "--offline"]))
            .expect("cargo metadata prints JSON");
    let mut map = BTreeMap::new();
    for package in metadata["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("a name").to_owned();
        let deps = package["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .filter(|d| d.starts_with("hodei"))
            .map(str::to_owned)
            .collect();
        map.insert(name, deps);
    }
    map
}

#[test]
fn each_crate_depends_only_on_the_crates_below_it() {
    let declared = hodei_dependencies();
    for (krate, allowed) in ALLOWED {
        let deps = declared.get(*krate).unwrap_or_else(|| panic!("{krate} is not in the workspace"));
        let wrong: Vec<_> = deps.iter().filter(|d| !allowed.contains(&d.as_str())).collect();
        assert!(wrong.is_empty(), "{krate} depends on {wrong:?}; it may depend only on {allowed:?}");
    }
    let members: Vec<_> = declared.keys().filter(|k| k.as_str() != "hodei").collect();
    assert_eq!(members.len(), ALLOWED.len(), "a workspace crate has no rule here: {members:?}");
}

#[test]
fn the_agent_binary_links_neither_the_engine_nor_the_control_plane() {
    let tree = built_from("hodei-agent");
    let hodei: Vec<_> =
        tree.lines().filter(|l| l.starts_with("hodei")).map(|l| l.split(' ').next().unwrap_or(l)).collect();
    assert!(!hodei.is_empty(), "cargo tree listed no hodei-agent:\n{tree}");
    assert!(hodei.iter().all(|p| *p == "hodei-agent"), "hodei-agent is built from {hodei:?}");
}

#[test]
fn the_cli_uses_ring_and_no_other_crypto_provider() {
    // Two rustls providers in one binary make rustls refuse to pick one at run time.
    let tree = built_from("hodei-cli");
    let names: Vec<_> = tree.lines().map(|l| l.split(' ').next().unwrap_or(l)).collect();
    assert!(names.contains(&"ring"), "hodei-cli does not build ring:\n{tree}");
    for banned in ["aws-lc-rs", "aws-lc-sys", "openssl", "openssl-sys", "native-tls"] {
        assert!(!names.contains(&banned), "hodei-cli is built with {banned}");
    }
}

/// Every package a binary of `package` is built from (normal and build edges, all features),
/// one per line as `name vX.Y.Z`.
fn built_from(package: &str) -> String {
    cargo(&[
        "tree",
        "--offline",
        "-p",
        package,
        "--edges",
        "normal,build",
        "--all-features",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ])
}
