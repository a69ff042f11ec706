//! What to run, and the secrets it gets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::RunnerError;
use super::mask::base64_padded;

/// The grace period when a spec sets none: what `docker stop` gives a container.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// What the job's process is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Invocation {
    /// A program and its arguments; its stdin carries the secret header only.
    Command {
        /// The program: a path, or a name looked up in the job's `PATH`.
        program: String,
        /// Its arguments (never a secret: the runner refuses a spec that puts one there).
        args: Vec<String>,
    },
    /// An interpreter that reads the script from stdin after the secret header, e.g.
    /// `/bin/sh -s` or `bash -s`.
    Script {
        /// The interpreter.
        interpreter: String,
        /// Its arguments (for a POSIX shell, `-s` makes it read commands from stdin).
        args: Vec<String>,
        /// The script, sent on stdin after the header.
        script: Vec<u8>,
    },
}

impl fmt::Debug for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Command { program, args } => {
                f.debug_struct("Command").field("program", program).field("args", args).finish()
            }
            Self::Script { interpreter, args, script } => f
                .debug_struct("Script")
                .field("interpreter", interpreter)
                .field("args", args)
                .field("script_len", &script.len())
                .finish(),
        }
    }
}

/// One job to run: the process, its environment, its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobSpec {
    /// The process.
    pub invocation: Invocation,
    /// Variables set for the job, after the inherited ones if `inherit_env`.
    pub env: Vec<(String, String)>,
    /// Whether the job starts from the agent's environment; by default it starts empty, so
    /// that nothing of the agent's own (tokens, paths) leaks into a job by accident.
    pub inherit_env: bool,
    /// The working directory; the agent's own when `None`.
    pub working_dir: Option<PathBuf>,
    /// The job is stopped as [`Outcome::TimedOut`](super::Outcome::TimedOut) after this long.
    pub timeout: Option<Duration>,
    /// How long a stopped job gets between SIGTERM and SIGKILL, and how long its output pipes
    /// may stay open after its main process has exited.
    pub grace: Duration,
}

impl JobSpec {
    /// Runs `program` with `args`.
    pub fn command(program: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let invocation =
            Invocation::Command { program: program.into(), args: args.into_iter().map(Into::into).collect() };
        Self::new(invocation)
    }

    /// Runs `interpreter` with `args` and sends `script` on its stdin after the secret header.
    pub fn script(
        interpreter: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
        script: impl Into<Vec<u8>>,
    ) -> Self {
        Self::new(Invocation::Script {
            interpreter: interpreter.into(),
            args: args.into_iter().map(Into::into).collect(),
            script: script.into(),
        })
    }

    fn new(invocation: Invocation) -> Self {
        Self {
            invocation,
            env: Vec::new(),
            inherit_env: false,
            working_dir: None,
            timeout: None,
            grace: DEFAULT_GRACE,
        }
    }

    /// Sets one environment variable.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Starts from the agent's environment instead of an empty one.
    #[must_use]
    pub fn inherit_env(mut self, inherit: bool) -> Self {
        self.inherit_env = inherit;
        self
    }

    /// Sets the working directory.
    #[must_use]
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// Sets the timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the grace period.
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub(crate) fn program(&self) -> &str {
        match &self.invocation {
            Invocation::Command { program, .. } => program,
            Invocation::Script { interpreter, .. } => interpreter,
        }
    }

    pub(crate) fn args(&self) -> &[String] {
        match &self.invocation {
            Invocation::Command { args, .. } | Invocation::Script { args, .. } => args,
        }
    }

    pub(crate) fn script_bytes(&self) -> &[u8] {
        match &self.invocation {
            Invocation::Command { .. } => &[],
            Invocation::Script { script, .. } => script,
        }
    }

    /// Refuses what would fail obscurely at spawn, and any secret value on the command line.
    pub(crate) fn validate(&self, secrets: &Secrets) -> Result<(), RunnerError> {
        let invalid = |reason: String| Err(RunnerError::InvalidSpec { reason });
        if self.program().is_empty() {
            return invalid("the program is empty".into());
        }
        let texts = std::iter::once(self.program()).chain(self.args().iter().map(String::as_str));
        if texts.clone().any(|t| t.contains('\0')) {
            return invalid("the program or an argument contains a NUL byte".into());
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return invalid(format!("environment variable {name:?} has an empty name, `=` or NUL"));
            }
        }
        for (name, secret) in secrets.iter() {
            let value = secret.expose();
            if value.is_empty() {
                continue;
            }
            let found = |hay: &[u8]| hay.windows(value.len()).any(|w| w == value);
            let place = if found(self.program().as_bytes()) {
                Some("program")
            } else if self.args().iter().any(|a| found(a.as_bytes())) {
                Some("arguments")
            } else if self.env.iter().any(|(k, v)| found(k.as_bytes()) || found(v.as_bytes())) {
                Some("environment")
            } else if self.working_dir.as_ref().is_some_and(|d| found(d.as_os_str().as_encoded_bytes())) {
                Some("working directory")
            } else {
                None
            };
            if let Some(place) = place {
                return Err(RunnerError::SecretInCommandLine { name: name.to_owned(), place });
            }
        }
        Ok(())
    }
}

/// A secret's value: any bytes. Its `Debug` prints `***`, it has no `Display` and no
/// `Serialize`, and its memory is overwritten when dropped (best effort: copies made by the
/// allocator when a `Vec` grew are out of reach).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self(value.into())
    }

    /// The value itself. Every call site is a place where a secret can leak: keep them few.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites a buffer that held secret bytes before it is freed.
pub(crate) fn wipe(buf: &mut Vec<u8>) {
    buf.fill(0);
    // Keeps the zeroing from being optimised away as a dead store before the free.
    std::hint::black_box(&buf);
}

/// The resolved secrets of one job, by name. `Debug` shows the names only.
#[derive(Clone, Default)]
pub struct Secrets(BTreeMap<String, SecretValue>);

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one secret. The name must match `[A-Za-z_][A-Za-z0-9_]*`, so that a
    /// header line is unambiguous and, for a POSIX shell, a plain variable assignment.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Result<(), RunnerError> {
        let name = name.into();
        let reason = match name.as_bytes() {
            [] => Some("it is empty"),
            [first, ..] if first.is_ascii_digit() => Some("it starts with a digit"),
            bytes if !bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_') => {
                Some("only ASCII letters, digits and `_` are allowed")
            }
            _ => None,
        };
        if let Some(reason) = reason {
            return Err(RunnerError::InvalidSecretName { name, reason });
        }
        self.0.insert(name, SecretValue::new(value));
        Ok(())
    }

    /// How many secrets there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The secrets in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SecretValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.0.values().map(SecretValue::expose)
    }

    /// The job's whole stdin: the header (see the module documentation), then the script.
    pub(crate) fn stdin_payload(&self, script: &[u8]) -> SecretValue {
        // Sized up front: a Vec that grows leaves copies of the secrets behind in freed memory.
        let header: usize =
            self.iter().map(|(name, value)| name.len() + value.0.len().div_ceil(3) * 4 + 2).sum();
        let mut out = Vec::with_capacity(header + 1 + script.len());
        for (name, value) in self.iter() {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            base64_padded(value.expose(), &mut out);
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(script);
        SecretValue(out)
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}
