//! The provider itself: the VMMs it spawned, and the [`Provider`] operations on microVMs.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Mutex;

use tokio::process::Child;

use super::FirecrackerConfig;
use super::errors::{api_error, infra, invalid};
use super::process;
use super::state_dir::{
    MAX_SOCKET_PATH, PID_FILE, SOCKET_FILE, WorkerRecord, create_private_dir, remove_dir_if_present,
    validate_worker_id, write_record,
};
use crate::provider::{Provider, ProviderError, WorkerInfo, WorkerSpec, WorkerState};

pub(super) const PROVIDER: &str = "firecracker";

/// Workers as Firecracker microVMs; see the [module docs](super).
#[derive(Debug)]
pub struct FirecrackerProvider {
    pub(super) config: FirecrackerConfig,
    /// The VMMs this process spawned, so that their exit codes are known and they are reaped.
    pub(super) children: Mutex<HashMap<String, Child>>,
}

impl FirecrackerProvider {
    /// A provider with `config`.
    pub fn new(config: FirecrackerConfig) -> Self {
        Self { config, children: Mutex::new(HashMap::new()) }
    }

    /// Its configuration.
    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    async fn provision_in(
        &self,
        spec: &WorkerSpec,
        dir: &Path,
        record: &WorkerRecord,
    ) -> Result<(), ProviderError> {
        let host = self.check_host(spec)?;
        write_record(dir, record)?;
        if record.tap_created {
            self.create_tap(&record.tap_name).await?;
        }
        let (mut child, guest) = match self.launch(record, &host, dir).await {
            Ok(launched) => launched,
            Err(e) => {
                // The TAP (and jail) may already exist.
                if let Err(cleanup) = self.tear_down(record, None).await {
                    tracing::warn!(worker_id = %spec.worker_id, %cleanup, "cleaning up a microVM that did not start");
                }
                return Err(e);
            }
        };
        let booted = match self.wait_for_api(&mut child, record).await {
            Ok(client) => self.configure_and_start(&client, spec, record, &guest).await.map_err(api_error),
            Err(e) => Err(e),
        };
        match booted {
            Ok(()) => {
                self.children.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.worker_id.clone(), child);
                Ok(())
            }
            Err(e) => {
                if let Err(cleanup) = self.tear_down(record, Some(child)).await {
                    tracing::warn!(worker_id = %spec.worker_id, %cleanup, "cleaning up a failed microVM");
                }
                Err(e)
            }
        }
    }
}

#[async_trait::async_trait]
impl Provider for FirecrackerProvider {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("os".to_owned(), "linux".to_owned()),
            ("isolation".to_owned(), "microvm".to_owned()),
        ])
    }

    async fn provision(&self, spec: &WorkerSpec) -> Result<WorkerInfo, ProviderError> {
        validate_worker_id(&spec.worker_id)?;
        let dir = self.worker_dir(&spec.worker_id);
        let (api_socket, api_sock_arg, jail_dir) = match &self.config.jailer {
            Some(jail) => {
                // The jailer's `--id` takes only letters, digits and hyphens.
                if !spec.worker_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    return Err(invalid(format!(
                        "worker id `{}` cannot be a jailer id (letters, digits and `-` only)",
                        spec.worker_id
                    )));
                }
                let exec_name = self.config.firecracker_binary.file_name().unwrap_or_default();
                let jail_dir = jail.chroot_base_dir.join(exec_name).join(&spec.worker_id);
                let socket = jail_dir.join("root/run").join(SOCKET_FILE);
                (socket, format!("/run/{SOCKET_FILE}"), Some(jail_dir))
            }
            None => {
                let socket = dir.join(SOCKET_FILE);
                let arg = socket.display().to_string();
                (socket, arg, None)
            }
        };
        if api_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(format!(
                "the API socket path {} is longer than a Unix socket allows ({MAX_SOCKET_PATH} bytes); \
                 choose a shorter state directory",
                api_socket.display()
            )));
        }
        let (tap_name, tap_created) = self.tap_for(spec)?;
        let record = WorkerRecord {
            worker_id: spec.worker_id.clone(),
            labels: spec.all_labels(),
            api_socket,
            api_sock_arg,
            tap_name,
            tap_created,
            jail_dir,
        };
        create_private_dir(&self.config.state_dir)?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(invalid(format!(
                    "worker `{}` already exists in {} (destroy it first)",
                    spec.worker_id,
                    self.config.state_dir.display()
                )));
            }
            Err(e) => return Err(infra(format!("cannot create {}: {e}", dir.display()))),
        }
        if let Err(e) = self.provision_in(spec, &dir, &record).await {
            // Tear-down already ran if a VMM was started; this covers failures before it.
            let _ = remove_dir_if_present(&dir);
            return Err(e);
        }
        let pid = process::read_pid_file(&dir.join(PID_FILE)).map(|p| p.to_string()).unwrap_or_default();
        Ok(WorkerInfo::new(&spec.worker_id, pid, record.labels, WorkerState::Running))
    }

    async fn state(&self, worker_id: &str) -> Result<WorkerState, ProviderError> {
        Ok(self.read_record(worker_id).map_or(WorkerState::Gone, |record| self.worker_state(&record)))
    }

    async fn output(&self, worker_id: &str) -> Result<String, ProviderError> {
        if self.read_record(worker_id).is_none() {
            return Err(ProviderError::NotFound {
                provider: PROVIDER.to_owned(),
                worker_id: worker_id.to_owned(),
            });
        }
        Ok(self.console_tail(worker_id))
    }

    async fn destroy(&self, worker_id: &str) -> Result<(), ProviderError> {
        let child = self.children.lock().unwrap_or_else(|p| p.into_inner()).remove(worker_id);
        match self.read_record(worker_id) {
            Some(record) => self.tear_down(&record, child).await,
            None => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<WorkerInfo>, ProviderError> {
        let entries = match std::fs::read_dir(&self.config.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(infra(format!("cannot read {}: {e}", self.config.state_dir.display()))),
        };
        let mut workers = Vec::new();
        for entry in entries.flatten() {
            let Some(record) = entry.file_name().to_str().and_then(|id| self.read_record(id)) else {
                continue;
            };
            if record.labels.get(crate::MANAGED_BY_LABEL).map(String::as_str) != Some(crate::MANAGED_BY_VALUE)
            {
                continue;
            }
            let pid = process::read_pid_file(&entry.path().join(PID_FILE))
                .map(|p| p.to_string())
                .unwrap_or_default();
            let state = self.worker_state(&record);
            workers.push(WorkerInfo::new(record.worker_id, pid, record.labels, state));
        }
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(workers)
    }
}
