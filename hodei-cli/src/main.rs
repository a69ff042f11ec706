//! `hodei`: the command line for Hodei's operator API.
//!
//! It talks to the HTTP/JSON API a Hodei process serves (`hodei_server::api::ApiServer`):
//! list and inspect runs, follow their journals and job logs live, start runs and wait for
//! them, send signals and approvals, cancel, fork, retry, pause and resume, export journals
//! and check them against the code of a build before it is deployed, and manage API tokens. It is a client only: it does not build the engine or the control plane.
//!
//! ```text
//! hodei runs list --status running
//! hodei runs start deploy --id deploy-42 --input '{"env":"prod"}' --wait
//! hodei runs approve deploy-42
//! hodei runs logs deploy-42 --step build -f
//! hodei -o json runs get deploy-42 | jq .status
//! hodei runs export --in-flight --dir journals/       # before a deploy ...
//! hodei --addr http://staging:7433 runs replay --file journals/deploy-42.journal
//! hodei check                                         # every run in flight, on this server's code
//! ```
//!
//! # Settings
//!
//! Each setting comes from the first of: a flag (`--addr`, `--token`, `--token-file`,
//! `--ca-cert`), the environment (`HODEI_ADDR`, `HODEI_TOKEN`, `HODEI_TOKEN_FILE`,
//! `HODEI_CA_CERT`), a profile of the config file (`$HODEI_CONFIG`, else
//! `$XDG_CONFIG_HOME/hodei/config.toml` or `~/.config/hodei/config.toml`; the profile is
//! `--profile`, `$HODEI_PROFILE` or `default`):
//!
//! ```toml
//! [profiles.default]
//! addr = "http://127.0.0.1:7433"
//! token_file = "/var/lib/myapp/api/admin-token"
//!
//! [profiles.prod]
//! addr = "https://hodei.internal:7433"
//! token = "hodei_..."
//! ca_cert = "prod-ca.pem"   # relative to the config file
//! ```
//!
//! The address defaults to `http://127.0.0.1:7433`, where the API listens unless told
//! otherwise.
//!
//! # Output
//!
//! People get aligned tables and a timeline, coloured only on a terminal and never with
//! `NO_COLOR` set. `-o json` prints the API's JSON as it came (streams as one JSON object a
//! line), for scripts.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success; for `runs start --wait`, the run completed |
//! | 1 | the run did not complete: failed, compensated, compensation_failed or parked; or a replay check (`check`, `runs replay`) found a run that would not go on |
//! | 2 | usage error: bad arguments, settings or input |
//! | 3 | not found: no such run, definition, job or token |
//! | 4 | not allowed: no valid token (401), or its role does not allow it (403) |
//! | 5 | any other API error, or no answer from the server |
//!
//! Errors are one line on stderr: `error: <message> (<code>)`, the code being the API's
//! (`not_found`, `forbidden`, `invalid_state`, ...) or the CLI's own (`usage`, `connection`).

mod cli;
mod client;
mod clock;
mod commands;
mod error;
mod model;
mod payload_shape;
mod render;
mod settings;
mod sse;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::error::CliError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&CliError::new("internal", format!("cannot start the async runtime: {e}"))),
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => fail(&error),
    }
}

fn fail(error: &CliError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(error.exit_code())
}

/// `--help`'s account of the exit codes; kept beside [`exit`] so they cannot drift apart.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success; for `runs start --wait`, the run completed
  1  the run did not complete (failed, compensated, compensation_failed, parked),
     or a replay check found a run that would not go on (`check`, `runs replay`)
  2  usage error: bad arguments, settings or input
  3  not found: no such run, definition, job or token
  4  not allowed: no valid token (401) or its role does not allow it (403)
  5  any other API error, or no answer from the server";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit;

    #[test]
    fn the_help_lists_every_exit_code_with_its_value() {
        for (code, meaning) in [
            (exit::OK, "success"),
            (exit::RUN_NOT_COMPLETED, "the run did not complete"),
            (exit::USAGE, "usage error"),
            (exit::NOT_FOUND, "not found"),
            (exit::NOT_ALLOWED, "not allowed"),
            (exit::OTHER, "any other API error"),
        ] {
            assert!(EXIT_CODES_HELP.contains(&format!("  {code}  {meaning}")), "{code} {meaning}");
        }
        let not_clean = format!("  {}  the run did not complete", exit::CHECK_NOT_CLEAN);
        assert!(EXIT_CODES_HELP.contains(&not_clean), "{not_clean}");
        assert!(EXIT_CODES_HELP.contains("or a replay check found a run that would not go on"));
    }
}
