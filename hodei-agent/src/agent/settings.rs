//! The agent's settings, from flags and environment variables, and its `--help`.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::backoff::BackoffPolicy;
use super::error::AgentError;
use crate::pki::{agent_client_config, validate_worker_id};

/// One setting: its flag, its environment variable, and what it is for (for `--help`).
pub(super) struct Spec {
    flag: &'static str,
    pub(super) env: &'static str,
    help: &'static str,
}

const REGISTRATION_ADDR: Spec = Spec {
    flag: "--registration-addr",
    env: "HODEI_REGISTRATION_ADDR",
    help: "the control plane's registration listener, IP:PORT, or several separated by commas \
           (control planes sharing a database), tried in turn until one answers (required)",
};
const SESSION_ADDR: Spec = Spec {
    flag: "--session-addr",
    env: "HODEI_SESSION_ADDR",
    help: "the control plane's mutual-TLS session listener, IP:PORT, or several separated by \
           commas: the agent stays with the one it reached and moves on to the next when it \
           cannot open a session there (required)",
};
const WORKER_ID: Spec =
    Spec { flag: "--worker-id", env: "HODEI_WORKER_ID", help: "this worker's id (required)" };
pub(super) const TOKEN: Spec = Spec {
    flag: "--token",
    env: "HODEI_TOKEN",
    help: "one-time registration token, needed only without a valid stored certificate; prefer \
           the variable or --token-file: command lines are visible to other users in /proc",
};
pub(super) const TOKEN_FILE: Spec = Spec {
    flag: "--token-file",
    env: "HODEI_TOKEN_FILE",
    help: "a file holding the registration token (surrounding whitespace is ignored)",
};
const CA_BUNDLE: Spec = Spec {
    flag: "--ca-bundle",
    env: "HODEI_CA_BUNDLE",
    help: "PEM file of the control plane's CA, the only one trusted (required)",
};
const WORK_DIR: Spec = Spec {
    flag: "--work-dir",
    env: "HODEI_WORK_DIR",
    help: "where the agent keeps its key and certificate (mode 0600), reused across restarts (required)",
};

/// Not a flag: `1` makes jobs die with the agent ([`Settings::jobs_die_with_process`]). The
/// local provider sets it for the agents it starts as child processes, whose jobs would
/// otherwise outlive a killed agent and run beside the retry of their step.
pub const JOBS_DIE_WITH_AGENT_ENV: &str = "HODEI_JOBS_DIE_WITH_AGENT";

const SPECS: [&Spec; 7] =
    [&REGISTRATION_ADDR, &SESSION_ADDR, &WORKER_ID, &TOKEN, &TOKEN_FILE, &CA_BUNDLE, &WORK_DIR];

impl Spec {
    pub(super) fn error(&self, reason: impl Into<String>) -> AgentError {
        AgentError::Setting { flag: self.flag, env: self.env, reason: reason.into() }
    }
}

/// The text of `--help`: every setting with its flag and environment variable.
pub fn help() -> String {
    let mut text = String::from(
        "hodei-agent: the Hodei worker agent. It registers with the control plane once, stores its \
         key and certificate, then keeps a session open, reconnecting with backoff.\n\n\
         Usage: hodei-agent [FLAG VALUE | FLAG=VALUE]...\n\n\
         Every setting is a flag or an environment variable; the flag wins.\n\n",
    );
    for spec in SPECS {
        text.push_str(&format!("  {} <VALUE>  (env {})\n      {}\n", spec.flag, spec.env, spec.help));
    }
    text.push_str(
        "  --help\n      prints this and exits\n\nSIGTERM or SIGINT stops the agent (exit 0).\n\n\
         HODEI_AGENT_LOG=<filter> (`debug`, `hodei_agent=trace`, ...) adds the agent's diagnostic \
         log to its status lines on stderr.\n\n\
         HODEI_JOBS_DIE_WITH_AGENT=1 kills a job's processes when the agent dies, however it \
         dies (a watcher, /bin/sh, outside the agent), so that they never outlive it.\n",
    );
    text
}

/// The agent's settings, once parsed and checked. `Debug` leaves the token out.
#[derive(Clone)]
#[non_exhaustive]
pub struct Settings {
    /// The hubs' registration listeners, in the order they are tried; never empty.
    pub registration_addrs: Vec<SocketAddr>,
    /// The hubs' session listeners, in the order they are tried; never empty.
    pub session_addrs: Vec<SocketAddr>,
    /// This worker's id.
    pub worker_id: String,
    /// The registration token, if one was given.
    pub token: Option<String>,
    /// The CA bundle, PEM.
    pub ca_bundle_pem: String,
    /// Where the key and certificate are kept.
    pub work_dir: PathBuf,
    /// Reconnection delays; not a flag, but tests shorten them.
    pub backoff: BackoffPolicy,
    /// Whether jobs die with this process ([`RunnerConfig::jobs_die_with_process`]); not a
    /// flag: an agent inside another program (the local provider's in-process workers) sets it,
    /// and `HODEI_JOBS_DIE_WITH_AGENT=1` does (the local provider's child-process workers).
    ///
    /// [`RunnerConfig::jobs_die_with_process`]: crate::runner::RunnerConfig::jobs_die_with_process
    pub jobs_die_with_process: bool,
    /// Whether status lines (registration, sessions, reconnects) also go to stderr, as
    /// `hodei-agent: ...`, besides `tracing`; not a flag: the program prints them, an agent
    /// inside another program (the local provider's in-process workers) leaves them to that
    /// program's `tracing` subscriber.
    pub status_to_stderr: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("registration_addrs", &self.registration_addrs)
            .field("session_addrs", &self.session_addrs)
            .field("worker_id", &self.worker_id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("work_dir", &self.work_dir)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// What the command line asks for. Exhaustive, so that the binary handles every case.
#[derive(Debug)]
pub enum Command {
    /// Print [`help`] and exit 0.
    Help,
    /// Run the agent.
    Run(Settings),
}

impl Settings {
    /// Refuses settings whose address lists were emptied after parsing (the fields are public):
    /// there would be nothing to dial.
    pub(super) fn check_addresses(&self) -> Result<(), AgentError> {
        if self.registration_addrs.is_empty() {
            return Err(REGISTRATION_ADDR.error("no address"));
        }
        if self.session_addrs.is_empty() {
            return Err(SESSION_ADDR.error("no address"));
        }
        Ok(())
    }

    /// Parses `args` (without the program name), falling back to `env` for settings not given as
    /// flags.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Command, AgentError> {
        let mut flags: Vec<(&'static Spec, String)> = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(Command::Help);
            }
            let (name, inline) = match arg.split_once('=') {
                Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
                None => (arg.clone(), None),
            };
            let spec =
                SPECS.into_iter().find(|spec| spec.flag == name).ok_or(AgentError::UnknownFlag(arg))?;
            let value = match inline {
                Some(value) => value,
                None => args.next().ok_or_else(|| spec.error("the flag needs a value"))?,
            };
            flags.push((spec, value));
        }
        // The last occurrence of a flag wins, as with most tools; then the environment.
        let get = |spec: &Spec| {
            flags
                .iter()
                .rev()
                .find(|(s, _)| s.flag == spec.flag)
                .map(|(_, v)| v.clone())
                .or_else(|| env(spec.env))
        };
        let required = |spec: &Spec| get(spec).filter(|v| !v.is_empty()).ok_or_else(|| spec.error("missing"));
        let addresses = |spec: &Spec| {
            let value = required(spec)?;
            value
                .split(',')
                .map(|one| {
                    one.trim()
                        .parse::<SocketAddr>()
                        .map_err(|e| spec.error(format!("`{}` is not an IP:PORT address: {e}", one.trim())))
                })
                .collect::<Result<Vec<_>, _>>()
        };

        let registration_addrs = addresses(&REGISTRATION_ADDR)?;
        let session_addrs = addresses(&SESSION_ADDR)?;
        let worker_id = required(&WORKER_ID)?;
        validate_worker_id(&worker_id).map_err(|e| WORKER_ID.error(e.to_string()))?;
        let ca_path = required(&CA_BUNDLE)?;
        let ca_bundle_pem = fs::read_to_string(&ca_path)
            .map_err(|e| CA_BUNDLE.error(format!("cannot read {ca_path}: {e}")))?;
        // Checked now so that a wrong file is a setting error, not a failure at every dial.
        agent_client_config(&ca_bundle_pem, None).map_err(|e| CA_BUNDLE.error(format!("{ca_path}: {e}")))?;
        let work_dir = PathBuf::from(required(&WORK_DIR)?);
        // A flag beats a variable, whichever of the two token settings each is.
        let token_flag =
            |spec: &Spec| flags.iter().rev().find(|(s, _)| s.flag == spec.flag).map(|(_, v)| v.clone());
        let token = match (token_flag(&TOKEN), token_flag(&TOKEN_FILE)) {
            (Some(token), _) => Some(token),
            (None, Some(path)) => Some(read_token(&path)?),
            (None, None) => match (env(TOKEN.env), env(TOKEN_FILE.env)) {
                (Some(token), _) => Some(token),
                (None, Some(path)) => Some(read_token(&path)?),
                (None, None) => None,
            },
        }
        .filter(|token| !token.is_empty());
        Ok(Command::Run(Settings {
            registration_addrs,
            session_addrs,
            worker_id,
            token,
            ca_bundle_pem,
            work_dir,
            backoff: BackoffPolicy::default(),
            jobs_die_with_process: env(JOBS_DIE_WITH_AGENT_ENV).is_some_and(|v| v == "1"),
            status_to_stderr: true,
        }))
    }

    pub(super) fn key_path(&self) -> PathBuf {
        self.work_dir.join("agent.key")
    }

    pub(super) fn cert_path(&self) -> PathBuf {
        self.work_dir.join("agent.crt")
    }
}

fn read_token(path: &str) -> Result<String, AgentError> {
    fs::read_to_string(path)
        .map(|token| token.trim().to_owned())
        .map_err(|e| TOKEN_FILE.error(format!("cannot read {path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(registration: &str, session: &str) -> Result<Settings, AgentError> {
        parse_with(registration, session, |_| None)
    }

    fn parse_with(
        registration: &str,
        session: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, AgentError> {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let pki = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        fs::write(&ca, pki.cert.pem()).unwrap();
        let args = [
            format!("--registration-addr={registration}"),
            format!("--session-addr={session}"),
            "--worker-id=w-1".to_owned(),
            format!("--ca-bundle={}", ca.display()),
            format!("--work-dir={}", dir.path().display()),
        ];
        match Settings::parse(args, env)? {
            Command::Run(settings) => Ok(settings),
            Command::Help => panic!("not help"),
        }
    }

    #[test]
    fn jobs_die_with_the_agent_only_when_the_variable_says_1() {
        assert!(!parse("127.0.0.1:1", "127.0.0.1:2").unwrap().jobs_die_with_process);
        for (value, die) in [("1", true), ("0", false), ("", false)] {
            let env = |name: &str| (name == JOBS_DIE_WITH_AGENT_ENV).then(|| value.to_owned());
            assert_eq!(
                parse_with("127.0.0.1:1", "127.0.0.1:2", env).unwrap().jobs_die_with_process,
                die,
                "{value:?}"
            );
        }
    }

    #[test]
    fn addresses_are_one_or_a_list_in_order() {
        let one = parse("127.0.0.1:1", "127.0.0.1:2").unwrap();
        assert_eq!(one.registration_addrs, ["127.0.0.1:1".parse().unwrap()]);
        let several = parse("127.0.0.1:1, 127.0.0.1:3", "127.0.0.1:2,[::1]:4").unwrap();
        assert_eq!(
            several.registration_addrs,
            ["127.0.0.1:1".parse().unwrap(), "127.0.0.1:3".parse().unwrap()]
        );
        assert_eq!(several.session_addrs, ["127.0.0.1:2".parse().unwrap(), "[::1]:4".parse().unwrap()]);
        several.check_addresses().unwrap();
    }

    #[test]
    fn a_bad_address_in_a_list_is_a_setting_error_naming_it() {
        let error = parse("127.0.0.1:1,,127.0.0.1:3", "127.0.0.1:2").unwrap_err();
        assert!(
            matches!(&error, AgentError::Setting { flag: "--registration-addr", reason, .. } if reason.contains("``")),
            "{error}"
        );
        let error = parse("127.0.0.1:1", "127.0.0.1:2,hub:4").unwrap_err();
        assert!(
            matches!(&error, AgentError::Setting { flag: "--session-addr", reason, .. } if reason.contains("`hub:4`")),
            "{error}"
        );
        let mut emptied = parse("127.0.0.1:1", "127.0.0.1:2").unwrap();
        emptied.session_addrs.clear();
        assert!(matches!(emptied.check_addresses(), Err(AgentError::Setting { flag: "--session-addr", .. })));
    }
}
