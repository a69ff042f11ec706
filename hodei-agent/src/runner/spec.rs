//! What to run, and the secrets it gets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::encoding::base64_padded;
use super::error::RunnerError;

/// Interpreters, by file name, that are POSIX shells: their scripts get secrets as variables.
const SHELLS: [&str; 7] = ["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh"];

/// Where a shell reads its script: stdin, opened as a file, so that the shell reads it through
/// a descriptor of its own and the script can hand fd 0 to its commands.
const SHELL_SCRIPT_PATH: &str = "/dev/stdin";

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
    /// An interpreter and its script, which reaches it through stdin (see the runner's module
    /// documentation). A POSIX shell (`sh`, `bash`, `dash`, `zsh`, `ksh`, `ash`, `mksh`, by file
    /// name) is run as `<interpreter> <args> /dev/stdin` and gets each secret as a shell
    /// variable holding its value; any other interpreter reads the secret header, then the
    /// script, from stdin.
    Script {
        /// The interpreter.
        interpreter: String,
        /// Its arguments, before the script. A shell's must not be `-s` or `-c`: it reads the
        /// script as a file.
        args: Vec<String>,
        /// The script.
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
    /// The most memory the job's processes may use together, in bytes: its cgroup's
    /// `memory.max`, with no swap on top. Past it the kernel kills the whole job
    /// ([`JobResult::oom_killed`](super::JobResult::oom_killed)). Only a job cgroup can hold a
    /// limit, so a job with one fails to start where the runner cannot make a cgroup. A script
    /// job is under the limit from its first command; a command job from a moment after its
    /// spawn, when the runner has moved it into its cgroup (what it forks or touches before that
    /// stays outside).
    #[serde(default)]
    pub memory_limit: Option<u64>,
}

impl JobSpec {
    /// Runs `program` with `args`.
    pub fn command(program: impl Into<String>, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let invocation =
            Invocation::Command { program: program.into(), args: args.into_iter().map(Into::into).collect() };
        Self::new(invocation)
    }

    /// Runs `script` with `interpreter` and `args` ([`Invocation::Script`]).
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
            memory_limit: None,
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

    /// Sets the memory limit ([`JobSpec::memory_limit`]).
    #[must_use]
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
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

    /// Whether this is a script for a POSIX shell, which gets its secrets as shell variables.
    pub(crate) fn is_shell_script(&self) -> bool {
        match &self.invocation {
            Invocation::Script { interpreter, .. } => {
                let name = interpreter.rsplit('/').next().unwrap_or(interpreter);
                SHELLS.contains(&name)
            }
            Invocation::Command { .. } => false,
        }
    }

    /// The arguments the process gets: a shell script's own, then the path it reads its
    /// script from.
    pub(crate) fn process_args(&self) -> impl Iterator<Item = &str> {
        let script_path = self.is_shell_script().then_some(SHELL_SCRIPT_PATH);
        self.args().iter().map(String::as_str).chain(script_path)
    }

    /// The job's whole stdin for these secrets ([`Secrets::stdin_payload`] or
    /// [`Secrets::shell_payload`]).
    pub(crate) fn stdin_payload(&self, secrets: &Secrets) -> SecretValue {
        if self.is_shell_script() {
            secrets.shell_payload(self.script_bytes())
        } else {
            secrets.stdin_payload(self.script_bytes())
        }
    }

    /// Refuses what would fail obscurely at spawn, and any secret value on the command line.
    pub(crate) fn validate(&self, secrets: &Secrets) -> Result<(), RunnerError> {
        let invalid = |reason: String| Err(RunnerError::InvalidSpec { reason });
        if self.program().is_empty() {
            return invalid("the program is empty".into());
        }
        if self.memory_limit == Some(0) {
            return invalid("a memory limit of 0 bytes kills the job before it runs".into());
        }
        if self.is_shell_script()
            && let Some(flag) = self.args().iter().find(|a| a.as_str() == "-s" || a.as_str() == "-c")
        {
            return invalid(format!(
                "a shell script is read from {SHELL_SCRIPT_PATH} as a file, so its shell takes no `{flag}`: leave it out"
            ));
        }
        if self.is_shell_script()
            && let Some((name, _)) = secrets.iter().find(|(_, value)| value.expose().contains(&0))
        {
            return invalid(format!(
                "secret `{name}` holds a NUL byte, which no shell variable can; run the job as a program, which reads the secret header"
            ));
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

/// After a shell script's secrets: its commands read `/dev/null`, not the rest of the script.
const SHELL_STDIN_HANDOVER: &[u8] = b"exec 0</dev/null\n";

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

    /// A shell script's stdin: one assignment per secret, its value in single quotes (a `'` in
    /// it as `'\''`), so that the variable holds the value's bytes exactly; then stdin is
    /// handed back to the commands as `/dev/null` (the shell goes on reading its script through
    /// its own descriptor); then the script. The values are never exported.
    pub(crate) fn shell_payload(&self, script: &[u8]) -> SecretValue {
        // Sized up front for the worst case (every byte a quote): a Vec that grows leaves
        // copies of the secrets behind in freed memory.
        let header: usize = self.iter().map(|(name, value)| name.len() + 4 * value.0.len() + 4).sum();
        let mut out = Vec::with_capacity(header + SHELL_STDIN_HANDOVER.len() + script.len());
        for (name, value) in self.iter() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"='");
            for &byte in value.expose() {
                match byte {
                    b'\'' => out.extend_from_slice(b"'\\''"),
                    byte => out.push(byte),
                }
            }
            out.extend_from_slice(b"'\n");
        }
        out.extend_from_slice(SHELL_STDIN_HANDOVER);
        out.extend_from_slice(script);
        SecretValue(out)
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
