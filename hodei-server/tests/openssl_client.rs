//! The session listener against a client that is not ours: `openssl s_client`, where it is
//! installed. Without a client certificate, or with one from another CA, the handshake is
//! refused with a TLS alert; with the worker's own certificate it completes, which shows the
//! refusals are the certificate's doing and not a client that cannot connect at all.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hodei_agent::pki::AgentKey;
use hodei_server::hub::HubConfig;
use support::{Setup, WORKER};

fn openssl_available() -> bool {
    Command::new("openssl").arg("version").output().is_ok_and(|out| out.status.success())
}

fn env_value<'a>(setup: &'a Setup, name: &str) -> &'a str {
    setup.binary_env().iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str()).unwrap()
}

/// `openssl s_client` to the session listener with `extra` arguments; stdin is closed at once.
fn s_client(setup: &Setup, extra: &[&str]) -> Output {
    Command::new("openssl")
        .args(["s_client", "-connect", env_value(setup, "HODEI_SESSION_ADDR")])
        .args(["-CAfile", env_value(setup, "HODEI_CA_BUNDLE"), "-verify_return_error", "-tls1_3"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_is_refused_without_our_certificate_and_accepted_with_it() {
    if !openssl_available() {
        // CI sets the switch, so that there a missing openssl fails instead of skipping.
        assert!(
            std::env::var_os("HODEI_REQUIRE_OPENSSL").is_none(),
            "HODEI_REQUIRE_OPENSSL is set, but openssl is not installed"
        );
        eprintln!("skipped: openssl is not installed (HODEI_REQUIRE_OPENSSL=1 makes this a failure)");
        return;
    }
    let setup =
        Setup::hub(HubConfig::default().heartbeat(Duration::from_secs(5), Duration::from_secs(15))).await;
    let dir = tempfile::tempdir().unwrap();

    let setup = std::sync::Arc::new(setup);
    let run = |extra: Vec<String>| {
        let setup = setup.clone();
        tokio::task::spawn_blocking(move || {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            s_client(&setup, &extra)
        })
    };

    // `-ign_eof` keeps reading after stdin ends: in TLS 1.3 the server judges the client's
    // certificate after the client's side of the handshake is done, and its alert comes later.
    let none = text(&run(vec!["-ign_eof".into()]).await.unwrap());
    assert!(none.contains("certificate required"), "no client certificate: {none}");

    let (key, cert) = (dir.path().join("other.key"), dir.path().join("other.crt"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=intruder", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let foreign = text(
        &run(vec![
            "-ign_eof".into(),
            "-cert".into(),
            cert.display().to_string(),
            "-key".into(),
            key.display().to_string(),
        ])
        .await
        .unwrap(),
    );
    // rustls answers a chain it cannot verify with `certificate_unknown` (alert 46).
    assert!(
        foreign.contains("alert certificate unknown") || foreign.contains("unknown ca"),
        "another CA: {foreign}"
    );

    let agent_key = AgentKey::generate().unwrap();
    let token = setup.hub.pki().issue_token(WORKER).unwrap();
    let issued =
        setup.hub.pki().register(token.as_str(), WORKER, &agent_key.csr_pem(WORKER).unwrap()).unwrap();
    let key = write(dir.path(), "worker.key", &agent_key.private_key_pem());
    let cert = write(dir.path(), "worker.crt", &issued.cert_pem);
    let ours = text(&run(vec!["-cert".into(), cert, "-key".into(), key]).await.unwrap());
    assert!(ours.contains("Verification: OK") || ours.contains("Verify return code: 0 (ok)"), "{ours}");
    assert!(!ours.contains("alert"), "our own certificate is accepted: {ours}");
}
