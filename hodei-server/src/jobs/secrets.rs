//! Where secret values come from at dispatch time: memory, the environment, or files.

use std::collections::BTreeMap;
use std::fmt;

/// Why a secret could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The source has no secret by this name.
    #[error("secret `{name}` is not known")]
    NotFound {
        /// The secret's name.
        name: String,
    },
    /// The name cannot name a secret of this source (e.g. a path for [`FileSecrets`]).
    #[error("`{name}` is not a valid secret name")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// The secret exists but could not be read.
    #[error("secret `{name}` could not be read: {reason}")]
    Unreadable {
        /// The secret's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The secret is not UTF-8, and the wire carries secrets as strings.
    #[error("secret `{name}` is not UTF-8")]
    NotUtf8 {
        /// The secret's name.
        name: String,
    },
}

/// Resolves secret names to values at dispatch time.
pub trait SecretSource: Send + Sync {
    /// The value of the secret `name`.
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError>;
}

/// Secrets held in memory (tests, or values loaded at start-up).
#[derive(Clone, Default)]
pub struct MemorySecrets {
    values: BTreeMap<String, Vec<u8>>,
}

impl MemorySecrets {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the secret `name`.
    pub fn insert(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.values.insert(name.into(), value.into());
        self
    }
}

// By hand, so that a debug print lists the names and never the values.
impl fmt::Debug for MemorySecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySecrets").field("names", &self.values.keys().collect::<Vec<_>>()).finish()
    }
}

impl SecretSource for MemorySecrets {
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError> {
        self.values.get(name).cloned().ok_or_else(|| SecretError::NotFound { name: name.to_owned() })
    }
}

/// Secrets read from the control plane's environment: the secret `name` is the variable
/// `prefix` + `name`, read when the job is dispatched.
#[derive(Clone, Debug, Default)]
pub struct EnvSecrets {
    prefix: String,
}

impl EnvSecrets {
    /// Secrets from the variables whose names start with `prefix` (may be empty).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }
}

impl SecretSource for EnvSecrets {
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError> {
        use std::os::unix::ffi::OsStringExt;
        std::env::var_os(format!("{}{name}", self.prefix))
            .map(OsStringExt::into_vec)
            .ok_or_else(|| SecretError::NotFound { name: name.to_owned() })
    }
}

/// Secrets read from files in a directory (a mounted Kubernetes or Docker secret, say): the
/// secret `name` is the file `<dir>/<name>`, read when the job is dispatched. A name that is not
/// a plain file name (empty, `.`, `..`, or with a `/`) is refused, so no name reaches outside
/// the directory.
#[derive(Clone, Debug)]
pub struct FileSecrets {
    dir: std::path::PathBuf,
}

impl FileSecrets {
    /// Secrets from the files in `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

impl SecretSource for FileSecrets {
    fn resolve(&self, name: &str) -> Result<Vec<u8>, SecretError> {
        let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
        if !plain {
            return Err(SecretError::InvalidName { name: name.to_owned() });
        }
        match std::fs::read(self.dir.join(name)) {
            Ok(value) => Ok(value),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SecretError::NotFound { name: name.to_owned() })
            }
            Err(e) => Err(SecretError::Unreadable { name: name.to_owned(), reason: e.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_secrets_read_files_by_plain_name_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("registry"), b"tok3n").unwrap();
        let source = FileSecrets::new(dir.path());
        assert_eq!(source.resolve("registry").unwrap(), b"tok3n");
        assert!(matches!(source.resolve("missing"), Err(SecretError::NotFound { .. })));
        for name in ["", ".", "..", "../etc/passwd", "a/b"] {
            assert!(matches!(source.resolve(name), Err(SecretError::InvalidName { .. })), "{name:?}");
        }
    }
}
