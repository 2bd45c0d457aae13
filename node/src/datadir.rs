//! The data directory: its layout, and the lock that keeps a second process out of it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// An exclusively locked data directory. The lock is held until this is dropped (or the
/// process dies: the kernel releases it then).
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    /// Held, never read: the lock lives as long as this file stays open.
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data dir {dir} is in use by another shoal process{pid}; stop it or pick another --data-dir"
    )]
    InUse { dir: PathBuf, pid: String },
    #[error(
        "data dir {dir} holds cluster state in format {found}, and this build reads format \
         {expected}: run the build that wrote it, or move the data dir aside to start afresh"
    )]
    StateFormat {
        dir: PathBuf,
        found: String,
        expected: u32,
    },
    #[error("data dir {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DataDir {
    /// Creates `root` if needed and locks it.
    pub fn lock(root: &Path) -> Result<DataDir, DataDirError> {
        let io = |source| DataDirError::Io {
            dir: root.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(root).map_err(io)?;
        let mut lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join("LOCK"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                let pid = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                };
                return Err(DataDirError::InUse {
                    dir: root.to_path_buf(),
                    pid,
                });
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(io(error)),
        }
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        write!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(DataDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// The raft log.
    pub fn raft(&self) -> PathBuf {
        self.root.join("raft")
    }

    /// The artifact store.
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Scratch space, e.g. for training the demo model.
    pub fn scratch(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Refuses a data dir whose cluster state is in another format than `expected`,
    /// before anything reads it. A dir that names no format (a new one, or one from
    /// before formats were named) passes; [`DataDir::mark_state_format`] names it once its
    /// state has been read.
    pub fn check_state_format(&self, expected: u32) -> Result<(), DataDirError> {
        match std::fs::read_to_string(self.root.join(STATE_FORMAT_FILE)) {
            Ok(found) if found.trim() == expected.to_string() => Ok(()),
            Ok(found) => Err(DataDirError::StateFormat {
                dir: self.root.clone(),
                found: found.trim().to_string(),
                expected,
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DataDirError::Io {
                dir: self.root.clone(),
                source,
            }),
        }
    }

    /// Names `format` as the format of the cluster state this dir holds, if it names
    /// none yet: called once the state was read in this format, so a dir whose state
    /// did not read is never named as if it had.
    pub fn mark_state_format(&self, format: u32) -> Result<(), DataDirError> {
        let path = self.root.join(STATE_FORMAT_FILE);
        if path.exists() {
            return Ok(());
        }
        let io = |source| DataDirError::Io {
            dir: self.root.clone(),
            source,
        };
        let temporary = self.root.join(format!("{STATE_FORMAT_FILE}.partial"));
        std::fs::write(&temporary, format!("{format}\n")).map_err(io)?;
        File::open(&temporary)
            .and_then(|file| file.sync_all())
            .map_err(io)?;
        std::fs::rename(&temporary, &path).map_err(io)?;
        File::open(&self.root)
            .and_then(|dir| dir.sync_all())
            .map_err(io)
    }
}

/// The file naming the format of the cluster state a data dir holds.
const STATE_FORMAT_FILE: &str = "STATE_FORMAT";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_data_dir_refuses_a_second_holder_and_names_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::lock(dir.path()).unwrap();
        let second = DataDir::lock(dir.path()).unwrap_err();
        let message = second.to_string();
        assert!(
            message.contains("in use by another shoal process"),
            "{message}"
        );
        assert!(
            message.contains(&std::process::id().to_string()),
            "{message}"
        );
        drop(first);
        DataDir::lock(dir.path()).unwrap();
    }

    #[test]
    fn a_data_dir_named_with_another_state_format_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::lock(dir.path()).unwrap();
        data_dir.check_state_format(3).unwrap();
        data_dir.check_state_format(4).unwrap();
        data_dir.mark_state_format(3).unwrap();
        data_dir.mark_state_format(4).unwrap();
        data_dir.check_state_format(3).unwrap();
        let message = data_dir.check_state_format(4).unwrap_err().to_string();
        assert!(
            message.contains("in format 3, and this build reads format 4"),
            "{message}"
        );
        assert!(message.contains("move the data dir aside"), "{message}");
    }
}
