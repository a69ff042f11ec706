//! Status lines for the agent's operator.

/// Writes a status line to tracing, and to stderr when `stderr`
/// ([`Settings::status_to_stderr`](super::Settings::status_to_stderr)).
pub(super) fn say(stderr: bool, line: std::fmt::Arguments<'_>) {
    tracing::info!("{line}");
    if stderr {
        // One write a line: stderr is unbuffered, and `eprintln!` writes each formatted piece
        // on its own, a dozen system calls for a line with an address in it.
        let text = format!("hodei-agent: {line}\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
    }
}
