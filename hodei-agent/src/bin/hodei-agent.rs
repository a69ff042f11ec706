//! The Hodei worker agent. See `hodei-agent --help`, and [`hodei_agent::agent`].

use std::process::ExitCode;

use hodei_agent::agent::{self, Command, Settings};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    let settings = match Settings::parse(std::env::args().skip(1), |name| std::env::var(name).ok()) {
        Ok(Command::Help) => {
            print!("{}", agent::help());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(settings)) => settings,
        Err(e) => return fail(&e),
    };
    // Status lines go to stderr regardless; this adds the library's own events, filtered as
    // `RUST_LOG` would be (`debug`, `hodei_agent=trace`, ...).
    if let Ok(filter) = std::env::var("HODEI_AGENT_LOG") {
        match tracing_subscriber::EnvFilter::try_new(&filter) {
            Ok(filter) => {
                tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init()
            }
            Err(e) => eprintln!("hodei-agent: HODEI_AGENT_LOG ignored: {e}"),
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hodei-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Installed before anything connects, so that an early signal is not the default (death).
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("hodei-agent: cannot handle signals: {e}");
                return Err(None);
            }
        };
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("hodei-agent: stopping on a signal");
        };
        agent::run(settings, stop).await.map_err(Some)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Some(e)) => fail(&e),
        Err(None) => ExitCode::FAILURE,
    }
}

/// One line on stderr; exit 2 for a setting the operator must fix, 1 for anything else.
fn fail(error: &agent::AgentError) -> ExitCode {
    eprintln!("hodei-agent: {error}");
    if error.is_usage() { ExitCode::from(2) } else { ExitCode::FAILURE }
}
