//! Small files the control plane keeps in its data directory (the CA, revocations, API
//! tokens), written so that a crash leaves the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hodei_agent::pki::PkiError;

/// A file operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The operating system refused it.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A text file holds bytes that are not UTF-8: edited by hand, or damaged.
    #[error("{path} is not UTF-8 text")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
}

impl From<FileError> for PkiError {
    fn from(error: FileError) -> Self {
        match error {
            FileError::Io { action, path, source } => PkiError::Io { action, path, source },
            FileError::NotUtf8 { path } => {
                PkiError::CorruptFile { path, reason: "it is not UTF-8 text".into() }
            }
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError::Io { action, path, source }
}

/// Reads a file that may not exist yet.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, FileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", path)(e)),
    };
    String::from_utf8(bytes).map(Some).map_err(|_| FileError::NotUtf8 { path: path.to_owned() })
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error("create directory", dir))
}

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one,
/// never a torn one. `mode` is applied at creation, so a key is never readable by others, not even
/// for a moment.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // A temporary file left by a crash may have other permissions; create_new gets ours.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error("remove", &tmp)(e)),
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io_error("create", &tmp))?;
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(io_error("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_error("rename into place", path))?;
    if let Some(dir) = path.parent() {
        // The rename is durable only once the directory entry is.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("sync", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_and_set_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomically(&path, b"one", 0o600).unwrap();
        write_atomically(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(read_optional(&dir.path().join("absent")).unwrap(), None);
    }
}
