//! The PostgreSQL server `.ci/postgres` started, restarted by the chaos tests (shared with
//! `hodei-server/tests/postgres_jobs_chaos.rs` by `#[path]`).

#![allow(dead_code)]

/// The PostgreSQL server `.ci/postgres` started, which the test restarts.
pub struct Server {
    dir: String,
    bin: String,
}

impl Server {
    pub fn from_env() -> Option<Server> {
        match (std::env::var("HODEI_TEST_POSTGRES_DIR"), std::env::var("HODEI_TEST_POSTGRES_BIN")) {
            (Ok(dir), Ok(bin)) => Some(Server { dir, bin }),
            _ if std::env::var("HODEI_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
                panic!(
                    "HODEI_REQUIRE_POSTGRES=1 but HODEI_TEST_POSTGRES_DIR/_BIN are not set (see .ci/postgres)"
                )
            }
            _ => {
                println!("skipped: HODEI_TEST_POSTGRES_DIR and HODEI_TEST_POSTGRES_BIN are not set");
                None
            }
        }
    }

    pub fn restart(&self) {
        let pg_ctl = format!("{}/pg_ctl", self.bin);
        let data = format!("{}/data", self.dir);
        let log = format!("{}/server.log", self.dir);
        let args = ["-D", data.as_str(), "-l", log.as_str(), "-w", "-m", "immediate", "restart"];
        // The server refuses to run as root: as its owner, as `.ci/postgres` starts it.
        let status = if is_root() {
            std::process::Command::new("runuser").args(["-u", "postgres", "--", &pg_ctl]).args(args).status()
        } else {
            std::process::Command::new(&pg_ctl).args(args).status()
        };
        assert!(status.is_ok_and(|s| s.success()), "restarting PostgreSQL");
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}
