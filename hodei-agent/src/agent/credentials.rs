//! The agent's key and certificate: reused from the work directory when still valid, else
//! obtained by registering, and stored there.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::SystemTime;

use super::backoff::Backoff;
use super::error::AgentError;
use super::settings::{Settings, TOKEN, TOKEN_FILE};
use super::status::say;
use crate::connect::{self, ConnectError};
use crate::pki::{AgentKey, TlsIdentity, WorkerCertificate};

/// A new registration's key and certificate being stored, in the background.
pub(super) type Storing = tokio::task::JoinHandle<Result<(), AgentError>>;

/// The stored identity if it is valid for this worker, else a new one from registration, which
/// is retried with backoff while the hub cannot be reached. A new one comes with its storing
/// under way: the caller opens its session meanwhile, and uses neither before it is done.
pub(super) async fn credentials(
    settings: &Settings,
    backoff: &mut Backoff,
) -> Result<(TlsIdentity, WorkerCertificate, Option<Storing>), AgentError> {
    match stored(settings) {
        Ok(Some((identity, certificate))) => {
            say(
                settings.status_to_stderr,
                format_args!("reusing the stored certificate in {}", settings.work_dir.display()),
            );
            return Ok((identity, certificate, None));
        }
        Ok(None) => {}
        Err(reason) => {
            say(settings.status_to_stderr, format_args!("not reusing the stored certificate: {reason}"))
        }
    }
    let token = settings.token.as_deref().ok_or_else(|| {
        TOKEN.error(format!(
            "no valid certificate is stored in {}, so a registration token is needed (or {})",
            settings.work_dir.display(),
            TOKEN_FILE.env
        ))
    })?;
    // Control planes sharing a database redeem each other's tokens: one out of reach sends
    // the agent on to the next.
    let mut next = 0;
    loop {
        let address = settings.registration_addrs[next % settings.registration_addrs.len()];
        next += 1;
        say(
            settings.status_to_stderr,
            format_args!("registering as {} with the control plane at {address}", settings.worker_id),
        );
        match connect::register(address, &settings.ca_bundle_pem, &settings.worker_id, token).await {
            Ok((key, certificate)) => {
                let identity = key.identity(&certificate)?;
                let storing = {
                    let (settings, certificate) = (settings.clone(), certificate.clone());
                    tokio::task::spawn_blocking(move || {
                        store(&settings, &key, &certificate)?;
                        say(
                            settings.status_to_stderr,
                            format_args!("registered; certificate stored in {}", settings.work_dir.display()),
                        );
                        Ok(())
                    })
                };
                return Ok((identity, certificate, Some(storing)));
            }
            // The hub is not reachable (yet): worth another try. Anything it answered is final.
            Err(e @ ConnectError::Transport { .. }) => {
                let delay = backoff.next();
                say(
                    settings.status_to_stderr,
                    format_args!("registration failed: {e}; retrying in {delay:?}"),
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(AgentError::Registration(e)),
        }
    }
}

/// The stored key and certificate, if both exist, are for this worker and are still valid.
fn stored(settings: &Settings) -> Result<Option<(TlsIdentity, WorkerCertificate)>, String> {
    let read = |path: &Path| match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    };
    let (Some(key_pem), Some(cert_pem)) = (read(&settings.key_path())?, read(&settings.cert_path())?) else {
        return Ok(None);
    };
    let certificate = WorkerCertificate::from_pem(&cert_pem).map_err(|e| e.to_string())?;
    if certificate.worker_id != settings.worker_id {
        return Err(format!("it is for worker `{}`", certificate.worker_id));
    }
    if certificate.not_after <= SystemTime::now() {
        return Err("it has expired".to_owned());
    }
    let key = AgentKey::from_pem(&key_pem).map_err(|e| e.to_string())?;
    let identity = key.identity(&certificate).map_err(|e| e.to_string())?;
    Ok(Some((identity, certificate)))
}

/// Stores the key and certificate, each 0600, each written whole and then renamed into place so
/// that a crash never leaves half a file, and the directory synced after the renames: a
/// registration token is good once, so credentials lost to a crash after registering could not
/// be had again.
pub(super) fn store(
    settings: &Settings,
    key: &AgentKey,
    certificate: &WorkerCertificate,
) -> Result<(), AgentError> {
    let dir = &settings.work_dir;
    let dir_error = |action| move |source| AgentError::WorkDir { action, path: dir.clone(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(dir_error("creating"))?;
    let (key_path, cert_path) = (settings.key_path(), settings.cert_path());
    let key_pem = key.private_key_pem();
    let files =
        [(key_path.as_path(), key_pem.as_str()), (cert_path.as_path(), certificate.cert_pem.as_str())];
    for (path, contents) in files {
        write_partial(path, contents)?;
    }
    for (path, _) in files {
        fs::rename(partial_of(path), path).map_err(|source| AgentError::WorkDir {
            action: "renaming into place",
            path: path.to_owned(),
            source,
        })?;
    }
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(dir_error("syncing"))
}

fn partial_of(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes and syncs `path`'s partial file, to be renamed into place.
fn write_partial(path: &Path, contents: &str) -> Result<(), AgentError> {
    let partial = partial_of(path);
    let error = |action| move |source| AgentError::WorkDir { action, path: path.to_owned(), source };
    // A leftover from a crash may have other permissions; start afresh.
    match fs::remove_file(&partial) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(error("removing a leftover of")(e)),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(error("creating"))?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(error("writing"))
}
