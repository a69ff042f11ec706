//! The journaled job: what it runs, where, with what, and the wire spec it becomes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Resources;
use super::secrets::{SecretError, SecretSource};
use hodei_agent::protocol::v1;

/// What a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Program {
    /// A program and its arguments, run directly.
    Command(Vec<String>),
    /// A script and its interpreter (for example `["/bin/sh"]`; a shell gets its secrets as
    /// variables, see the runner's module documentation).
    Script {
        /// The interpreter and its arguments.
        interpreter: Vec<String>,
        /// The script's text.
        script: String,
    },
}

/// Where a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Placement {
    /// The worker with this id, which must connect by itself.
    Worker(String),
    /// A worker from the dispatcher's [`WorkerPool`] (provisioned on demand) that matches the
    /// labels and, when given, comes from the named provider.
    ///
    /// [`WorkerPool`]: super::WorkerPool
    Pool {
        /// Labels the worker must carry.
        labels: BTreeMap<String, String>,
        /// The provider to take it from, by name; any matching one when `None`.
        provider: Option<String>,
    },
}

/// Where an inherited variable's value comes from ([`Job::inherit_env`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Inherit {
    /// The worker's own environment: the agent's, which the provider set (a container's image,
    /// a pod's spec, the local machine).
    Worker,
    /// The control plane's process environment, read when the job is dispatched.
    ControlPlane,
}

impl Inherit {
    fn key_prefix(self) -> &'static str {
        match self {
            Self::Worker => INHERIT_WORKER,
            Self::ControlPlane => INHERIT_CONTROL_PLANE,
        }
    }
}

// Inherited names are journaled inside `env`, under keys no variable can have (a POSIX
// variable name never holds `=`). bincode is positional: a field of their own would change the
// journaled input of every job step, so an upgrade would park every saga in flight with one
// ("the code now passes another input"). This way a job that inherits nothing is journaled
// byte for byte as before (`a_job_without_inheritance_is_journaled_as_before`).
const INHERIT_WORKER: &str = "=inherit-from-worker:";
const INHERIT_CONTROL_PLANE: &str = "=inherit-from-control-plane:";

/// A remote job: the journaled input of its step. It holds secret names, never their values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "JobRecord", into = "JobRecord")]
#[non_exhaustive]
pub struct Job {
    /// What to run.
    pub program: Program,
    /// The job's whole environment (jobs start with an empty one).
    pub env: BTreeMap<String, String>,
    /// The working directory on the worker; the agent's default when `None`.
    pub working_dir: Option<String>,
    /// The worker-side time limit; none when `None`.
    pub timeout: Option<Duration>,
    /// How long a cancelled or timed-out job gets between SIGTERM and SIGKILL.
    pub cancel_grace: Option<Duration>,
    /// Secrets, by the variable the job sees them as, to the name the [`SecretSource`] knows.
    pub secrets: BTreeMap<String, String>,
    /// Where to run it.
    pub placement: Placement,
    /// What it needs of its worker.
    pub resources: Resources,
    /// Its place in the pool's queue: higher goes first, then earlier arrival.
    pub priority: i32,
    /// Variables the job inherits, by name, and from where; a variable the job sets in `env`
    /// wins, and one the source does not have is left unset.
    pub inherit: BTreeMap<String, Inherit>,
}

/// How a [`Job`] is journaled: its fields before `inherit` existed, with the inherited names
/// folded into `env` (see [`INHERIT_WORKER`]).
#[derive(Serialize, Deserialize)]
struct JobRecord {
    program: Program,
    env: BTreeMap<String, String>,
    working_dir: Option<String>,
    timeout: Option<Duration>,
    cancel_grace: Option<Duration>,
    secrets: BTreeMap<String, String>,
    placement: Placement,
    resources: Resources,
    priority: i32,
}

impl From<Job> for JobRecord {
    fn from(job: Job) -> Self {
        let Job {
            program,
            mut env,
            working_dir,
            timeout,
            cancel_grace,
            secrets,
            placement,
            resources,
            priority,
            inherit,
        } = job;
        for (name, from) in inherit {
            env.insert(format!("{}{name}", from.key_prefix()), String::new());
        }
        Self { program, env, working_dir, timeout, cancel_grace, secrets, placement, resources, priority }
    }
}

impl From<JobRecord> for Job {
    fn from(record: JobRecord) -> Self {
        let JobRecord {
            program,
            env: journaled,
            working_dir,
            timeout,
            cancel_grace,
            secrets,
            placement,
            resources,
            priority,
        } = record;
        let mut env = BTreeMap::new();
        let mut inherit = BTreeMap::new();
        for (key, value) in journaled {
            if let Some(name) = key.strip_prefix(INHERIT_WORKER) {
                inherit.insert(name.to_owned(), Inherit::Worker);
            } else if let Some(name) = key.strip_prefix(INHERIT_CONTROL_PLANE) {
                inherit.insert(name.to_owned(), Inherit::ControlPlane);
            } else {
                env.insert(key, value);
            }
        }
        Job {
            program,
            env,
            working_dir,
            timeout,
            cancel_grace,
            secrets,
            placement,
            resources,
            priority,
            inherit,
        }
    }
}

impl Job {
    /// Runs `command` (program and arguments) on `worker`.
    pub fn command<S: Into<String>>(worker: impl Into<String>, command: impl IntoIterator<Item = S>) -> Self {
        Self::new(worker, Program::Command(command.into_iter().map(Into::into).collect()))
    }

    /// Runs `script` with `interpreter` (for example `["/bin/sh"]`) on `worker`.
    pub fn script<S: Into<String>>(
        worker: impl Into<String>,
        interpreter: impl IntoIterator<Item = S>,
        script: impl Into<String>,
    ) -> Self {
        let interpreter = interpreter.into_iter().map(Into::into).collect();
        Self::new(worker, Program::Script { interpreter, script: script.into() })
    }

    /// Runs `command` on a worker from the dispatcher's pool ([`Placement::Pool`] with no
    /// labels: any worker of any provider).
    pub fn pooled_command<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Self {
        Self::new("", Program::Command(command.into_iter().map(Into::into).collect()))
            .placement(Placement::Pool { labels: BTreeMap::new(), provider: None })
    }

    /// Runs `script` with `interpreter` on a worker from the dispatcher's pool.
    pub fn pooled_script<S: Into<String>>(
        interpreter: impl IntoIterator<Item = S>,
        script: impl Into<String>,
    ) -> Self {
        Self::script("", interpreter, script)
            .placement(Placement::Pool { labels: BTreeMap::new(), provider: None })
    }

    /// Sets where the job runs.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Requires the pool's worker to carry `name=value` (turns the placement into a pool one).
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        match &mut self.placement {
            Placement::Pool { labels, .. } => {
                labels.insert(name.into(), value.into());
            }
            Placement::Worker(_) => {
                self.placement =
                    Placement::Pool { labels: [(name.into(), value.into())].into(), provider: None };
            }
        }
        self
    }

    /// Takes the worker from the provider named `provider` (turns the placement into a pool one).
    pub fn provider(mut self, provider: impl Into<String>) -> Self {
        match &mut self.placement {
            Placement::Pool { provider: hint, .. } => *hint = Some(provider.into()),
            Placement::Worker(_) => {
                self.placement = Placement::Pool { labels: BTreeMap::new(), provider: Some(provider.into()) };
            }
        }
        self
    }

    /// Sets the resources the job needs.
    pub fn resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// Sets the job's priority in the pool's queue.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    fn new(worker: impl Into<String>, program: Program) -> Self {
        Self {
            program,
            env: BTreeMap::new(),
            working_dir: None,
            timeout: None,
            cancel_grace: None,
            secrets: BTreeMap::new(),
            placement: Placement::Worker(worker.into()),
            resources: Resources::default(),
            priority: 0,
            inherit: BTreeMap::new(),
        }
    }

    /// Sets one environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Passes the worker's own values of `names` to the job (`PATH`, `HOME`, a toolchain's
    /// variables): the agent's environment, as the provider set it. Jobs otherwise start with
    /// an empty environment, so that nothing of the agent's leaks into a job by accident.
    pub fn inherit_env<S: Into<String>>(self, names: impl IntoIterator<Item = S>) -> Self {
        self.inherit_from(Inherit::Worker, names)
    }

    /// Passes the control plane's values of `names` to the job, read when it is dispatched (each
    /// attempt reads them again, like secrets; they are not journaled).
    pub fn inherit_env_from_control_plane<S: Into<String>>(self, names: impl IntoIterator<Item = S>) -> Self {
        self.inherit_from(Inherit::ControlPlane, names)
    }

    fn inherit_from<S: Into<String>>(mut self, from: Inherit, names: impl IntoIterator<Item = S>) -> Self {
        self.inherit.extend(names.into_iter().map(|name| (name.into(), from)));
        self
    }

    /// Sets the working directory.
    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// Sets the worker-side time limit.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Sets the grace period between SIGTERM and SIGKILL.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = Some(grace);
        self
    }

    /// Gives the job the secret `secret` as the variable `variable`. Only the name is kept.
    pub fn secret(mut self, variable: impl Into<String>, secret: impl Into<String>) -> Self {
        self.secrets.insert(variable.into(), secret.into());
        self
    }

    /// The wire spec, with the secrets resolved now.
    pub(super) fn to_spec(
        &self,
        job_id: &str,
        source: &dyn SecretSource,
    ) -> Result<v1::JobSpec, SecretError> {
        let (command, interpreter, script) = match &self.program {
            Program::Command(command) => (command.clone(), Vec::new(), String::new()),
            Program::Script { interpreter, script } => (Vec::new(), interpreter.clone(), script.clone()),
        };
        let mut secrets = std::collections::HashMap::with_capacity(self.secrets.len());
        for (variable, name) in &self.secrets {
            // The wire carries secrets as strings; a binary secret is refused rather than mangled.
            let value = String::from_utf8(source.resolve(name)?)
                .map_err(|_| SecretError::NotUtf8 { name: name.clone() })?;
            secrets.insert(variable.clone(), value);
        }
        let mut env: std::collections::HashMap<String, String> =
            self.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut inherit_env = Vec::new();
        for (name, from) in &self.inherit {
            if env.contains_key(name) {
                continue;
            }
            match from {
                Inherit::Worker => inherit_env.push(name.clone()),
                Inherit::ControlPlane => {
                    if let Ok(value) = std::env::var(name) {
                        env.insert(name.clone(), value);
                    }
                }
            }
        }
        Ok(v1::JobSpec {
            job_id: job_id.to_owned(),
            command,
            script,
            interpreter,
            env,
            inherit_env,
            working_dir: self.working_dir.clone().unwrap_or_default(),
            secrets,
            timeout_ms: self.timeout.map_or(0, duration_ms),
            cancel_grace_ms: self.cancel_grace.map_or(0, duration_ms),
            resources: Some(v1::Resources {
                cpu_millis: self.resources.cpu_millis.unwrap_or(0),
                memory_bytes: self.resources.memory_bytes.unwrap_or(0),
            }),
            // Set by the dispatcher from the attempt's span, not journaled with the job.
            ..v1::JobSpec::default()
        })
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::MemorySecrets;

    #[test]
    fn secrets_resolve_at_dispatch_and_their_values_stay_out_of_debug_and_the_job() {
        let source = MemorySecrets::new().insert("token", "s3cr3t");
        assert!(!format!("{source:?}").contains("s3cr3t"));
        let job = Job::command("w", ["true"]).secret("TOKEN", "token");
        let spec = job.to_spec("s/0", &source).unwrap();
        assert_eq!(spec.secrets.get("TOKEN").map(String::as_str), Some("s3cr3t"));
        assert!(!format!("{job:?}").contains("s3cr3t"));
        let missing = Job::command("w", ["true"]).secret("X", "nope").to_spec("s/0", &source).unwrap_err();
        assert!(matches!(missing, SecretError::NotFound { name } if name == "nope"));
        let binary = MemorySecrets::new().insert("bin", vec![0xff, 0xfe]);
        let refused = Job::command("w", ["true"]).secret("B", "bin").to_spec("s/0", &binary).unwrap_err();
        assert!(matches!(refused, SecretError::NotUtf8 { .. }));
    }

    fn encoded(value: &impl Serialize) -> Vec<u8> {
        bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap()
    }

    fn decoded(bytes: &[u8]) -> Job {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard()).unwrap().0
    }

    #[test]
    fn a_job_without_inheritance_is_journaled_as_before() {
        let job = Job::pooled_script(["/bin/sh"], "make").env("PATH", "/bin").secret("T", "t").priority(3);
        // This job as the Job of before `inherit` journaled it (bincode, standard config):
        // Script, ["/bin/sh"], "make", {PATH: /bin}, three Nones, {T: t}, Pool with no labels
        // and no provider, no resources, priority 3 (zigzag 6).
        let before: &[u8] = &[
            1, 1, 7, 47, 98, 105, 110, 47, 115, 104, 4, 109, 97, 107, 101, 1, 4, 80, 65, 84, 72, 4, 47, 98,
            105, 110, 0, 0, 0, 1, 1, 84, 1, 116, 1, 0, 0, 0, 0, 6,
        ];
        assert_eq!(encoded(&job), before);
        // And a journal written before reads back as the same job.
        assert_eq!(decoded(before), job);
    }

    #[test]
    fn inherited_names_round_trip_through_the_journal() {
        let job = Job::command("w", ["env"])
            .env("LANG", "C")
            .inherit_env(["PATH", "HOME"])
            .inherit_env_from_control_plane(["CI"]);
        let back = decoded(&encoded(&job));
        assert_eq!(back, job);
        assert_eq!(back.env, BTreeMap::from([("LANG".to_owned(), "C".to_owned())]));
        assert_eq!(back.inherit["CI"], Inherit::ControlPlane);
    }

    #[test]
    fn the_control_plane_s_values_are_read_at_dispatch_and_the_job_s_own_win() {
        let path = std::env::var("PATH").expect("tests run with a PATH");
        let job = Job::command("w", ["env"])
            .inherit_env_from_control_plane(["PATH", "HODEI_TEST_SURELY_UNSET_VARIABLE"])
            .inherit_env(["HOME"])
            .env("HOME", "/job-home");
        let spec = job.to_spec("s/0", &MemorySecrets::new()).unwrap();
        assert_eq!(spec.env.get("PATH"), Some(&path));
        assert!(!spec.env.contains_key("HODEI_TEST_SURELY_UNSET_VARIABLE"));
        // HOME is the job's own: the worker is not asked for it.
        assert_eq!(spec.env.get("HOME").map(String::as_str), Some("/job-home"));
        assert!(spec.inherit_env.is_empty(), "{:?}", spec.inherit_env);
        let from_worker =
            Job::command("w", ["env"]).inherit_env(["PATH"]).to_spec("s/0", &MemorySecrets::new());
        assert_eq!(from_worker.unwrap().inherit_env, ["PATH"]);
    }
}
