//! The artifact store: blobs on local disk, addressed by the sha256 of their contents.
//!
//! A blob is written to a temporary file, synced, and renamed into place, so a reader sees
//! either nothing or the whole blob. Reads verify nothing; the replica verifies what it
//! loads.

use sha2::{Digest, Sha256};
use shoal_actors::runtime::{CONFIG_FILE, WEIGHTS_FILE, memory_estimate_bytes, signature_of};
use shoal_actors::{ArtifactFetcher, FetchError};
use shoal_scheduler::{ArtifactFile, Command, Signature};
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

/// A version's identity: the sha256 of its files' names, digests and sizes, in name order.
pub fn manifest_digest(files: &[ArtifactFile]) -> String {
    let mut sorted: Vec<&ArtifactFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hasher = Sha256::new();
    for file in sorted {
        hasher.update(format!(
            "{}\t{}\t{}\n",
            file.name, file.digest, file.size_bytes
        ));
    }
    hex::encode(hasher.finalize())
}

/// The command that registers a version of `model` made of stored blobs `(name, digest)`.
/// Reads each blob (blocking) for its size and, from `config.json`, the signature.
pub fn version_command(
    store: &ArtifactStore,
    model: &str,
    files: Vec<(String, String)>,
    format: &str,
) -> Result<Command, String> {
    let mut artifacts: Vec<ArtifactFile> = Vec::with_capacity(files.len());
    let mut signature = Signature::default();
    let mut weights_bytes = None;
    for (name, digest) in files {
        if name.is_empty() || name.contains('/') || artifacts.iter().any(|f| f.name == name) {
            return Err(format!(
                "file name {name:?} is empty, has a '/', or repeats"
            ));
        }
        let bytes = store
            .fetch(&digest)
            .map_err(|error| format!("file {name}: {error}; upload it to this server first"))?;
        if name == CONFIG_FILE {
            signature = signature_of(&bytes).map_err(|error| format!("{CONFIG_FILE}: {error}"))?;
        }
        if name == WEIGHTS_FILE {
            weights_bytes = Some(bytes.len() as u64);
        }
        artifacts.push(ArtifactFile {
            name,
            digest,
            size_bytes: bytes.len() as u64,
        });
    }
    let total_bytes = artifacts.iter().map(|file| file.size_bytes).sum();
    Ok(Command::RegisterModelVersion {
        model: model.to_string(),
        manifest_digest: manifest_digest(&artifacts),
        files: artifacts,
        format: format.to_string(),
        memory_bytes: memory_estimate_bytes(weights_bytes.unwrap_or(total_bytes)),
        signature,
        created_at_ms: now_ms(),
    })
}

/// Milliseconds since the Unix epoch, for `created_at_ms` fields.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
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
    fn a_version_of_stored_blobs_names_each_file_and_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let digest = store.put(b"0123456789").unwrap();
        let command = version_command(
            &store,
            "m",
            vec![("data.bin".into(), digest.clone())],
            "raw",
        )
        .unwrap();
        let Command::RegisterModelVersion {
            files,
            manifest_digest,
            ..
        } = command
        else {
            panic!("a registration");
        };
        assert_eq!(
            files,
            vec![ArtifactFile {
                name: "data.bin".into(),
                digest,
                size_bytes: 10
            }]
        );
        assert_eq!(manifest_digest.len(), 64);
        let missing = version_command(&store, "m", vec![("x".into(), "0".repeat(64))], "raw");
        assert!(missing.unwrap_err().contains("upload it"));
        let bad_config = store.put(b"{}").unwrap();
        assert!(
            version_command(&store, "m", vec![("config.json".into(), bad_config)], "raw").is_err()
        );
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
