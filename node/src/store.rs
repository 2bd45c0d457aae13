//! The artifact store: blobs on local disk, addressed by the sha256 of their contents.
//!
//! A blob is written to a temporary file, synced, and renamed into place, so a reader sees
//! either nothing or the whole blob. Reads verify nothing; the replica verifies what it
//! loads.

use crate::control::ControlPlane;
use sha2::{Digest, Sha256};
use shoal_actors::runtime::{
    Architecture, CONFIG_FILE, GGUF_WEIGHTS_FILE, WEIGHTS_FILE, WeightsFile, memory_estimate_bytes,
    safetensors_loaded_bytes, signature_of,
};
use shoal_actors::{ArtifactFetcher, FetchError};
use shoal_scheduler::{ArtifactFile, ClusterState, Command, Signature};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

#[derive(Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
    /// Held while a blob is renamed into place, touched, or checked and removed by a
    /// sweep, so a sweep never removes a copy written, or a blob registered, after it
    /// looked at the file's age.
    placing: Arc<Mutex<()>>,
}

/// Takes `placing` even if a holder panicked: it guards no data.
fn placed(placing: &Mutex<()>) -> MutexGuard<'_, ()> {
    placing.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ArtifactStore {
    /// Opens (creating) the store under `dir`.
    pub fn open(dir: &Path) -> std::io::Result<ArtifactStore> {
        let dir = dir.join("sha256");
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactStore {
            dir,
            placing: Arc::default(),
        })
    }

    fn path_of(&self, digest: &str) -> Option<PathBuf> {
        let plain = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
        plain.then(|| self.dir.join(digest.to_ascii_lowercase()))
    }

    /// Stores `bytes` durably and returns their digest. Storing the same bytes twice is
    /// one blob.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let digest = hex::encode(Sha256::digest(bytes));
        if self.touch(&digest) {
            return Ok(digest);
        }
        let path = self.dir.join(&digest);
        // A name of its own: two replicas of one version starting together put the same
        // blob at once, and a shared name let one truncate the file the other was about
        // to rename (or rename it away from under the other).
        let temporary = self.temporary_path(&digest);
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            {
                let _placed = placed(&self.placing);
                std::fs::rename(&temporary, &path)?;
            }
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.map(|()| digest)
    }

    /// A temporary file's path for a blob on its way in, unique to this write: renamed
    /// into place over an identical blob, concurrent writes of one blob each succeed.
    fn temporary_path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!(
            ".{digest}.{}.{}.partial",
            std::process::id(),
            TEMPORARY_SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ))
    }
}

/// How long a blob that no version lists is kept: a push uploads its files, then
/// registers them, and must not lose them in between. Past this, such a blob is left over
/// from a push that was refused or given up, and only takes disk.
pub const UNLISTED_BLOB_GRACE: Duration = Duration::from_secs(60 * 60);

/// How often a server looks for blobs to remove, and an agent for blobs to drop from its
/// cache.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// What one sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub blobs: usize,
    pub bytes: u64,
}

impl ArtifactStore {
    /// Removes the blobs whose digests `listed` lacks, and temporary files of writes that
    /// never finished, last written before `written_before`. Blocking.
    pub fn sweep(
        &self,
        listed: &HashSet<&str>,
        written_before: SystemTime,
    ) -> std::io::Result<Swept> {
        let mut swept = Swept::default();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let partial = name.starts_with('.') && name.ends_with(".partial");
            if !partial && (self.path_of(name).is_none() || listed.contains(name)) {
                continue;
            }
            // Its age looked at again with `placing` held: a copy renamed into place or a
            // registration's touch since the listing makes it young.
            let _placed = placed(&self.placing);
            let removed = std::fs::metadata(entry.path())
                .and_then(|metadata| {
                    if metadata.modified()? >= written_before {
                        return Ok(None);
                    }
                    std::fs::remove_file(entry.path()).map(|()| Some(metadata.len()))
                })
                .unwrap_or_else(|error| {
                    // Gone meanwhile, or not removable: the rest of the store is still swept.
                    if error.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(file = name, %error, "a blob could not be swept");
                    }
                    None
                });
            if let Some(bytes) = removed {
                swept.blobs += usize::from(!partial);
                swept.bytes += bytes;
            }
        }
        Ok(swept)
    }
}

/// Every blob digest a version of a model lists.
pub fn listed_digests(state: &ClusterState) -> HashSet<&str> {
    state
        .models
        .values()
        .flat_map(|model| model.versions.values())
        .flat_map(|version| &version.files)
        .map(|file| file.digest.as_str())
        .collect()
}

/// Every [`SWEEP_INTERVAL`], removes from this server's store the blobs no version lists
/// that are older than [`UNLISTED_BLOB_GRACE`], until `shutdown` fires. It sweeps only
/// with a state read through the leader (raft read index), so a server behind the log
/// does not take a blob a committed version lists; one registered after that read touched
/// its blobs first (see [`ArtifactStore::sweep`]).
pub async fn run_sweeper(
    store: Arc<ArtifactStore>,
    control: ControlPlane,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        // A read through the leader waits for one; a stop does not wait for it.
        let state = tokio::select! {
            _ = shutdown.changed() => break,
            state = control.linearizable_state() => state,
        };
        let state = match state {
            Ok(state) => state,
            Err(error) => {
                tracing::debug!(%error, "no sweep: the state could not be read through the leader");
                continue;
            }
        };
        let listed = listed_digests(&state)
            .into_iter()
            .map(String::from)
            .collect();
        sweep_in_background(&store, listed, UNLISTED_BLOB_GRACE).await;
    }
}

/// Sweeps `store` of the blobs `listed` lacks that were last written over `grace` ago, on
/// a blocking thread, and counts and logs what went.
pub async fn sweep_in_background(
    store: &Arc<ArtifactStore>,
    listed: HashSet<String>,
    grace: Duration,
) {
    let store = store.clone();
    let swept = tokio::task::spawn_blocking(move || {
        let listed: HashSet<&str> = listed.iter().map(String::as_str).collect();
        store.sweep(&listed, SystemTime::now() - grace)
    })
    .await;
    match swept {
        Ok(Ok(swept)) if swept.blobs > 0 || swept.bytes > 0 => {
            shoal_ops::metrics::metrics()
                .artifact_swept_bytes_total
                .inc_by(swept.bytes);
            tracing::info!(
                blobs = swept.blobs,
                bytes = swept.bytes,
                "unlisted blobs removed"
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "sweeping the artifact store failed"),
        Err(error) => tracing::warn!(%error, "the artifact store sweep panicked"),
    }
}

/// Why a streamed blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0:?} is not a sha256 digest (64 hex characters)")]
    BadDigest(String),
    #[error("the content hashes to {actual}, not {expected}; nothing was stored")]
    Mismatch { expected: String, actual: String },
    #[error("the upload broke off after {received_bytes} bytes: {message}; nothing was stored")]
    Interrupted {
        received_bytes: u64,
        message: String,
    },
    #[error("over the limit of {limit_bytes} bytes")]
    TooLarge { limit_bytes: u64 },
    #[error("writing the blob: {0}")]
    Io(#[from] std::io::Error),
}

impl ArtifactStore {
    /// Whether the blob is here; if so, marks it written now, so a sweep keeps it for
    /// another [`UNLISTED_BLOB_GRACE`]: a registration touches the blobs it is about to
    /// list. Blocking.
    pub fn touch(&self, digest: &str) -> bool {
        let Some(path) = self.path_of(digest) else {
            return false;
        };
        let _placed = placed(&self.placing);
        match std::fs::File::open(&path) {
            // A blob whose time cannot be set is still here; at worst a sweep takes it
            // and its registration fetches it again from a peer.
            Ok(file) => {
                let _ = file.set_modified(SystemTime::now());
                true
            }
            Err(_) => false,
        }
    }

    /// Streams a blob that should hash to `expected` into the store: written to a
    /// temporary file while hashing, synced, and renamed into place only if the digest
    /// matches. A broken or wrong upload leaves nothing behind. Returns the size.
    pub async fn receive<S, E>(
        &self,
        expected: &str,
        mut chunks: S,
        limit_bytes: u64,
    ) -> Result<u64, ReceiveError>
    where
        S: futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let path = self
            .path_of(expected)
            .ok_or_else(|| ReceiveError::BadDigest(expected.to_string()))?;
        let temporary = self.temporary_path(expected);
        let mut file = tokio::fs::File::create(&temporary).await?;
        let mut hasher = Sha256::new();
        let mut received_bytes = 0u64;
        let outcome: Result<(), ReceiveError> = async {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|error| ReceiveError::Interrupted {
                    received_bytes,
                    message: error.to_string(),
                })?;
                received_bytes += chunk.len() as u64;
                if received_bytes > limit_bytes {
                    return Err(ReceiveError::TooLarge { limit_bytes });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await?;
            }
            let actual = hex::encode(hasher.finalize_reset());
            if actual != expected.to_ascii_lowercase() {
                return Err(ReceiveError::Mismatch {
                    expected: expected.to_string(),
                    actual,
                });
            }
            file.sync_all().await?;
            let (placing, from, to) = (self.placing.clone(), temporary.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                let _placed = placed(&placing);
                std::fs::rename(from, to)
            })
            .await
            .map_err(std::io::Error::other)??;
            tokio::fs::File::open(&self.dir).await?.sync_all().await?;
            Ok(())
        }
        .await;
        if outcome.is_err() {
            let _ = tokio::fs::remove_file(&temporary).await;
        }
        outcome.map(|()| received_bytes)
    }
}

/// Makes temporary names unique when two writes of one blob overlap.
static TEMPORARY_SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// File name endings a model version may contain: data formats only, never code.
const ALLOWED_EXTENSIONS: &[&str] = &["safetensors", "gguf", "json", "txt", "model"];

/// Checks a version's file name: plain (no path, not hidden) and ending in a data format.
/// Returns the extension.
pub fn check_name(name: &str) -> Result<&str, String> {
    let plain =
        !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\']) && name != "..";
    if !plain {
        return Err(format!(
            "file name {name:?} must be a plain name inside the model"
        ));
    }
    let extension = name
        .rsplit_once('.')
        .map(|(_, extension)| extension)
        .unwrap_or("");
    if !ALLOWED_EXTENSIONS.contains(&extension) {
        return Err(format!(
            "{name}: only data formats are accepted ({})",
            ALLOWED_EXTENSIONS.join(", ")
        ));
    }
    Ok(extension)
}

/// Checks that a version's file is a data format Shoal loads and looks like one: a
/// safetensors header that is JSON, a GGUF magic, JSON that parses. Pickles, scripts and
/// anything else are refused.
pub fn validate_artifact(name: &str, bytes: &[u8]) -> Result<(), String> {
    let extension = check_name(name)?;
    match extension {
        "safetensors" => {
            safetensors_loaded_bytes(bytes).map_err(|reason| format!("{name}: {reason}"))?;
        }
        "gguf" if !bytes.starts_with(b"GGUF") => {
            return Err(format!("{name}: no GGUF magic"));
        }
        "json" => {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .map_err(|error| format!("{name}: not JSON: {error}"))?;
        }
        _ => {}
    }
    Ok(())
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

/// The weight formats a version may declare: those whose files Shoal accepts and loads
/// (see [`ALLOWED_EXTENSIONS`]), and `raw`, a version of plain data files with no
/// weights, as the end-to-end tests and the chaos workload register. Anything else
/// (`pickle`) would only be shown back as the platform `shoal_pickle`.
pub const WEIGHT_FORMATS: &[&str] = &["safetensors", "gguf", "raw"];

/// Refuses a weight format Shoal does not know, naming those it does.
pub fn check_format(format: &str) -> Result<(), String> {
    if WEIGHT_FORMATS.contains(&format) {
        return Ok(());
    }
    Err(format!(
        "format {format:?} is not one Shoal loads; use one of {}",
        WEIGHT_FORMATS.join(", ")
    ))
}

/// The command that registers a version of `model` made of stored blobs `(name, digest)`,
/// listed by name whatever their order here. Reads each blob (blocking) for its size and,
/// from `config.json`, the signature.
///
/// A version in a weight format must be one a runtime can load, as far as its files tell
/// without loading it: `config.json` naming an architecture Shoal runs, the files that
/// architecture needs, and one weights file, of the declared format, whose header reads.
/// Refused here, a bad push is a clear error at once rather than a replica failing later.
/// (Whether the weights fit the config is known only by loading them.)
pub fn version_command(
    store: &ArtifactStore,
    model: &str,
    files: Vec<(String, String)>,
    format: &str,
) -> Result<Command, String> {
    check_format(format)?;
    let mut artifacts: Vec<ArtifactFile> = Vec::with_capacity(files.len());
    let mut signature = Signature::default();
    let mut config_json = None;
    let mut weights = None;
    for (name, digest) in files {
        if name.is_empty() || name.contains('/') || artifacts.iter().any(|f| f.name == name) {
            return Err(format!(
                "file name {name:?} is empty, has a '/', or repeats"
            ));
        }
        let bytes = store
            .fetch(&digest)
            .map_err(|error| format!("file {name}: {error}; upload it first"))?;
        validate_artifact(&name, &bytes)?;
        let is_config = name == CONFIG_FILE;
        if is_config {
            signature = signature_of(&bytes).map_err(|error| format!("{CONFIG_FILE}: {error}"))?;
        }
        artifacts.push(ArtifactFile {
            name: name.clone(),
            digest,
            size_bytes: bytes.len() as u64,
        });
        if is_config {
            config_json = Some(bytes);
        } else if weights_file_of(format) == Some(name.as_str()) {
            // Only the file the format names is read as weights; another is refused below.
            weights = Some((name, bytes));
        }
    }
    let names: Vec<&str> = artifacts.iter().map(|file| file.name.as_str()).collect();
    let architecture = check_loadable(format, &names, config_json.as_deref())?;
    // Sized as the architecture's runtime loads them (quantized matrices kept or not).
    let weights_loaded_bytes = match (&weights, architecture) {
        (Some((name, bytes)), Some(architecture)) => {
            let file = WeightsFile::named(name, bytes).ok_or("a weights file's name")?;
            Some(
                file.loaded_bytes(architecture)
                    .map_err(|error| error.to_string())?,
            )
        }
        _ => None,
    };
    // One canonical order, by name, as the manifest digest hashes them: the same files are
    // the same version (the log compares file lists, and a push lists a directory in
    // whatever order it reads) however a caller listed them.
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    let total_bytes = artifacts.iter().map(|file| file.size_bytes).sum();
    Ok(Command::RegisterModelVersion {
        model: model.to_string(),
        manifest_digest: manifest_digest(&artifacts),
        files: artifacts,
        format: format.to_string(),
        memory_bytes: memory_estimate_bytes(weights_loaded_bytes.unwrap_or(total_bytes)),
        signature,
        created_at_ms: now_ms(),
    })
}

/// The weights file a version in `format` keeps its weights in; `None` for `raw`.
fn weights_file_of(format: &str) -> Option<&'static str> {
    match format {
        "safetensors" => Some(WEIGHTS_FILE),
        "gguf" => Some(GGUF_WEIGHTS_FILE),
        _ => None,
    }
}

/// Refuses a version in weight `format` made of the files `names` that no runtime could
/// load (see [`version_command`]), saying what is missing; else the architecture that
/// loads it (`None` for `raw`). `config_json` is the contents of its `config.json`, if it
/// has one. The CLI asks too, before it uploads anything.
pub fn check_loadable(
    format: &str,
    names: &[&str],
    config_json: Option<&[u8]>,
) -> Result<Option<Architecture>, String> {
    if format == "raw" {
        return Ok(None);
    }
    let config_json = config_json.ok_or_else(|| {
        format!("a {format} version needs a {CONFIG_FILE} that names its architecture")
    })?;
    let architecture =
        Architecture::of(config_json).map_err(|error| format!("{CONFIG_FILE}: {error}"))?;
    let expected = weights_file_of(format).unwrap_or(WEIGHTS_FILE);
    let weights: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| [WEIGHTS_FILE, GGUF_WEIGHTS_FILE].contains(name))
        .collect();
    if weights != [expected] {
        let found = if weights.is_empty() {
            "none".to_string()
        } else {
            weights.join(" and ")
        };
        return Err(format!(
            "a {format} version keeps its weights in {expected} alone; found {found}"
        ));
    }
    let missing: Vec<&str> = architecture
        .files()
        .iter()
        .copied()
        .filter(|needed| !names.contains(needed))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "this model's architecture also needs {}",
            missing.join(" and ")
        ));
    }
    Ok(Some(architecture))
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
    use shoal_actors::fixtures::{GgufStorage, TinyLlama, as_gguf, mlp_classifier, tiny_llama};
    use shoal_actors::runtime::{ModelFiles, TOKENIZER_FILE};

    #[test]
    fn a_stored_blob_is_fetched_by_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let digest = store.put(b"weights").unwrap();
        assert_eq!(digest, hex::encode(Sha256::digest(b"weights")));
        assert_eq!(store.fetch(&digest).unwrap(), b"weights");
        assert_eq!(store.put(b"weights").unwrap(), digest);
    }

    /// Regression: two replicas of one version starting together on one agent fetched a
    /// blob at once; both wrote `.{digest}.{pid}.partial`, and one put failed ("a server
    /// served a blob that does not match its digest").
    #[test]
    fn one_blob_put_from_many_threads_at_once_is_stored_whole_for_each() {
        const WRITERS: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = hex::encode(Sha256::digest(&bytes));
        let start = std::sync::Barrier::new(WRITERS);
        let digests: Vec<String> = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..WRITERS)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        store.put(&bytes)
                    })
                })
                .collect();
            writers
                .into_iter()
                .map(|writer| writer.join().unwrap().unwrap())
                .collect()
        });
        assert!(digests.iter().all(|digest| *digest == expected));
        assert!(store.fetch(&expected).unwrap() == bytes, "stored whole");
        let left: Vec<_> = std::fs::read_dir(&store.dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from(&expected)],
            "no temporary left"
        );
    }

    #[test]
    fn a_version_of_stored_blobs_names_each_file_and_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let digest = store.put(b"0123456789").unwrap();
        let command = version_command(
            &store,
            "m",
            vec![("data.txt".into(), digest.clone())],
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
                name: "data.txt".into(),
                digest,
                size_bytes: 10
            }]
        );
        assert_eq!(manifest_digest.len(), 64);
        let missing = version_command(&store, "m", vec![("x".into(), "0".repeat(64))], "raw");
        assert!(missing.unwrap_err().contains("upload it"));
        let script = store.put(b"import os").unwrap();
        assert!(version_command(&store, "m", vec![("model.py".into(), script)], "raw").is_err());
        let bad_config = store.put(b"{}").unwrap();
        assert!(
            version_command(&store, "m", vec![("config.json".into(), bad_config)], "raw").is_err()
        );
    }

    /// Regression: `"format": "pickle"` was registered, and metadata then named the
    /// platform "shoal_pickle".
    #[test]
    fn only_weight_formats_shoal_loads_are_registered() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let digest = store.put(b"0123456789").unwrap();
        let files = || vec![("data.txt".to_string(), digest.clone())];
        for format in ["pickle", "", "SAFETENSORS", "pt"] {
            let refused = version_command(&store, "m", files(), format).unwrap_err();
            assert_eq!(
                refused,
                format!(
                    "format {format:?} is not one Shoal loads; use one of safetensors, gguf, raw"
                )
            );
        }
        let mlp = mlp_classifier(&[8, 4], 1).unwrap();
        for format in WEIGHT_FORMATS {
            let files = match *format {
                "safetensors" => stored(&store, &mlp),
                "gguf" => stored(&store, &as_gguf(&mlp, GgufStorage::F32).unwrap()),
                _ => files(),
            };
            let registered = version_command(&store, "m", files, format);
            assert!(registered.is_ok(), "{format}: {registered:?}");
        }
    }

    /// Sets `path`'s modification time `age` in the past.
    fn age(path: &Path, age: Duration) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn a_sweep_removes_only_unlisted_blobs_and_partial_writes_past_their_grace() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let listed = store.put(b"listed, old").unwrap();
        let unlisted = store.put(b"unlisted, old").unwrap();
        let fresh = store.put(b"unlisted, fresh").unwrap();
        let registered = store.put(b"about to be listed").unwrap();
        let uploaded_again = store.put(b"uploaded again").unwrap();
        let partial = store.temporary_path(&unlisted);
        std::fs::write(&partial, b"half").unwrap();
        let foreign = store.dir.join("notes.txt");
        std::fs::write(&foreign, b"not a blob").unwrap();
        for path in [
            &store.dir.join(&listed),
            &store.dir.join(&unlisted),
            &partial,
            &foreign,
        ] {
            age(path, 2 * UNLISTED_BLOB_GRACE);
        }
        // A registration touches its blobs, and an upload of a blob already here counts
        // as one written now: both are kept though no version lists them yet.
        for digest in [&registered, &uploaded_again] {
            age(&store.dir.join(digest), 2 * UNLISTED_BLOB_GRACE);
        }
        assert!(store.touch(&registered));
        assert_eq!(store.put(b"uploaded again").unwrap(), uploaded_again);

        let written_before = SystemTime::now() - UNLISTED_BLOB_GRACE;
        let swept = store
            .sweep(&HashSet::from([listed.as_str()]), written_before)
            .unwrap();
        assert_eq!(
            swept,
            Swept {
                blobs: 1,
                bytes: (b"unlisted, old".len() + b"half".len()) as u64
            }
        );
        assert!(store.fetch(&listed).is_ok());
        assert!(
            store.fetch(&fresh).is_ok(),
            "a push's blob waits for its registration"
        );
        assert!(store.fetch(&registered).is_ok());
        assert!(store.fetch(&uploaded_again).is_ok());
        assert!(store.fetch(&unlisted).is_err());
        assert!(!partial.exists());
        assert!(
            foreign.exists(),
            "only blobs and their temporary files are swept"
        );
    }

    #[test]
    fn the_blobs_a_version_lists_are_listed_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let files = stored(&store, &mlp_classifier(&[8, 4], 1).unwrap());
        let command = version_command(&store, "m", files.clone(), "safetensors").unwrap();
        let mut state = ClusterState::default();
        shoal_scheduler::apply(&mut state, 1, command).unwrap();
        let expected: HashSet<&str> = files.iter().map(|(_, digest)| digest.as_str()).collect();
        assert_eq!(listed_digests(&state), expected);
    }

    /// Puts each of `files` in `store`, as `(name, digest)`.
    fn stored(store: &ArtifactStore, files: &ModelFiles) -> Vec<(String, String)> {
        files
            .iter()
            .map(|(name, bytes)| (name.clone(), store.put(bytes).unwrap()))
            .collect()
    }

    /// Regression: a version with no config.json, or its weights in a file no runtime
    /// reads, was registered, and every replica of it failed to load.
    #[test]
    fn a_version_no_runtime_could_load_is_refused_saying_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let mlp = mlp_classifier(&[8, 4], 1).unwrap();
        let gguf = as_gguf(&mlp, GgufStorage::F32).unwrap();
        let refused = |files: &ModelFiles, format: &str| {
            version_command(&store, "m", stored(&store, files), format).unwrap_err()
        };
        let without = |files: &ModelFiles, name: &str| {
            let mut files = files.clone();
            files.remove(name);
            files
        };

        let message = refused(&without(&mlp, CONFIG_FILE), "safetensors");
        assert!(message.contains("needs a config.json"), "{message}");
        let message = refused(&without(&mlp, WEIGHTS_FILE), "safetensors");
        assert!(
            message.contains("keeps its weights in model.safetensors alone; found none"),
            "{message}"
        );
        let message = refused(&mlp, "gguf");
        assert!(
            message.contains("keeps its weights in model.gguf alone; found model.safetensors"),
            "{message}"
        );
        let mut both = mlp;
        both.insert(GGUF_WEIGHTS_FILE.into(), gguf[GGUF_WEIGHTS_FILE].clone());
        let message = refused(&both, "safetensors");
        assert!(
            message.contains("found model.gguf and model.safetensors")
                || message.contains("found model.safetensors and model.gguf"),
            "{message}"
        );
        let llama = tiny_llama(&TinyLlama::for_tests()).unwrap();
        let message = refused(&without(&llama, TOKENIZER_FILE), "safetensors");
        assert!(message.contains("also needs tokenizer.json"), "{message}");
        let mut damaged = gguf;
        damaged.get_mut(GGUF_WEIGHTS_FILE).unwrap().truncate(12);
        let message = refused(&damaged, "gguf");
        assert!(message.contains(GGUF_WEIGHTS_FILE), "{message}");
    }

    #[test]
    fn a_quantized_gguf_version_is_sized_as_its_runtime_loads_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let mlp = mlp_classifier(&[64, 32, 4], 1).unwrap();
        let memory_bytes = |files: &ModelFiles, format: &str| {
            let Ok(Command::RegisterModelVersion { memory_bytes, .. }) =
                version_command(&store, "m", stored(&store, files), format)
            else {
                panic!("a registration");
            };
            memory_bytes
        };
        let quantized = as_gguf(&mlp, GgufStorage::Q8).unwrap();
        assert!(quantized[GGUF_WEIGHTS_FILE].len() < mlp[WEIGHTS_FILE].len() / 2);
        // The MLP multiplies by its quantized matrices as stored (34 bytes a block of 32),
        // and loads its vectors as f32.
        let matrices = 34 * (32 * 64 / 32 + 4 * 32 / 32);
        let vectors = 4 * (64 + 64 + 32 + 4);
        assert_eq!(
            memory_bytes(&quantized, "gguf"),
            memory_estimate_bytes(matrices + vectors)
        );
        assert_eq!(
            memory_bytes(&mlp, "safetensors"),
            memory_estimate_bytes(4 * (64 * 32 + 32 * 4) + vectors)
        );
    }

    /// Regression: `shoal up` registered the demo's files as [weights, config] and a push
    /// of the same directory listed [config, weights]: 409, "same manifest digest and
    /// other contents".
    #[test]
    fn a_version_lists_its_files_by_name_whatever_order_they_are_given_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let weights = ("model.txt".to_string(), store.put(b"weights").unwrap());
        let config = ("config.txt".to_string(), store.put(b"config").unwrap());
        let files_of = |files: Vec<(String, String)>| {
            let Ok(Command::RegisterModelVersion {
                files,
                manifest_digest,
                ..
            }) = version_command(&store, "m", files, "raw")
            else {
                panic!("a registration");
            };
            (files, manifest_digest)
        };
        let given_weights_first = files_of(vec![weights.clone(), config.clone()]);
        let given_config_first = files_of(vec![config, weights]);
        assert_eq!(given_weights_first, given_config_first);
        let names: Vec<&str> = given_weights_first
            .0
            .iter()
            .map(|file| file.name.as_str())
            .collect();
        assert_eq!(names, ["config.txt", "model.txt"]);
    }

    #[test]
    fn only_data_formats_that_look_like_themselves_are_accepted() {
        let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut safetensors = (header.len() as u64).to_le_bytes().to_vec();
        safetensors.extend_from_slice(header);
        safetensors.extend_from_slice(&[0; 4]);
        assert_eq!(validate_artifact("model.safetensors", &safetensors), Ok(()));
        assert!(
            validate_artifact("model.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7f").is_err()
        );
        assert!(validate_artifact("model.gguf", b"GGUF\x03\x00").is_ok());
        assert!(validate_artifact("model.gguf", b"PK\x03\x04").is_err());
        assert!(validate_artifact("config.json", b"{\"a\": 1}").is_ok());
        assert!(validate_artifact("config.json", b"{not json").is_err());
        assert!(validate_artifact("pytorch_model.bin", b"\x80\x02").is_err());
        assert!(validate_artifact("../escape.json", b"{}").is_err());
        assert!(validate_artifact(".hidden.json", b"{}").is_err());
    }

    #[tokio::test]
    async fn a_streamed_blob_is_stored_only_when_whole_and_matching() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let digest = hex::encode(Sha256::digest(b"hello world"));
        let chunks = |parts: Vec<Result<&'static [u8], &'static str>>| {
            futures_util::stream::iter(
                parts
                    .into_iter()
                    .map(|part| part.map(axum::body::Bytes::from_static)),
            )
        };
        let size = store
            .receive(&digest, chunks(vec![Ok(b"hello "), Ok(b"world")]), 1 << 20)
            .await
            .unwrap();
        assert_eq!(size, 11);
        assert_eq!(store.fetch(&digest).unwrap(), b"hello world");

        let other = hex::encode(Sha256::digest(b"other"));
        let wrong = store
            .receive(&other, chunks(vec![Ok(b"not other")]), 1 << 20)
            .await;
        assert!(matches!(wrong, Err(ReceiveError::Mismatch { .. })));
        let broken = store
            .receive(
                &other,
                chunks(vec![Ok(b"oth"), Err("connection reset")]),
                1 << 20,
            )
            .await;
        assert!(matches!(
            broken,
            Err(ReceiveError::Interrupted {
                received_bytes: 3,
                ..
            })
        ));
        assert!(!store.touch(&other));
        let leftovers = std::fs::read_dir(dir.path().join("sha256"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 1, "only the good blob, no temporary files");
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
