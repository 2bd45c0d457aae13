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
}

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
}
