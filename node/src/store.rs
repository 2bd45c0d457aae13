//! The artifact store: blobs on local disk, addressed by the sha256 of their contents.
//!
//! A blob is written to a temporary file, synced, and renamed into place, so a reader sees
//! either nothing or the whole blob. Reads verify nothing; the replica verifies what it
//! loads.

use sha2::{Digest, Sha256};
use shoal_actors::{ArtifactFetcher, FetchError};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating) the store under `dir`.
    pub fn open(dir: &Path) -> std::io::Result<ArtifactStore> {
        let dir = dir.join("sha256");
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactStore { dir })
    }

    fn path_of(&self, digest: &str) -> Option<PathBuf> {
        let plain = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
        plain.then(|| self.dir.join(digest.to_ascii_lowercase()))
    }

    /// Stores `bytes` durably and returns their digest. Storing the same bytes twice is
    /// one blob.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let digest = hex::encode(Sha256::digest(bytes));
        let path = self.dir.join(&digest);
        if path.exists() {
            return Ok(digest);
        }
        let temporary = self
            .dir
            .join(format!(".{digest}.{}.partial", std::process::id()));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(digest)
    }
}

impl ArtifactFetcher for ArtifactStore {
    fn fetch(&self, digest: &str) -> Result<Vec<u8>, FetchError> {
        let path = self
            .path_of(digest)
            .ok_or_else(|| FetchError::NotFound(digest.into()))?;
        std::fs::read(&path).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => FetchError::NotFound(digest.into()),
            _ => FetchError::Io {
                digest: digest.into(),
                message: error.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_blob_is_fetched_by_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let digest = store.put(b"weights").unwrap();
        assert_eq!(digest, hex::encode(Sha256::digest(b"weights")));
        assert_eq!(store.fetch(&digest).unwrap(), b"weights");
        assert_eq!(store.put(b"weights").unwrap(), digest);
    }

    #[test]
    fn a_digest_that_is_not_hex_never_reaches_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.fetch("../../etc/passwd"),
            Err(FetchError::NotFound(_))
        ));
        assert!(matches!(
            store.fetch(&"0".repeat(64)),
            Err(FetchError::NotFound(_))
        ));
    }
}
