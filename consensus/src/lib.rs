//! Raft consensus for Shoal's control plane, on tikv's `raft` crate.
//!
//! One thread (the driver) owns the `RawNode`: it ticks, steps messages, persists each
//! `Ready` durably to a `raft-engine` log before acknowledging anything that depends on it,
//! applies committed entries to a [`StateMachine`] and answers the proposers waiting on them.
//! Callers hold a cloneable [`ConsensusHandle`].
//!
//! This crate never interprets a command: it replicates opaque bytes. It knows nothing
//! about models, nodes or HTTP.

mod driver;
mod logger;
mod storage;

pub use driver::{ConsensusHandle, start};
pub use storage::StorageError;

use std::path::PathBuf;
use std::time::Duration;

/// What raft replicates into. Implemented by the node layer over the scheduler's state.
pub trait StateMachine: Send + 'static {
    /// Applies the bytes of one committed entry at `index` and returns the bytes answered to
    /// whoever proposed it. Must be deterministic: every member applies the same entries.
    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8>;

    /// Called after a run of entries has been applied, so the owner can publish one new
    /// view instead of one per entry.
    fn applied(&mut self, _index: u64) {}
}

/// Settings of one raft member.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    /// This member's raft id; ids start at 1.
    pub id: u64,
    /// The directory holding the raft log. Nothing else may write there.
    pub dir: PathBuf,
    /// Time between raft ticks.
    pub tick_interval: Duration,
    /// Ticks without a heartbeat before a follower campaigns.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
}

impl ConsensusConfig {
    /// Defaults for a member with this id and log directory: 100 ms ticks, election after
    /// 1 s without a leader, heartbeats every 200 ms.
    pub fn new(id: u64, dir: PathBuf) -> ConsensusConfig {
        ConsensusConfig {
            id,
            dir,
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
        }
    }
}

/// A member's view of the group, published after every `Ready`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub term: u64,
    /// The leader's id, if one is known.
    pub leader: Option<u64>,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: Vec<u64>,
}

/// Why a proposal has no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader { leader: Option<u64> },
    #[error("the proposal queue is full; retry later")]
    Overloaded,
    #[error("no answer before the deadline; the proposal may or may not have been applied")]
    Timeout,
    #[error("the raft log cannot be written: {0}")]
    Storage(String),
    #[error("consensus has stopped")]
    Stopped,
}

/// Why consensus could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the raft log in {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: StorageError,
    },
    #[error("creating the raft node: {0}")]
    Raft(#[from] raft::Error),
    #[error("starting the driver thread: {0}")]
    Thread(#[from] std::io::Error),
}
