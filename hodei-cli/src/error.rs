//! What went wrong, as one line and an exit code.

use std::fmt;

/// The exit codes, as `--help` documents them. Scripts branch on these, so they never change
/// meaning.
pub mod exit {
    /// Success; for `runs start --wait`, the run completed.
    pub const OK: u8 = 0;
    /// The run did not complete: failed, compensated, compensation_failed or parked.
    pub const RUN_NOT_COMPLETED: u8 = 1;
    /// A replay check found a run that would not go on on the server's code (it would park,
    /// wait for its version, or stall): the same code as a run that did not complete, since
    /// both say "it does not go on".
    pub const CHECK_NOT_CLEAN: u8 = 1;
    /// A usage error (clap's own code for bad arguments, reused for bad settings and input).
    pub const USAGE: u8 = 2;
    /// The run, definition, job or token does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// No valid token, or the token's role does not allow it (401/403).
    pub const NOT_ALLOWED: u8 = 4;
    /// Any other refusal by the API, or no answer from it.
    pub const OTHER: u8 = 5;
}

/// An error of the CLI: printed as `error: <message> (<code>)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The API's stable code when it refused (`not_found`, `forbidden`, ...), or the CLI's own
    /// (`usage`, `connection`, `invalid_response`, `io`).
    pub code: String,
    pub message: String,
    /// The HTTP status when the API answered.
    pub status: Option<u16>,
}

impl CliError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into(), status: None }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new("usage", message)
    }

    pub fn connection(message: impl Into<String>) -> Self {
        Self::new("connection", message)
    }

    pub fn api(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into(), status: Some(status) }
    }

    /// The process exit code for this error. The API's codes decide first; the status is the
    /// fallback for an answer without our error body (a proxy's 404 page, say).
    pub fn exit_code(&self) -> u8 {
        match self.code.as_str() {
            "usage" => exit::USAGE,
            "not_found" => exit::NOT_FOUND,
            "unauthenticated" | "forbidden" => exit::NOT_ALLOWED,
            _ => match self.status {
                Some(404) => exit::NOT_FOUND,
                Some(401 | 403) => exit::NOT_ALLOWED,
                _ => exit::OTHER,
            },
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line, whatever the server or the OS put in the message.
        let message: String =
            self.message.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect();
        write!(f, "{} ({})", message.trim(), self.code)
    }
}

impl std::error::Error for CliError {}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_api_codes() {
        let cases = [
            (CliError::api(404, "not_found", "no run `x`"), exit::NOT_FOUND),
            (CliError::api(401, "unauthenticated", "revoked"), exit::NOT_ALLOWED),
            (CliError::api(403, "forbidden", "viewer"), exit::NOT_ALLOWED),
            (CliError::api(409, "invalid_state", "ended"), exit::OTHER),
            (CliError::api(409, "conflict", "taken"), exit::OTHER),
            (CliError::api(422, "invalid_input", "bad"), exit::OTHER),
            (CliError::api(400, "invalid_request", "bad"), exit::OTHER),
            (CliError::api(503, "unavailable", "stopping"), exit::OTHER),
            (CliError::api(500, "internal", "disk"), exit::OTHER),
            (CliError::api(404, "http_404", "a proxy's page"), exit::NOT_FOUND),
            (CliError::api(403, "http_403", "a proxy's page"), exit::NOT_ALLOWED),
            (CliError::connection("refused"), exit::OTHER),
            (CliError::usage("--input is not JSON"), exit::USAGE),
        ];
        for (error, code) in cases {
            assert_eq!(error.exit_code(), code, "{error}");
        }
    }

    #[test]
    fn the_message_is_one_line_with_its_code() {
        let error = CliError::api(500, "internal", "the store:\nI/O error\r\n");
        assert_eq!(error.to_string(), "the store: I/O error (internal)");
    }
}
