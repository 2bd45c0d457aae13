//! The durable raft log: entries, hard state and conf state in a `raft-engine` directory,
//! the latest snapshot in a file beside it, all behind raft-rs's `Storage` trait.
//!
//! Every write that raft is told about is synced before the call returns, so whatever raft
//! believes persisted survives a crash. The one exception is the commit index, which is
//! re-learned after a crash and so is written without a sync.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};
use raft_engine::{Command as EngineCommand, Engine, LogBatch, MessageExt};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything lives in one raft group of the engine.
const GROUP_ID: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const SNAPSHOT_FILE: &str = "snapshot.bin";
/// raft-engine 0.4's log file names: the file's sequence number in 16 digits, then this.
const LOG_FILE_SUFFIX: &str = ".raftlog";
/// raft-engine 0.4's log file header: a 53-byte magic, the format version (a big-endian
/// u64) and, in format 2, the alignment (another).
const LOG_FILE_MAGIC_BYTES: usize = 53;
const LOG_FILE_HEADER_MAX_BYTES: u64 = 69;
/// raft-engine 0.4's batch header: the batch's length (shifted left 8, over the compression
/// type) and the offset of its items, two big-endian u64s.
const LOG_BATCH_HEADER_BYTES: usize = 16;

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Engine(#[from] raft_engine::Error),
    #[error("snapshot file {path}: {source}")]
    SnapshotIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {path} is corrupt: {message}")]
    SnapshotCorrupt { path: PathBuf, message: String },
}

impl StorageError {
    /// Whether the disk is full: the one failure that heals by itself when space returns.
    pub fn is_out_of_space(&self) -> bool {
        let text = match self {
            StorageError::Engine(raft_engine::Error::Io(error)) => error.to_string(),
            StorageError::SnapshotIo { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        text.contains("No space left") || text.contains("nospace") || text.contains("os error 28")
    }
}

/// What the raft core needs from a log beyond raft-rs's read-only `Storage`.
pub(crate) trait LogStore: Storage {
    /// Appends `entries` (truncating any conflicting suffix) and records `hard_state`,
    /// atomically and durably.
    fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError>;
    /// Records a higher commit index; need not be durable.
    fn set_commit(&mut self, commit: u64) -> Result<(), StorageError>;
    /// Records the membership after a conf change, durably.
    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), StorageError>;
    /// Replaces the whole log with a snapshot received from the leader, durably.
    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError>;
    /// Keeps `snapshot` (of this member's own state) and drops the entries it covers.
    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StorageError>;
    /// The latest snapshot, empty when there is none.
    fn latest_snapshot(&self) -> &Snapshot;
    fn conf_state(&self) -> &ConfState;
}

/// Tells raft-engine how to find the index of a raft-rs entry.
#[derive(Debug)]
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(entry: &Entry) -> u64 {
        entry.index
    }
}

/// The raft log on disk. Owned by the driver's raft core; nothing else touches it.
pub(crate) struct DiskStorage {
    engine: Engine,
    snapshot_path: PathBuf,
    /// Cached copies of what is on disk, so reads need no IO.
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("dir", &self.engine.path())
            .field("hard_state", &self.hard_state)
            .field("snapshot_index", &self.snapshot.get_metadata().index)
            .finish_non_exhaustive()
    }
}

impl DiskStorage {
    /// Opens (creating if needed) the log in `dir`. A new log is bootstrapped with
    /// `voters` when given, else starts with no membership; an existing log keeps the
    /// membership it recorded.
    pub(crate) fn open(dir: &Path, voters: Option<&[u64]>) -> Result<DiskStorage, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::SnapshotIo {
            path: dir.to_path_buf(),
            source,
        })?;
        let log_dir = dir.join("log");
        let config = raft_engine::Config {
            dir: log_dir.to_string_lossy().into_owned(),
            // The control-plane log is small; keep recovery light on a 2-core host.
            recovery_threads: 1,
            target_file_size: raft_engine::ReadableSize::mb(32),
            ..raft_engine::Config::default()
        };
        let engine = match Engine::open(config.clone()) {
            Err(raft_engine::Error::Corruption(message)) if set_aside_empty_last_file(&log_dir) => {
                tracing::warn!(%message, "opening the raft log again without the empty file");
                Engine::open(config)?
            }
            opened => opened?,
        };
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let snapshot = read_snapshot(&snapshot_path)?.unwrap_or_default();
        let mut hard_state = engine
            .get_message::<HardState>(GROUP_ID, KEY_HARD_STATE)?
            .unwrap_or_default();
        // A snapshot from the leader is written before the log batch that records it (see
        // `install_snapshot`). If the process died between the two (a full disk holds it
        // there), the hard state's commit is older than the snapshot, and raft-rs refuses
        // to start. A snapshot holds only committed entries, so its index is committed.
        let metadata = snapshot.get_metadata();
        if hard_state.commit < metadata.index {
            hard_state.commit = metadata.index;
            hard_state.term = hard_state.term.max(metadata.term);
        }
        let conf_state = engine.get_message::<ConfState>(GROUP_ID, KEY_CONF_STATE)?;
        let mut storage = DiskStorage {
            engine,
            snapshot_path,
            hard_state,
            conf_state: conf_state.clone().unwrap_or_default(),
            snapshot,
        };
        if conf_state.is_none()
            && let Some(voters) = voters
        {
            let mut bootstrap = ConfState::default();
            bootstrap.set_voters(voters.to_vec());
            storage.set_conf_state(&bootstrap)?;
        }
        Ok(storage)
    }

    /// Bytes of log files on disk.
    pub(crate) fn used_bytes(&self) -> usize {
        self.engine.get_used_size()
    }

    fn write(&self, batch: &mut LogBatch, sync: bool) -> Result<(), StorageError> {
        self.engine.write(batch, sync)?;
        Ok(())
    }
}

/// Renames the log's last file aside if it holds no batch (at most a header) and the file
/// before it is whole batches followed by nothing but zeros; true if it did.
///
/// A rotation that fails on a full disk leaves exactly that: raft-engine 0.4 creates the
/// next file, cannot write its header, and goes on writing the previous one, which ends in
/// space it allocated ahead (zeros) when the process dies. On opening, those zeros are no
/// longer the tail of the log but the middle, and raft-engine refuses the whole log as
/// corrupt. Without the empty file they are the tail again, which it truncates. Nothing is
/// lost: the empty file held no entry, and only zeros are cut. Any other damage (a broken
/// batch with data after it) is left for raft-engine to report.
fn set_aside_empty_last_file(log_dir: &Path) -> bool {
    let Ok(files) = std::fs::read_dir(log_dir) else {
        return false;
    };
    let mut numbered: Vec<(u64, PathBuf)> = files
        .filter_map(|file| {
            let path = file.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let seq = name.strip_suffix(LOG_FILE_SUFFIX)?.parse().ok()?;
            Some((seq, path))
        })
        .collect();
    numbered.sort();
    let [.., (_, before), (_, last)] = numbered.as_slice() else {
        return false;
    };
    let empty = std::fs::metadata(last).is_ok_and(|m| m.len() <= LOG_FILE_HEADER_MAX_BYTES);
    if !empty || !std::fs::read(before).is_ok_and(|bytes| ends_in_zeros(&bytes)) {
        return false;
    }
    let aside = last.with_extension("raftlog.empty");
    match std::fs::rename(last, &aside) {
        Ok(()) => {
            tracing::warn!(file = %last.display(), aside = %aside.display(), "set aside an empty raft log file left by a rotation that failed (disk full?)");
            true
        }
        Err(error) => {
            tracing::error!(%error, file = %last.display(), "cannot set aside an empty raft log file");
            false
        }
    }
}

/// Whether a raft-engine 0.4 log file (no alignment) is its header, whole batches, then
/// only zeros: walks the batches by their lengths up to the first all-zero batch header.
fn ends_in_zeros(file: &[u8]) -> bool {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(file.get(at..at + 8)?.try_into().ok()?))
    };
    let mut at = match u64_at(LOG_FILE_MAGIC_BYTES) {
        Some(1) => LOG_FILE_MAGIC_BYTES + 8,
        Some(2) if u64_at(LOG_FILE_MAGIC_BYTES + 8) == Some(0) => LOG_FILE_MAGIC_BYTES + 16,
        // An unknown version, or batches aligned with padding: not a case to repair.
        _ => return false,
    };
    while let Some(header) = file.get(at..at + LOG_BATCH_HEADER_BYTES) {
        if header.iter().all(|byte| *byte == 0) {
            break;
        }
        let Some(length) = u64_at(at).map(|word| (word >> 8) as usize) else {
            return false;
        };
        if length < LOG_BATCH_HEADER_BYTES || at.saturating_add(length) > file.len() {
            return false;
        }
        at += length;
    }
    file.get(at..)
        .is_some_and(|rest| rest.iter().all(|byte| *byte == 0))
}

fn read_snapshot(path: &Path) -> Result<Option<Snapshot>, StorageError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StorageError::SnapshotIo {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    Snapshot::parse_from_bytes(&bytes)
        .map(Some)
        .map_err(|error| StorageError::SnapshotCorrupt {
            path: path.to_path_buf(),
            message: error.to_string(),
        })
}

/// Writes `snapshot` to `path` atomically: a temporary file, fsync, rename, fsync the dir.
fn write_snapshot(path: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    let io = |source| StorageError::SnapshotIo {
        path: path.to_path_buf(),
        source,
    };
    let bytes = snapshot
        .write_to_bytes()
        .map_err(|error| StorageError::SnapshotCorrupt {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
    let temporary = path.with_extension("partial");
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

impl LogStore for DiskStorage {
    fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        batch.add_entries::<EntryExt>(GROUP_ID, entries)?;
        if let Some(hard_state) = hard_state {
            batch.put_message(GROUP_ID, KEY_HARD_STATE.to_vec(), hard_state)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.write(&mut batch, true)?;
        if let Some(hard_state) = hard_state {
            self.hard_state = hard_state.clone();
        }
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = commit;
        let mut batch = LogBatch::default();
        batch.put_message(GROUP_ID, KEY_HARD_STATE.to_vec(), &hard_state)?;
        self.write(&mut batch, false)?;
        self.hard_state = hard_state;
        Ok(())
    }

    fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        batch.put_message(GROUP_ID, KEY_CONF_STATE.to_vec(), conf_state)?;
        self.write(&mut batch, true)?;
        self.conf_state = conf_state.clone();
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let metadata = snapshot.get_metadata();
        // The file first: if we crash after it, the log below is still whole, and opening
        // it again takes the snapshot's index as committed (see `open`).
        write_snapshot(&self.snapshot_path, snapshot)?;
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(metadata.term);
        hard_state.commit = metadata.index;
        let mut batch = LogBatch::default();
        // Clean drops every entry and key of the group; the keys are put back in the same
        // atomic batch, so no crash can leave the log without its hard state.
        batch.add_command(GROUP_ID, EngineCommand::Clean);
        batch.put_message(GROUP_ID, KEY_HARD_STATE.to_vec(), &hard_state)?;
        batch.put_message(GROUP_ID, KEY_CONF_STATE.to_vec(), metadata.get_conf_state())?;
        self.write(&mut batch, true)?;
        self.hard_state = hard_state;
        self.conf_state = metadata.get_conf_state().clone();
        self.snapshot = snapshot.clone();
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StorageError> {
        write_snapshot(&self.snapshot_path, &snapshot)?;
        let index = snapshot.get_metadata().index;
        self.snapshot = snapshot;
        self.engine.compact_to(GROUP_ID, index + 1);
        self.engine.purge_expired_files()?;
        Ok(())
    }

    fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }
}

fn engine_error(error: raft_engine::Error) -> raft::Error {
    raft::Error::Store(raft::StorageError::Other(Box::new(error)))
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index()? {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        let max_size = max_size.into().map(|bytes| bytes as usize);
        let mut entries = Vec::with_capacity((high - low) as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(GROUP_ID, low, high, max_size, &mut entries)
            .map_err(engine_error)?;
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let snapshot = self.snapshot.get_metadata();
        if index == snapshot.index {
            return Ok(snapshot.term);
        }
        if index < self.first_index()? {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        match self.engine.get_entry::<EntryExt>(GROUP_ID, index) {
            Ok(Some(entry)) => Ok(entry.term),
            Ok(None) => Err(raft::Error::Store(raft::StorageError::Unavailable)),
            Err(error) => Err(engine_error(error)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        let after_snapshot = self.snapshot.get_metadata().index + 1;
        Ok(self
            .engine
            .first_index(GROUP_ID)
            .map_or(after_snapshot, |first| first.max(after_snapshot)))
    }

    fn last_index(&self) -> raft::Result<u64> {
        let snapshot_index = self.snapshot.get_metadata().index;
        Ok(self
            .engine
            .last_index(GROUP_ID)
            .map_or(snapshot_index, |last| last.max(snapshot_index)))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            // The core snapshots on its own schedule; ask again once it has a newer one.
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests;
