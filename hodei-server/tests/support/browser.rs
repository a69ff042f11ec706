//! Headless Chromium through its WebDriver, for the dashboard's tests and bench (shared by
//! `#[path]`): chromedriver on a free loopback port, and a browser session on it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

const DRIVER: &str = "chromedriver";

/// chromedriver on a free loopback port, killed with this value.
pub struct Driver {
    process: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

pub fn driver_path() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(DRIVER))
        .find(|path| path.is_file())
}

/// Starts chromedriver, or returns `None` (after saying so) when there is none and none is
/// required.
pub fn start_driver() -> Option<Driver> {
    let Some(path) = driver_path() else {
        if std::env::var_os("HODEI_REQUIRE_BROWSER").is_some() {
            panic!(
                "HODEI_REQUIRE_BROWSER is set but no {DRIVER} is on PATH (Debian: chromium chromium-driver)"
            );
        }
        println!(
            "skipped: no {DRIVER} on PATH; install chromium and chromium-driver to run the dashboard tests"
        );
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut process = Command::new(path)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    // It prints this line once it listens.
    let mut stdout = BufReader::new(process.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("started successfully") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "chromedriver exited before it listened");
    }
    Some(Driver { process, url: format!("http://127.0.0.1:{port}") })
}

pub async fn browser(driver: &Driver) -> Client {
    let capabilities = json!({
        "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]
        }
    });
    let Value::Object(capabilities) = capabilities else { unreachable!() };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a browser session")
}
