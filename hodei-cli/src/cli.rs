//! The command line: what `hodei --help` shows.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::EXIT_CODES_HELP;
use crate::settings::Flags;

/// The command line of Hodei's operator API: runs, their journals and logs, approvals,
/// operator verbs, workers and tokens.
#[derive(Debug, Parser)]
#[command(name = "hodei", version, after_help = EXIT_CODES_HELP, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,

    /// Output: `human` (tables, a timeline) or `json` (the API's JSON; streams one object a line).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Connection {
    /// The API's address [env: HODEI_ADDR] [default: http://127.0.0.1:7433].
    #[arg(long, global = true, value_name = "URL")]
    pub addr: Option<String>,

    /// A bearer token, `hodei_...` [env: HODEI_TOKEN].
    #[arg(long, global = true, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,

    /// A file holding the token, such as the server's `<data>/api/admin-token`
    /// [env: HODEI_TOKEN_FILE].
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// A PEM CA certificate to trust for the server's certificate (a private CA)
    /// [env: HODEI_CA_CERT].
    #[arg(long, global = true, value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,

    /// The profile of the config file ($HODEI_CONFIG or ~/.config/hodei/config.toml)
    /// [env: HODEI_PROFILE] [default: default].
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
}

impl Connection {
    pub fn flags(&self) -> Flags {
        Flags {
            addr: self.addr.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            ca_cert: self.ca_cert.clone(),
            profile: self.profile.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs: list, inspect, follow, start, signal, approve, cancel, fork, retry, pause, resume,
    /// export and replay.
    #[command(subcommand)]
    Runs(Runs),
    /// Replays every run in flight on the server's code, running nothing: one line per run
    /// saying whether it would go on, then how many would not. Exits 1 if any would not.
    Check,
    /// The registered saga definitions, with their steps.
    Definitions,
    /// The workers the control plane holds or that are connected; drain or remove one.
    Workers {
        #[command(subcommand)]
        action: Option<Workers>,
    },
    /// A job's output, by the job id `runs get` shows.
    #[command(subcommand)]
    Jobs(Jobs),
    /// API tokens (needs an admin token).
    #[command(subcommand)]
    Tokens(Tokens),
    /// Prints a shell completion script: `hodei completions bash > /etc/bash_completion.d/hodei`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum Workers {
    /// Lists the workers (what `hodei workers` alone does).
    List,
    /// No new jobs for a worker: it finishes the one it runs, then is destroyed.
    Drain {
        /// The worker's id, as `hodei workers` lists it.
        id: String,
    },
    /// Destroys a worker now: the job it runs ends as lost and its step retries elsewhere.
    Remove {
        /// The worker's id, as `hodei workers` lists it.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum Runs {
    /// Lists runs in id order.
    List(ListArgs),
    /// A run: status, input, output, error, steps with attempts and jobs, what it waits for,
    /// and who did what.
    Get {
        /// The run's id.
        id: String,
    },
    /// The run's journal as a timeline, one line per event.
    Events {
        /// The run's id.
        id: String,
        /// Keep following new events until the run ends.
        #[arg(short, long)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
    },
    /// The output of the run's jobs (stdout unless --stderr).
    Logs {
        /// The run's id.
        id: String,
        /// Only the jobs of steps with this name.
        #[arg(long, value_name = "NAME")]
        step: Option<String>,
        /// Stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep following new output (and new jobs) until the run ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Starts a run of a definition (starting an id again with the same input returns that run).
    Start(StartArgs),
    /// Sends a signal to a run.
    Signal {
        /// The run's id.
        id: String,
        /// The signal's name.
        name: String,
        /// Its payload, as JSON [default: null].
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
    },
    /// Approves a run: sends its approval signal.
    Approve {
        /// The run's id.
        id: String,
        /// The signal the run waits on for its approval.
        #[arg(long, value_name = "NAME", default_value = "approval")]
        signal: String,
        /// The approval's payload, as JSON [default: null].
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
    },
    /// Cancels a run: its started steps are compensated.
    ///
    /// A parked run, or one waiting for its version, ends at once: its compensations wait for code
    /// that matches its journal (then `retry-compensation`).
    Cancel {
        /// The run's id.
        id: String,
        /// Why; journaled [default: cancelled by <token name>].
        #[arg(long)]
        reason: Option<String>,
    },
    /// Forks a run into a new one that reuses its recorded steps before a step.
    ///
    /// A parked run, or one waiting for its version, is moved: it ends, and the fork carries on in
    /// its place.
    Fork {
        /// The run to fork.
        id: String,
        /// The new run's id.
        #[arg(long = "id", value_name = "NEW_ID")]
        new_id: String,
        /// The first step the fork runs live [default: the first step started after the last
        /// completed one; for a run that failed in a step, that step].
        #[arg(long, value_name = "N")]
        from_step: Option<u32>,
        /// The definition version the fork runs [default: the run's own if registered, else the
        /// newest].
        #[arg(long, value_name = "N")]
        version: Option<u32>,
    },
    /// Starts now the next attempt of a step (or compensation) waiting out a retry backoff.
    Retry {
        /// The run's id.
        id: String,
    },
    /// Runs the failed compensation of a run in compensation_failed again.
    RetryCompensation {
        /// The run's id.
        id: String,
    },
    /// Pauses a run before its next step.
    Pause {
        /// The run's id.
        id: String,
    },
    /// Resumes a paused run.
    Resume {
        /// The run's id.
        id: String,
    },
    /// Writes a run's journal to a file, or those of every run in flight to a directory: to
    /// replay on another build (`runs replay --file`, or the build's own check) before it is
    /// deployed.
    Export(ExportArgs),
    /// Replays a run's journal on the server's code, running nothing, and says whether the run
    /// would go on, park or wait for its version, with the patches it reached. Exits 1 if it
    /// would not go on.
    ///
    /// With --file, the journal is a file exported from another server (`runs export`): point
    /// --addr at a server running the new build to check the runs of the one it would replace.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("runs").required(true).args(["id", "in_flight"])))]
pub struct ExportArgs {
    /// The run's id.
    pub id: Option<String>,
    /// Where to write the run's journal (`-`: stdout) [default: `<id>.journal` in the current
    /// directory].
    #[arg(long, value_name = "FILE", conflicts_with = "in_flight")]
    pub out: Option<PathBuf>,
    /// Every run in flight (running, paused, compensating, parked, waiting for its version),
    /// each to `<id>.journal` in --dir.
    #[arg(long, requires = "dir")]
    pub in_flight: bool,
    /// The directory the journals of --in-flight go to; created if missing.
    #[arg(long, value_name = "DIR", conflicts_with = "id")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("journal").required(true).args(["id", "file"])))]
pub struct ReplayArgs {
    /// The run's id: its journal on the server.
    pub id: Option<String>,
    /// A journal file (`runs export`; `-`: stdin), replayed on the server's code.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only runs with this status.
    #[arg(long, value_enum)]
    pub status: Option<RunStatus>,
    /// Only runs of this definition.
    #[arg(long, value_name = "NAME")]
    pub definition: Option<String>,
    /// Only runs of this definition version.
    #[arg(long)]
    pub version: Option<u32>,
    /// Only runs started at or after this time: RFC 3339, or an age like 90s, 15m, 2h, 7d.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only runs started before this time: RFC 3339, or an age like 90s, 15m, 2h, 7d.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// At most this many runs.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: u64,
    /// Every run, page after page (ignores --limit).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Paused,
    Compensating,
    Parked,
    WaitingForVersion,
    Completed,
    Compensated,
    CompensationFailed,
    Failed,
}

impl RunStatus {
    /// The statuses of a run that has not ended.
    pub const IN_FLIGHT: [RunStatus; 5] =
        [Self::Running, Self::Paused, Self::Compensating, Self::Parked, Self::WaitingForVersion];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Compensating => "compensating",
            Self::Parked => "parked",
            Self::WaitingForVersion => "waiting_for_version",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::CompensationFailed => "compensation_failed",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The definition to run.
    pub definition: String,
    /// The run's id (its idempotency key).
    #[arg(long)]
    pub id: String,
    /// The input, as JSON [default: null].
    #[arg(long, value_name = "JSON", conflicts_with = "input_file")]
    pub input: Option<String>,
    /// A file holding the input as JSON (`-`: stdin).
    #[arg(long, value_name = "PATH")]
    pub input_file: Option<PathBuf>,
    /// Follow the run, printing each step as it starts and ends, and exit with its outcome
    /// (0 completed, 1 not).
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum Tokens {
    /// Lists every token, revoked ones too (never their secrets).
    List,
    /// Issues a token and prints its secret: the only time it is shown.
    Issue {
        /// Its name: what the journal records as who did something.
        name: String,
        /// What it may do.
        #[arg(long, value_enum)]
        role: Role,
    },
    /// Revokes a token at once.
    Revoke {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum Jobs {
    /// A job's stdout (or stderr), from its start.
    Logs {
        /// The job's id, such as `deploy-42/3#1`.
        job: String,
        /// Stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep following new output until the job's log is closed.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    /// Reads: definitions, runs, journals, logs, workers.
    Viewer,
    /// Also starts, signals, cancels, forks, retries, pauses and resumes runs.
    Operator,
    /// Also issues and revokes tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere_and_usage_errors_are_code_2() {
        let cli = Cli::try_parse_from(["hodei", "runs", "get", "r1", "--addr", "h:1", "-o", "json"]).unwrap();
        assert_eq!(cli.connection.addr.as_deref(), Some("h:1"));
        assert_eq!(cli.output, Output::Json);
        let error = Cli::try_parse_from([
            "hodei",
            "runs",
            "start",
            "d",
            "--id",
            "x",
            "--input",
            "1",
            "--input-file",
            "f",
        ])
        .unwrap_err();
        assert_eq!(error.exit_code(), 2);
        let error = Cli::try_parse_from(["hodei", "runs", "list", "--status", "done"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn approve_defaults_to_the_approval_signal() {
        let cli = Cli::try_parse_from(["hodei", "runs", "approve", "r1"]).unwrap();
        match cli.command {
            Command::Runs(Runs::Approve { signal, payload, .. }) => {
                assert_eq!(signal, "approval");
                assert_eq!(payload, None);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn export_takes_a_run_or_every_run_in_flight_and_replay_a_run_or_a_file() {
        let parses = |args: &[&str]| Cli::try_parse_from([&["hodei", "runs"], args].concat());
        for args in [
            &["export", "r1"][..],
            &["export", "r1", "--out", "-"],
            &["export", "--in-flight", "--dir", "journals"],
            &["replay", "r1"],
            &["replay", "--file", "r1.journal"],
        ] {
            assert!(parses(args).is_ok(), "{args:?}");
        }
        for args in [
            &["export"][..],
            &["export", "r1", "--in-flight", "--dir", "j"],
            &["export", "--in-flight"],
            &["export", "--in-flight", "--dir", "j", "--out", "f"],
            &["export", "r1", "--dir", "j"],
            &["replay"],
            &["replay", "r1", "--file", "r1.journal"],
        ] {
            let error = parses(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn the_help_documents_the_exit_codes() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("3  not found"), "{help}");
    }
}
