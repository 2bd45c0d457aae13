//! The durable raft log: entries, hard state and conf state in a `raft-engine` directory,
//! behind raft-rs's `Storage` trait.
//!
//! Writes happen only through [`DiskStorage::persist`], which syncs before returning, so
//! whatever raft is told was persisted survives a crash.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};
use raft_engine::{Engine, LogBatch, MessageExt};
use std::path::Path;

/// Everything lives in one raft group of the engine.
const GROUP_ID: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Engine(#[from] raft_engine::Error),
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

/// The raft log on disk. Owned by the driver's `RawNode`; nothing else touches it.
pub(crate) struct DiskStorage {
    engine: Engine,
    /// Cached copies of what is on disk, so `initial_state` needs no read.
    hard_state: HardState,
    conf_state: ConfState,
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("dir", &self.engine.path())
            .field("hard_state", &self.hard_state)
            .finish_non_exhaustive()
    }
}

impl DiskStorage {
    /// Opens (creating if needed) the log in `dir`. A new log is bootstrapped with `voters`;
    /// an existing one keeps the membership it recorded.
    pub(crate) fn open(dir: &Path, voters: &[u64]) -> Result<DiskStorage, StorageError> {
        let config = raft_engine::Config {
            dir: dir.to_string_lossy().into_owned(),
            // The control-plane log is small; keep recovery light on a 2-core host.
            recovery_threads: 1,
            target_file_size: raft_engine::ReadableSize::mb(32),
            ..raft_engine::Config::default()
        };
        let engine = Engine::open(config)?;
        let hard_state = engine
            .get_message::<HardState>(GROUP_ID, KEY_HARD_STATE)?
            .unwrap_or_default();
        let conf_state = engine.get_message::<ConfState>(GROUP_ID, KEY_CONF_STATE)?;
        let mut storage = DiskStorage {
            engine,
            hard_state,
            conf_state: conf_state.clone().unwrap_or_default(),
        };
        if conf_state.is_none() {
            let mut bootstrap = ConfState::default();
            bootstrap.set_voters(voters.to_vec());
            storage.persist(&[], None, Some(&bootstrap))?;
        }
        Ok(storage)
    }

    /// Appends `entries` (truncating any conflicting suffix), records the hard and conf
    /// state, and syncs, all in one atomic write.
    pub(crate) fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        conf_state: Option<&ConfState>,
    ) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        batch.add_entries::<EntryExt>(GROUP_ID, entries)?;
        if let Some(hard_state) = hard_state {
            batch.put_message(GROUP_ID, KEY_HARD_STATE.to_vec(), hard_state)?;
        }
        if let Some(conf_state) = conf_state {
            batch.put_message(GROUP_ID, KEY_CONF_STATE.to_vec(), conf_state)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.engine.write(&mut batch, true)?;
        if let Some(hard_state) = hard_state {
            self.hard_state = hard_state.clone();
        }
        if let Some(conf_state) = conf_state {
            self.conf_state = conf_state.clone();
        }
        Ok(())
    }

    /// Records a new commit index. Not synced: a lost commit index is re-learned from the
    /// leader (or, alone, by committing again), never a safety problem.
    pub(crate) fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = commit;
        let mut batch = LogBatch::default();
        batch.put_message(GROUP_ID, KEY_HARD_STATE.to_vec(), &hard_state)?;
        self.engine.write(&mut batch, false)?;
        self.hard_state = hard_state;
        Ok(())
    }

    pub(crate) fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Bytes of log files on disk.
    pub(crate) fn used_bytes(&self) -> usize {
        self.engine.get_used_size()
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
        // Index 0 is the empty log's sentinel, term 0. Snapshots move it (issue 3).
        if index == 0 {
            return Ok(0);
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
        Ok(self.engine.first_index(GROUP_ID).unwrap_or(1))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.engine.last_index(GROUP_ID).unwrap_or(0))
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // A single voter never sends snapshots; multi-member snapshots come with issue 3.
        Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
