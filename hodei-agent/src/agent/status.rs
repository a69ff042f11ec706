//! Status lines for the agent's operator.

/// Writes a status line to tracing, and to stderr when `stderr`
/// ([`Settings::status_to_stderr`](super::Settings::status_to_stderr)).
pub(super) fn say(stderr: bool, line: std::fmt::Arguments<'_>) {
    tracing::info!("{line}");
    if stderr {
        eprintln!("hodei-agent: {line}");
    }
}
